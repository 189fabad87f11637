//! The host side of the WIT interfaces: one module per interface, as wasmtime's own WASI
//! crates do. Each module implements the generated `Host` trait on
//! [`CallState`](crate::call::CallState) by
//! validating what the guest sent, calling a backend trait through the request's session,
//! and converting the answer back.
//!
//! Backend failures become the WIT `error` variant (`?` into an [`ImportResult`], converted
//! in `crate::bindings`); only host bugs and hostile guests trap. A guest that sends more
//! items than a limit allows (labels, keys, descriptors) gets `resource-exhausted`, as for
//! every other limit; a malformed or overlong item is `invalid-argument`. Everything a guest hands to the host is bounded here: strings,
//! lists and label maps larger than the limits below are refused before any work is done.

mod clock;
mod content;
mod diff;
pub(crate) mod grants;
mod images;
mod log;
mod registry;
mod snapshots;

use std::{collections::BTreeMap, future::Future};

pub(crate) use crate::bindings::wit_descriptor;
use crate::{
    backend::Labels,
    bindings::{to_wit_error, wit, wit_error, ImportError},
    error::{Code, Error},
    oci::{Descriptor, Digest, Platform},
};

/// The most labels or annotations one guest-supplied map may hold.
pub const MAX_LABELS: usize = 256;
/// The longest label key or value, string argument, or name (containerd's label limit is 4096
/// bytes for key plus value).
pub const MAX_STRING: usize = 4096;
/// The most descriptors one `registry.fetch` may name (an image with more layers than this is
/// not a real image: Docker caps layers at 127, OCI tools at a few hundred).
pub const MAX_BATCH: usize = 1024;

/// Answers a batched import (`content.sizes`, `snapshots.stats`): at most [`MAX_BATCH`]
/// `items` (`ResourceExhausted` naming the `noun`s and the `call` otherwise); each is checked
/// by `check`, whose failure is that item's answer; the ones that pass are asked of the store
/// in one `ask`; the answers come back in the order of `items`.
pub(crate) async fn batch<I, K, T, C, A>(
    items: Vec<I>,
    (noun, call): (&str, &str),
    mut check: impl FnMut(I) -> C,
    ask: impl FnOnce(Vec<K>) -> A,
) -> Result<Vec<Result<T, wit::Error>>, Error>
where
    C: Future<Output = Result<K, Error>>,
    A: Future<Output = Result<Vec<Result<T, Error>>, Error>>,
{
    if items.len() > MAX_BATCH {
        return Err(Error::ResourceExhausted(format!(
            "{} {noun} are more than one {call} call may ask for ({MAX_BATCH})",
            items.len()
        )));
    }
    let mut answers: Vec<Option<Result<T, wit::Error>>> = Vec::with_capacity(items.len());
    let mut asked = Vec::new();
    for item in items {
        match check(item).await {
            Ok(k) => {
                asked.push(k);
                answers.push(None);
            }
            Err(e) => answers.push(Some(Err(to_wit_error(&e)))),
        }
    }
    let mut found = ask(asked).await?.into_iter();
    Ok(answers
        .into_iter()
        .map(|a| {
            a.unwrap_or_else(|| match found.next() {
                Some(r) => r.map_err(|e| to_wit_error(&e)),
                None => Err(wit_error(Code::Internal, format!("the store answered too few {noun}"))),
            })
        })
        .collect())
}

/// The result of a fallible import: `?` on a host error answers the guest with the WIT
/// error, `?` on a `wasmtime::Error` traps (see [`ImportError`]).
pub(crate) type ImportResult<T> = Result<T, ImportError>;

/// Refuses a guest-supplied string longer than [`MAX_STRING`].
pub(crate) fn bounded<'a>(what: &str, s: &'a str) -> Result<&'a str, Error> {
    if s.len() > MAX_STRING {
        return Err(Error::InvalidArgument(format!("{what} is longer than {MAX_STRING} bytes")));
    }
    Ok(s)
}

/// Validates a guest-supplied digest.
pub(crate) fn digest(s: &str) -> Result<Digest, Error> {
    bounded("digest", s)?.parse()
}

/// Validates a guest-supplied label or annotation map.
pub(crate) fn labels(pairs: Vec<(String, String)>) -> Result<Labels, Error> {
    if pairs.len() > MAX_LABELS {
        return Err(Error::ResourceExhausted(format!("more than {MAX_LABELS} labels")));
    }
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        if k.is_empty() || k.len() + v.len() > MAX_STRING {
            return Err(Error::InvalidArgument(format!(
                "label {:?}: keys must be non-empty and key plus value at most {MAX_STRING} bytes",
                k.chars().take(64).collect::<String>()
            )));
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// Converts a label map for the guest.
pub(crate) fn label_pairs(labels: Labels) -> Vec<(String, String)> {
    labels.into_iter().collect()
}

/// The largest blob the host accepts (1 TiB: larger than any real layer, small enough that
/// size arithmetic and progress reporting never overflow).
pub const MAX_BLOB: u64 = 1 << 40;

/// Validates a guest-supplied descriptor.
pub(crate) fn descriptor(d: wit::Descriptor) -> Result<Descriptor, Error> {
    if d.size > MAX_BLOB {
        return Err(Error::InvalidArgument(format!("descriptor {} has a size over {MAX_BLOB} bytes", d.digest)));
    }
    if d.urls.len() > MAX_LABELS {
        return Err(Error::ResourceExhausted(format!("descriptor has more than {MAX_LABELS} urls")));
    }
    Ok(Descriptor {
        media_type: bounded("media type", &d.media_type)?.to_owned(),
        digest: digest(&d.digest)?,
        size: d.size,
        annotations: labels(d.annotations)?,
        platform: d.platform.map(platform).transpose()?,
        urls: d.urls.into_iter().map(|u| bounded("url", &u).map(|_| u.clone())).collect::<Result<_, _>>()?,
    })
}

fn platform(p: wit::Platform) -> Result<Platform, Error> {
    if p.os_features.len() > MAX_LABELS {
        return Err(Error::ResourceExhausted(format!("platform has more than {MAX_LABELS} os features")));
    }
    Ok(Platform {
        os: bounded("os", &p.os)?.to_owned(),
        architecture: bounded("architecture", &p.architecture)?.to_owned(),
        variant: bounded("variant", &p.variant)?.to_owned(),
        os_version: bounded("os version", &p.os_version)?.to_owned(),
        os_features: p.os_features,
    })
}

//! The host side of the WIT interfaces: one module per interface, as wasmtime's own WASI
//! crates do. Each module implements the generated `Host` trait on [`CallState`] by
//! validating what the guest sent, calling a backend trait through the request's session,
//! and converting the answer back.
//!
//! Backend failures become the WIT `error` variant ([`to_wit_error`]); only host bugs and
//! hostile guests trap. Everything a guest hands to the host is bounded here: strings,
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

use crate::{
    backend::Labels,
    engine::{bindings::pullbox::image::types as wit, CallState},
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

impl wit::Host for CallState {}

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

/// Converts a host error into the WIT error the guest sees.
pub(crate) fn to_wit_error(e: &Error) -> wit::Error {
    wit_error(e.code(), e.chain())
}

/// The WIT error of `code` with `message`.
pub(crate) fn wit_error(code: Code, message: String) -> wit::Error {
    match code {
        Code::NotFound => wit::Error::NotFound(message),
        Code::AlreadyExists => wit::Error::AlreadyExists(message),
        Code::InvalidArgument => wit::Error::InvalidArgument(message),
        Code::FailedPrecondition => wit::Error::FailedPrecondition(message),
        Code::PermissionDenied => wit::Error::PermissionDenied(message),
        Code::ResourceExhausted => wit::Error::ResourceExhausted(message),
        Code::Unavailable => wit::Error::Unavailable(message),
        Code::Cancelled => wit::Error::Cancelled(message),
        Code::Internal => wit::Error::Internal(message),
    }
}

/// Splits a WIT error into its code and message.
pub(crate) fn from_wit_error(e: wit::Error) -> (Code, String) {
    match e {
        wit::Error::NotFound(m) => (Code::NotFound, m),
        wit::Error::AlreadyExists(m) => (Code::AlreadyExists, m),
        wit::Error::InvalidArgument(m) => (Code::InvalidArgument, m),
        wit::Error::FailedPrecondition(m) => (Code::FailedPrecondition, m),
        wit::Error::PermissionDenied(m) => (Code::PermissionDenied, m),
        wit::Error::ResourceExhausted(m) => (Code::ResourceExhausted, m),
        wit::Error::Unavailable(m) => (Code::Unavailable, m),
        wit::Error::Cancelled(m) => (Code::Cancelled, m),
        wit::Error::Internal(m) => (Code::Internal, m),
    }
}

/// The result type of a fallible import: the outer `Err` traps, the inner is the WIT error.
pub(crate) type ImportResult<T> = wasmtime::Result<Result<T, wit::Error>>;

/// Turns a host result into an import result.
pub(crate) fn answer<T>(r: Result<T, Error>) -> ImportResult<T> {
    Ok(r.map_err(|e| to_wit_error(&e)))
}

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
        return Err(Error::InvalidArgument(format!("more than {MAX_LABELS} labels")));
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
        return Err(Error::InvalidArgument("descriptor has too many urls".into()));
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

/// Converts a descriptor for the guest.
pub(crate) fn wit_descriptor(d: Descriptor) -> wit::Descriptor {
    wit::Descriptor {
        media_type: d.media_type,
        digest: d.digest.to_string(),
        size: d.size,
        annotations: label_pairs(d.annotations),
        platform: d.platform.map(wit_platform),
        urls: d.urls,
    }
}

fn platform(p: wit::Platform) -> Result<Platform, Error> {
    if p.os_features.len() > MAX_LABELS {
        return Err(Error::InvalidArgument("platform has too many os features".into()));
    }
    Ok(Platform {
        os: bounded("os", &p.os)?.to_owned(),
        architecture: bounded("architecture", &p.architecture)?.to_owned(),
        variant: bounded("variant", &p.variant)?.to_owned(),
        os_version: bounded("os version", &p.os_version)?.to_owned(),
        os_features: p.os_features,
    })
}

/// Converts a platform for the guest.
pub(crate) fn wit_platform(p: Platform) -> wit::Platform {
    wit::Platform {
        os: p.os,
        architecture: p.architecture,
        variant: p.variant,
        os_version: p.os_version,
        os_features: p.os_features,
    }
}

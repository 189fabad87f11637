//! The bindings generated from `wit/` (private to the host, as the guest's are to it) and
//! the one place where generated types meet host types:
//!
//! - errors, one mapping per direction: a host [`Error`] becomes the WIT `error` the guest
//!   sees ([`to_wit_error`], through [`wit_error`]); a WIT `error` the guest answers becomes a
//!   code and message ([`from_wit_error`]);
//! - fallible imports return `Result<T, ImportError>` (wasmtime's `trappable_error_type`):
//!   `?` on a host [`Error`] answers the guest with the WIT error, `?` on a
//!   [`wasmtime::Error`] (a spent import budget) traps the call. [`ImportError`] is converted
//!   once, in `types::Host::convert_error`;
//! - the puller's export types: a host [`PullRequest`] goes in, an [`ImageInfo`] comes out.

use crate::{
    call::CallState,
    error::{Code, Error},
    image::{ImageInfo, PullRequest},
    oci::{Descriptor, Platform},
};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "puller-world",
    imports: { default: async | trappable },
    exports: { default: async },
    trappable_error_type: { "pullbox:image/types.error" => crate::bindings::ImportError },
});

pub(crate) use self::exports::pullbox::image::puller as exp;
pub(crate) use self::pullbox::image::types as wit;

/// What a fallible import fails with: an answer for the guest, or a trap.
#[derive(Debug)]
pub enum ImportError {
    /// A host failure; the guest gets it as the WIT `error`.
    Refused(Error),
    /// A host bug, a hostile guest or a spent budget: the call traps.
    Trap(wasmtime::Error),
}

impl From<Error> for ImportError {
    fn from(e: Error) -> ImportError {
        ImportError::Refused(e)
    }
}

impl From<wasmtime::Error> for ImportError {
    fn from(e: wasmtime::Error) -> ImportError {
        ImportError::Trap(e)
    }
}

impl wit::Host for CallState {
    fn convert_error(&mut self, e: ImportError) -> wasmtime::Result<wit::Error> {
        match e {
            ImportError::Refused(e) => Ok(to_wit_error(&e)),
            ImportError::Trap(e) => Err(e),
        }
    }
}

/// Converts a host error into the WIT error the guest sees.
pub(crate) fn to_wit_error(e: &Error) -> wit::Error {
    wit_error(e.code(), e.chain())
}

/// The WIT error of `code` with `message`: the one host-to-WIT mapping of codes.
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

/// Splits a WIT error into its code and message: the one WIT-to-host mapping of codes.
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

/// Converts a descriptor for the guest.
pub(crate) fn wit_descriptor(d: Descriptor) -> wit::Descriptor {
    wit::Descriptor {
        media_type: d.media_type,
        digest: d.digest.to_string(),
        size: d.size,
        annotations: d.annotations.into_iter().collect(),
        platform: d.platform.map(wit_platform),
        urls: d.urls,
    }
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

/// A map as the guest takes it: a list sorted by key.
fn pairs(m: &std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl From<&PullRequest> for exp::PullRequest {
    fn from(r: &PullRequest) -> exp::PullRequest {
        let c = &r.context;
        exp::PullRequest {
            reference: r.reference.clone(),
            platform: wit_platform(r.platform.clone()),
            runtime_handler: c.runtime_handler.clone(),
            annotations: pairs(&c.annotations),
            pod: c.pod.as_ref().map(|p| exp::Pod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                labels: pairs(&p.labels),
                annotations: pairs(&p.annotations),
            }),
        }
    }
}

impl From<exp::ImageInfo> for ImageInfo {
    fn from(i: exp::ImageInfo) -> ImageInfo {
        let exp::ImageInfo { id, repo_tags, repo_digests, size, chain_id, manifest_digest, user, pinned } = i;
        ImageInfo { id, repo_tags, repo_digests, size, chain_id, manifest_digest, user, pinned }
    }
}

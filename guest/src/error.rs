//! The puller's error type.
//!
//! [`Error`] has one variant per case of the WIT `error` variant (`types.wit`), each with a
//! message for people; the component boundary (`bindings`) maps it one-to-one, so the gRPC
//! code a caller sees is decided here, in the pure logic, and nowhere else. Errors that come
//! back from an import keep their case and only gain context (what the puller was doing,
//! with the reference or digest), so a `not-found` from the registry stays `not-found`.

use std::fmt;

/// Maps `$e`, a value of an enum with the nine cases of the WIT `error` variant, to the same
/// case of `$to`, its message passed through `$f`: the crate's one case-by-case mapping
/// ([`Error::context`] and both directions across the component boundary use it).
macro_rules! same_case {
    ($e:expr, $from:ident => $to:ident, $f:expr) => {{
        let f = $f;
        match $e {
            $from::NotFound(m) => $to::NotFound(f(m)),
            $from::AlreadyExists(m) => $to::AlreadyExists(f(m)),
            $from::InvalidArgument(m) => $to::InvalidArgument(f(m)),
            $from::FailedPrecondition(m) => $to::FailedPrecondition(f(m)),
            $from::PermissionDenied(m) => $to::PermissionDenied(f(m)),
            $from::ResourceExhausted(m) => $to::ResourceExhausted(f(m)),
            $from::Unavailable(m) => $to::Unavailable(f(m)),
            $from::Cancelled(m) => $to::Cancelled(f(m)),
            $from::Internal(m) => $to::Internal(f(m)),
        }
    }};
}
#[cfg_attr(not(target_arch = "wasm32"), allow(unused_imports))]
pub(crate) use same_case;

/// A guest-visible failure: the case decides the gRPC code, the message is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The named object does not exist.
    NotFound(String),
    /// An object with that name exists already.
    AlreadyExists(String),
    /// The request is malformed (a bad reference, digest, setting or argument).
    InvalidArgument(String),
    /// The system is not in the state the operation needs.
    FailedPrecondition(String),
    /// Policy or the remote side refused the request.
    PermissionDenied(String),
    /// A limit was hit.
    ResourceExhausted(String),
    /// A transient failure.
    Unavailable(String),
    /// The request was cancelled or timed out.
    Cancelled(String),
    /// A bug or an unexpected failure.
    Internal(String),
}

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The WIT case name (`not-found`, …), used in log lines.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not-found",
            Error::AlreadyExists(_) => "already-exists",
            Error::InvalidArgument(_) => "invalid-argument",
            Error::FailedPrecondition(_) => "failed-precondition",
            Error::PermissionDenied(_) => "permission-denied",
            Error::ResourceExhausted(_) => "resource-exhausted",
            Error::Unavailable(_) => "unavailable",
            Error::Cancelled(_) => "cancelled",
            Error::Internal(_) => "internal",
        }
    }

    /// The message for people.
    pub fn message(&self) -> &str {
        match self {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::InvalidArgument(m)
            | Error::FailedPrecondition(m)
            | Error::PermissionDenied(m)
            | Error::ResourceExhausted(m)
            | Error::Unavailable(m)
            | Error::Cancelled(m)
            | Error::Internal(m) => m,
        }
    }

    /// The same case with `what: ` put before the message, for errors that come back from
    /// an import (`resolving docker.io/library/busybox:latest: manifest unknown`).
    pub fn context(self, what: impl fmt::Display) -> Error {
        same_case!(self, Error => Error, |m| format!("{what}: {m}"))
    }

    /// Whether this is `not-found`.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound(_))
    }

    /// Whether this is `already-exists`.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Error::AlreadyExists(_))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for Error {}

/// Adds context to the error of a `Result` lazily (the message is only built on failure).
pub trait ResultExt<T> {
    /// See [`Error::context`].
    fn context_with<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn context_with<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.context(what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_case() {
        let e = Error::NotFound("manifest unknown".into()).context("resolving busybox");
        assert_eq!(e, Error::NotFound("resolving busybox: manifest unknown".into()));
        assert_eq!(e.code(), "not-found");
        assert_eq!(e.to_string(), "not-found: resolving busybox: manifest unknown");
    }
}

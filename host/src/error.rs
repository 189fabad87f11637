//! The host's error type.
//!
//! [`Error`] has one variant per failure the host can meet; [`Error::code`] maps each to the
//! gRPC-shaped [`Code`] that the WIT `error` variant and the CRI server use. Backend failures
//! become the guest-visible WIT error (see `interfaces`); only host bugs or hostile guests trap.

use std::fmt;

/// gRPC-shaped status codes: the cases of the WIT `types.error` variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Cancelled,
    Internal,
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Code::NotFound => "not found",
            Code::AlreadyExists => "already exists",
            Code::InvalidArgument => "invalid argument",
            Code::FailedPrecondition => "failed precondition",
            Code::PermissionDenied => "permission denied",
            Code::ResourceExhausted => "resource exhausted",
            Code::Unavailable => "unavailable",
            Code::Cancelled => "cancelled",
            Code::Internal => "internal",
        };
        f.write_str(s)
    }
}

impl From<Code> for tonic::Code {
    fn from(code: Code) -> tonic::Code {
        match code {
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::Cancelled => tonic::Code::Cancelled,
            Code::Internal => tonic::Code::Internal,
        }
    }
}

/// Every failure of the host's stores, transport and engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// An object with that name exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A malformed argument: reference, digest, descriptor, setting.
    #[error("{0}")]
    InvalidArgument(String),
    /// The store is not in the state the operation needs.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Bytes did not match the digest or size they were announced with.
    #[error("{what}: expected {expected}, got {actual}")]
    Mismatch { what: String, expected: String, actual: String },
    /// A layer archive is malformed or hostile; names the entry.
    #[error("layer {layer}: {reason}")]
    BadLayer { layer: String, reason: String },
    /// The registry or policy refused access.
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was hit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A remote could not be reached or answered with a server error.
    #[error("{what}")]
    Unavailable {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The request was cancelled.
    #[error("{0}")]
    Cancelled(String),
    /// The failure of an operation shared by several waiters (a download), as each of them
    /// reports it: same code, same message.
    #[error("{message}")]
    Shared { code: Code, message: String },
    /// A filesystem operation failed.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The metadata database failed.
    #[error("metadata database")]
    Db(#[from] rusqlite::Error),
    /// A stored record could not be decoded.
    #[error("corrupt metadata record")]
    Corrupt(#[from] serde_json::Error),
}

impl Error {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FailedPrecondition(_) | Error::Mismatch { .. } | Error::BadLayer { .. } => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::Cancelled(_) => Code::Cancelled,
            Error::Shared { code, .. } => *code,
            // A full disk or an exhausted quota, from the filesystem or the metadata database.
            Error::Io { source, .. }
                if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded) =>
            {
                Code::ResourceExhausted
            }
            Error::Db(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DiskFull => {
                Code::ResourceExhausted
            }
            Error::Io { .. } | Error::Db(_) | Error::Corrupt(_) => Code::Internal,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// An `Unavailable` error with a cause.
    pub fn unavailable(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Unavailable { what: what.into(), source: Some(Box::new(source)) }
    }

    /// The message with its whole chain of causes, each once: what the guest and the user see.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            let s = e.to_string();
            if !out.ends_with(&s) {
                out.push_str(": ");
                out.push_str(&s);
            }
            cur = e.source();
        }
        out
    }
}

/// The host's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The containerd backend: every store is one of containerd's gRPC services, reached over
//! containerd's unix socket, in one namespace, with one snapshotter.
//!
//! [`connect`] returns a [`Backend`] made of [`content::Content`] (the content service, with
//! [`content::Writer`] over its `Write` stream), [`snapshots::Snapshots`] (the snapshots
//! service with the configured snapshotter), [`differ::Differ`] (the diff service's `Apply`:
//! containerd decompresses and unpacks), [`images::Images`] (the images service) and
//! [`leases::LeaseManager`] (the leases service; containerd's own garbage collector sweeps).
//!
//! Every call carries the namespace header (`containerd-namespace`); every call that writes on
//! behalf of a pull carries the pull's lease (`containerd-lease`), so containerd records what
//! the pull wrote under its lease and its garbage collector keeps it until the image records
//! exist. Image records with containerd's CRI label (`io.cri-containerd.image=managed`, set by
//! the puller) are adopted by containerd's own CRI plugin; the GC labels the puller sets
//! (`containerd.io/gc.ref.*`) let containerd's collector reclaim an image's content and
//! snapshots once its records are gone.
//!
//! Errors: a gRPC status from containerd becomes the [`Error`] variant of the same code
//! (`from_status`), with containerd's message.
//!
//! The connection is one HTTP/2 channel ([`Conn`]), opened lazily and re-opened by tonic
//! when containerd restarts; [`connect`] checks once that containerd answers and has the
//! snapshotter, so a wrong address or snapshotter name is an error at start.

mod content;
mod differ;
mod images;
mod leases;
mod snapshots;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use containerd_client::{
    services::v1::{introspection_client::IntrospectionClient, version_client::VersionClient, PluginsRequest},
    tonic::{
        metadata::AsciiMetadataValue,
        transport::{Channel, Endpoint, Uri},
        Code as GrpcCode, Request, Status,
    },
    types,
};
use serde::{Deserialize, Serialize};

use crate::{
    backend::{Backend, LeaseId},
    error::{Error, Result},
    oci::{Descriptor, Digest, Mount},
};

/// The metadata key of the namespace of a call (containerd's `namespaces.GRPCHeader`).
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// The metadata key of the lease a call writes under (containerd's `leases.GRPCHeader`).
const LEASE_HEADER: &str = "containerd-lease";

/// How long connecting to the socket may take. The socket is local: when containerd is up,
/// it accepts at once; when it is not, failing fast lets the caller say so.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the start-up check ([`connect`]) waits for containerd's answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The containerd backend's settings, as they appear in the daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// The namespace images, content, snapshots and leases live in; `k8s.io` is the one
    /// containerd's CRI plugin (hence kubelet) uses.
    pub namespace: String,
    /// The snapshotter layers are unpacked with; containerd's CRI plugin uses `overlayfs` by
    /// default, and an image is only runnable by CRI with the snapshotter CRI uses.
    pub snapshotter: String,
    /// Other snapshotters a puller may choose for a call (`snapshots.select`), for example the
    /// one a runtime class needs (kata's `devmapper`, a wasm runtime's `native`); each must
    /// exist in containerd. Empty by default: pullers get only `snapshotter`.
    pub snapshotters: Vec<String>,
    /// Ask containerd to flush each applied layer to disk (`ApplyRequest.sync_fs`, the
    /// containerd side of CRI's `image_pull_with_sync_fs`). containerd 2's differ honours it; 1.6
    /// predates the field and ignores it.
    pub sync_fs: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            address: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "k8s.io".into(),
            snapshotter: "overlayfs".into(),
            snapshotters: Vec::new(),
            sync_fs: false,
        }
    }
}

/// Connects to containerd as `config` says and returns the backend.
///
/// Checks that containerd answers on the socket (`Unavailable` otherwise) and that it has the
/// snapshotter (`FailedPrecondition` otherwise); a malformed namespace is `InvalidArgument`.
/// After that, a containerd restart is survived: the channel reconnects.
pub async fn connect(config: &Config) -> Result<Backend> {
    let conn = Conn::open(config)?;
    conn.check(&config.snapshotter).await?;
    let mut other_snapshotters: Vec<Arc<dyn crate::backend::Snapshotter>> = Vec::new();
    for name in config.snapshotters.iter().filter(|n| **n != config.snapshotter) {
        conn.check(name).await?;
        other_snapshotters.push(Arc::new(snapshots::Snapshots::new(conn.clone(), name.clone())));
    }
    Ok(Backend {
        content: Arc::new(content::Content::new(conn.clone())),
        snapshots: Arc::new(snapshots::Snapshots::new(conn.clone(), config.snapshotter.clone())),
        other_snapshotters,
        differ: Arc::new(differ::Differ::new(conn.clone(), config.sync_fs)),
        images: Arc::new(images::Images::new(conn.clone())),
        leases: Arc::new(leases::LeaseManager::new(conn, config.snapshotter.clone())),
    })
}

/// The channel to containerd and the namespace every call names.
#[derive(Clone)]
pub(crate) struct Conn {
    channel: Channel,
    namespace: AsciiMetadataValue,
    /// The socket, for messages.
    address: Arc<str>,
}

impl Conn {
    /// A lazily connecting channel to the socket of `config`.
    fn open(config: &Config) -> Result<Conn> {
        validate_namespace(&config.namespace)?;
        let namespace = AsciiMetadataValue::try_from(config.namespace.as_str())
            .map_err(|_| Error::InvalidArgument(format!("containerd namespace {:?} is not ASCII", config.namespace)))?;
        if config.snapshotter.is_empty() || config.snapshotters.iter().any(String::is_empty) {
            return Err(Error::InvalidArgument("a containerd snapshotter name must not be empty".into()));
        }
        let path = config.address.clone();
        // The URI is required by tonic and ignored: the connector dials the socket.
        let channel = Endpoint::from_static("http://containerd")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
            }));
        Ok(Conn { channel, namespace, address: config.address.display().to_string().into() })
    }

    /// Checks that containerd answers and has the snapshotter `snapshotter`.
    async fn check(&self, snapshotter: &str) -> Result<()> {
        let check = async {
            let version = VersionClient::new(self.channel.clone())
                .version(self.request(()))
                .await
                .map_err(|s| self.error(s))?
                .into_inner();
            tracing::debug!(address = %self.address, version = %version.version, "connected to containerd");
            let filter = format!("type==io.containerd.snapshotter.v1,id=={snapshotter}");
            let plugins = IntrospectionClient::new(self.channel.clone())
                .plugins(self.request(PluginsRequest { filters: vec![filter] }))
                .await
                .map_err(|s| self.error(s))?
                .into_inner()
                .plugins;
            match plugins.first() {
                None => Err(Error::FailedPrecondition(format!(
                    "containerd at {} has no snapshotter {snapshotter:?}",
                    self.address
                ))),
                Some(p) => match &p.init_err {
                    Some(e) if e.code != 0 => Err(Error::FailedPrecondition(format!(
                        "containerd at {} cannot use snapshotter {snapshotter:?}: {}",
                        self.address, e.message
                    ))),
                    _ => Ok(()),
                },
            }
        };
        match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable {
                what: format!("containerd at {} did not answer within {CHECK_TIMEOUT:?}", self.address),
                source: None,
            }),
        }
    }

    /// A request in the namespace.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.metadata_mut().insert(NAMESPACE_HEADER, self.namespace.clone());
        req
    }

    /// A request in the namespace that writes under `lease`.
    fn leased<T>(&self, message: T, lease: &LeaseId) -> Result<Request<T>> {
        let mut req = self.request(message);
        let value = AsciiMetadataValue::try_from(lease.0.as_str())
            .map_err(|_| Error::InvalidArgument(format!("lease id {:?} is not ASCII", lease.0)))?;
        req.metadata_mut().insert(LEASE_HEADER, value);
        Ok(req)
    }

    /// The host error of a failed call; transport failures name the socket.
    fn error(&self, status: Status) -> Error {
        from_status(status, &self.address)
    }
}

/// Checks a namespace name as containerd's `identifiers.Validate` does: alphanumeric
/// components joined by single `.`, `_` or `-`, at most 76 characters.
fn validate_namespace(ns: &str) -> Result<()> {
    let component_ok = |c: &str| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric());
    let ok = !ns.is_empty() && ns.len() <= 76 && ns.split(['.', '_', '-']).all(component_ok);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "containerd namespace {ns:?} is invalid: it must be alphanumeric parts joined by '.', '_' or '-', at most 76 characters"
        )))
    }
}

/// Maps a gRPC status from containerd (at the socket `address`, named in transport failures)
/// to the host's error of the same code, keeping containerd's message. containerd ends "not
/// found" and "already exists" messages with the code's name; the variant adds it again, so
/// it is cut here.
fn from_status(status: Status, address: &str) -> Error {
    let message = describe(&status);
    let strip = |suffix: &str| message.strip_suffix(suffix).unwrap_or(&message).to_owned();
    match status.code() {
        GrpcCode::NotFound => Error::NotFound(strip(": not found")),
        GrpcCode::AlreadyExists => Error::AlreadyExists(strip(": already exists")),
        GrpcCode::InvalidArgument | GrpcCode::OutOfRange => Error::InvalidArgument(message),
        GrpcCode::FailedPrecondition | GrpcCode::Aborted => Error::FailedPrecondition(message),
        GrpcCode::PermissionDenied | GrpcCode::Unauthenticated => Error::PermissionDenied(message),
        GrpcCode::ResourceExhausted => Error::ResourceExhausted(message),
        GrpcCode::Unavailable | GrpcCode::DeadlineExceeded => Error::Unavailable {
            what: if address.is_empty() {
                format!("containerd: {message}")
            } else {
                format!("containerd at {address}: {message}")
            },
            source: None,
        },
        GrpcCode::Cancelled => Error::Cancelled(message),
        // containerd sends Unknown for errors without a code (a failed mount, a broken layer).
        _ if message.contains("no space left on device") => Error::ResourceExhausted(message),
        _ => Error::Io { context: format!("containerd: {message}"), source: std::io::Error::other(message) },
    }
}

/// A status's message followed by its causes (a transport error's), each once.
fn describe(status: &Status) -> String {
    let mut out = status.message().to_owned();
    let mut cur = std::error::Error::source(status);
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        cur = e.source();
    }
    if out.is_empty() {
        out = status.code().description().to_owned();
    }
    out
}

/// containerd's form of a descriptor (it keeps media type, digest, size and annotations).
fn to_descriptor(d: &Descriptor) -> types::Descriptor {
    types::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: d.size as i64,
        annotations: d.annotations.clone().into_iter().collect(),
    }
}

/// A descriptor from containerd.
fn from_descriptor(d: types::Descriptor) -> Result<Descriptor> {
    Ok(Descriptor {
        media_type: d.media_type,
        digest: d.digest.parse()?,
        size: u64::try_from(d.size).map_err(|_| Error::InvalidArgument(format!("negative size {}", d.size)))?,
        annotations: d.annotations.into_iter().collect(),
        platform: None,
        urls: Vec::new(),
    })
}

pub(crate) fn to_mount(m: &Mount) -> types::Mount {
    types::Mount { r#type: m.kind.clone(), source: m.source.clone(), target: String::new(), options: m.options.clone() }
}

fn from_mount(m: types::Mount) -> Mount {
    Mount { kind: m.r#type, source: m.source, options: m.options }
}

/// A digest containerd sent.
fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
}

/// Nanoseconds since the epoch of a protobuf timestamp (0 for none or before the epoch).
fn nanos(ts: Option<prost_types::Timestamp>) -> u64 {
    ts.map_or(0, |t| {
        u64::try_from(t.seconds).unwrap_or(0).saturating_mul(1_000_000_000).saturating_add(t.nanos.max(0) as u64)
    })
}

/// Seconds since the Unix epoch, now.
fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `secs` since the epoch in RFC 3339 (UTC, whole seconds), as containerd's `gc.expire`
/// label wants it (Go's `time.RFC3339`).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
/// Parses what [`rfc3339`] writes (and any `Z` timestamp of that shape); `None` otherwise.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Howard Hinnant's days-from-civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_overrides() {
        let c: Config = serde_json::from_str("{}").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.address, PathBuf::from("/run/containerd/containerd.sock"));
        assert_eq!((c.namespace.as_str(), c.snapshotter.as_str()), ("k8s.io", "overlayfs"));
        let c: Config = serde_json::from_str(r#"{"namespace": "other", "address": "/x.sock"}"#).unwrap();
        assert_eq!((c.namespace.as_str(), c.snapshotter.as_str()), ("other", "overlayfs"));
        assert!(serde_json::from_str::<Config>(r#"{"namespaec": "x"}"#).is_err());
    }

    #[test]
    fn namespaces_are_validated() {
        for ok in ["k8s.io", "default", "a-b_c.d", "x1"] {
            validate_namespace(ok).unwrap();
        }
        for bad in ["", "a..b", "-a", "a b", "a/b", &"a".repeat(77)] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn statuses_map_to_errors_with_containerd_messages() {
        let e = from_status(Status::not_found("content digest sha256:ab: not found"), "");
        assert!(matches!(&e, Error::NotFound(m) if m == "content digest sha256:ab"), "{e:?}");
        assert_eq!(e.to_string(), "content digest sha256:ab not found");
        let e = from_status(Status::already_exists("image \"x\": already exists"), "");
        assert!(matches!(&e, Error::AlreadyExists(m) if m == "image \"x\""), "{e:?}");
        assert!(matches!(from_status(Status::failed_precondition("f"), ""), Error::FailedPrecondition(m) if m == "f"));
        assert!(matches!(from_status(Status::invalid_argument("i"), ""), Error::InvalidArgument(_)));
        let e = from_status(Status::unavailable("gone"), "/run/c.sock");
        assert_eq!(e.code(), crate::error::Code::Unavailable);
        assert_eq!(e.to_string(), "containerd at /run/c.sock: gone");
        let e = from_status(Status::unknown("failed to mount /tmp/x: no space left on device"), "");
        assert_eq!(e.code(), crate::error::Code::ResourceExhausted);
        let e = from_status(Status::unknown("failed to extract layer"), "");
        assert_eq!(e.code(), crate::error::Code::Internal);
        assert_eq!(e.chain(), "containerd: failed to extract layer");
    }

    #[test]
    fn rfc3339_round_trips() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        for t in [0, 951_782_400, 1_700_000_000, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20+01:00"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}

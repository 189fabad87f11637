//! pullbox as containerd's proxy snapshotter: the `containerd.services.snapshots.v1.Snapshots`
//! gRPC service, served on its own unix socket, backed by the embedded store.
//!
//! containerd lists the socket in its config (`[proxy_plugins.pullbox] type = "snapshot"
//! address = ...`) and then prepares, commits, mounts and removes snapshots here like on any
//! snapshotter: its differ unpacks layers onto the mounts [`Server`] returns, and runc mounts
//! them for containers. The mounts are the embedded snapshotter's (`bind` for a snapshot
//! without parents, `overlay` with `lowerdir`/`upperdir`/`workdir` otherwise; see
//! `backend::embedded::snapshots`), all under pullbox's root.
//!
//! The store side is [`ProxyStore`]: containerd's snapshots are held by a permanent lease, so
//! pullbox's collector never takes one containerd still references, and `List` shows only
//! them (containerd's own garbage collector removes whatever the backend lists and its database
//! does not know).
//!
//! Errors keep containerd's meaning, which its metadata layer relies on: an existing key is
//! `AlreadyExists`, a missing key or parent `NotFound`, a commit of something not active or a
//! removal of a snapshot with children `FailedPrecondition` (the codes come from
//! [`crate::error::Error::code`]).
//!
//! `List` filters (containerd's filter syntax): each request filter is a comma-separated
//! conjunction of selectors on `name`, `parent`, `kind` and `labels.<key>` (the key may be
//! quoted), with `==`, `!=` or no operator (the field is present and not empty); several filters
//! are alternatives. Regular-expression selectors (`~=`) answer `Unimplemented`. containerd
//! itself walks a backend without filters (its garbage collector); `ctr snapshots ls` filters
//! in containerd's own database.
//!
//! The socket is root's alone (see `pullbox serve`): every caller can mount anything the
//! store holds.
//!
//! The fast path of the containerd backend ([`ProxyDiffer`]): when pullbox's own pulls go to
//! containerd with this snapshotter (`containerd.snapshotter` names it), image records and
//! content live in containerd and snapshots are prepared and committed through containerd
//! (so its metadata and garbage collector know them), but each layer is unpacked by pullbox
//! while it downloads, as the embedded store does, and moved onto the snapshot containerd
//! prepared, which is a directory of pullbox's store. containerd's differ unpacks only what
//! was not staged (a blob containerd already had).

use std::{pin::Pin, sync::Arc};

use containerd_client::services::v1::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, ListSnapshotsResponse, MountsRequest,
    MountsResponse, PrepareSnapshotRequest, PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest,
    StatSnapshotResponse, UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};
use tonic::{Request, Response, Status};

pub use crate::backend::embedded::proxy::ProxyStore;
use crate::{
    backend::{containerd::to_mount, embedded::proxy::ProxyInfo, Differ, Labels, SnapshotKind, Stage},
    error::{Error, Result as HostResult},
    oci::{Descriptor, Digest, Mount},
};

/// The generated server side of the service (see `host/build.rs`).
#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/containerd.services.snapshots.v1.Snapshots.rs"));
}

pub use generated::snapshots_server::SnapshotsServer;

/// `google.protobuf.Empty`, as prost maps it (named for the generated code).
pub type Empty = ();

/// How many snapshots one `List` response message carries (containerd's server sends 100).
const LIST_BATCH: usize = 100;

/// The gRPC service over a [`ProxyStore`].
#[derive(Clone)]
pub struct Server {
    store: ProxyStore,
}

impl Server {
    pub fn new(store: ProxyStore) -> Server {
        Server { store }
    }

    /// The tonic service to add to a router.
    pub fn into_service(self) -> SnapshotsServer<Server> {
        SnapshotsServer::new(self)
    }
}

/// The gRPC status of a store error.
fn status(e: Error) -> Status {
    Status::new(e.code().into(), e.chain())
}

fn labels(map: std::collections::HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

fn timestamp(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: nanos.div_euclid(1_000_000_000), nanos: nanos.rem_euclid(1_000_000_000) as i32 }
}

fn kind(k: SnapshotKind) -> Kind {
    match k {
        SnapshotKind::View => Kind::View,
        SnapshotKind::Active => Kind::Active,
        SnapshotKind::Committed => Kind::Committed,
    }
}

fn info(i: ProxyInfo) -> Info {
    Info {
        name: i.name,
        parent: i.parent,
        kind: kind(i.kind) as i32,
        created_at: Some(timestamp(i.created_at)),
        updated_at: Some(timestamp(i.updated_at)),
        labels: i.labels.into_iter().collect(),
    }
}

fn mounts(m: Vec<crate::oci::Mount>) -> Vec<containerd_client::types::Mount> {
    m.iter().map(to_mount).collect()
}

#[tonic::async_trait]
impl generated::snapshots_server::Snapshots for Server {
    async fn prepare(&self, r: Request<PrepareSnapshotRequest>) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let m = self.store.create(&r.key, &r.parent, SnapshotKind::Active, &labels(r.labels)).await.map_err(status)?;
        Ok(Response::new(PrepareSnapshotResponse { mounts: mounts(m) }))
    }

    async fn view(&self, r: Request<ViewSnapshotRequest>) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let m = self.store.create(&r.key, &r.parent, SnapshotKind::View, &labels(r.labels)).await.map_err(status)?;
        Ok(Response::new(ViewSnapshotResponse { mounts: mounts(m) }))
    }

    async fn mounts(&self, r: Request<MountsRequest>) -> Result<Response<MountsResponse>, Status> {
        let m = self.store.mounts(&r.into_inner().key).await.map_err(status)?;
        Ok(Response::new(MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(&self, r: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.store.commit(&r.name, &r.key, labels(r.labels)).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        self.store.remove(&r.into_inner().key).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn stat(&self, r: Request<StatSnapshotRequest>) -> Result<Response<StatSnapshotResponse>, Status> {
        let i = self.store.stat(&r.into_inner().key).await.map_err(status)?;
        Ok(Response::new(StatSnapshotResponse { info: Some(info(i)) }))
    }

    async fn update(&self, r: Request<UpdateSnapshotRequest>) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let given = r.info.ok_or_else(|| Status::invalid_argument("no snapshot info in the update"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let i = self.store.update(&given.name, labels(given.labels), paths).await.map_err(status)?;
        Ok(Response::new(UpdateSnapshotResponse { info: Some(info(i)) }))
    }

    type ListStream = Pin<Box<dyn futures::Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

    async fn list(&self, r: Request<ListSnapshotsRequest>) -> Result<Response<Self::ListStream>, Status> {
        let filters = r.into_inner().filters.iter().map(|f| Filter::parse(f)).collect::<Result<Vec<_>, _>>()?;
        let all = self.store.list().await.map_err(status)?;
        let kept: Vec<Info> =
            all.into_iter().filter(|i| filters.is_empty() || filters.iter().any(|f| f.matches(i))).map(info).collect();
        let batches: Vec<Result<ListSnapshotsResponse, Status>> =
            kept.chunks(LIST_BATCH).map(|c| Ok(ListSnapshotsResponse { info: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(&self, r: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let u = self.store.usage(&r.into_inner().key).await.map_err(status)?;
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        Ok(Response::new(UsageResponse { size: clamp(u.size), inodes: clamp(u.inodes) }))
    }

    async fn cleanup(&self, _: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.store.cleanup().await.map_err(status)?;
        Ok(Response::new(()))
    }
}

/// The containerd backend's differ when its snapshotter is this proxy (see the module docs):
/// layers are staged (unpacked while they download) by the embedded store's differ, whose
/// staged apply moves them onto the proxy's snapshot directories; what was not staged is
/// applied by containerd's differ.
pub struct ProxyDiffer {
    /// containerd's diff service.
    remote: Arc<dyn Differ>,
    /// The embedded store's differ, over the root the proxy serves.
    local: Arc<dyn Differ>,
}

impl ProxyDiffer {
    pub fn new(remote: Arc<dyn Differ>, local: Arc<dyn Differ>) -> ProxyDiffer {
        ProxyDiffer { remote, local }
    }
}

#[tonic::async_trait]
impl Differ for ProxyDiffer {
    async fn apply(&self, layer: &Descriptor, mounts: &[Mount]) -> HostResult<Digest> {
        tracing::info!(layer = %layer.digest, "containerd's differ unpacks the layer (it was not unpacked while downloading)");
        self.remote.apply(layer, mounts).await
    }

    fn stage(&self, layer: &Descriptor) -> Option<Arc<dyn Stage>> {
        self.local.stage(layer)
    }
}

/// One `List` filter: a conjunction of selectors (see the module docs).
#[derive(Debug, PartialEq, Eq)]
struct Filter(Vec<Selector>);

/// A field compared with a value.
#[derive(Debug, PartialEq, Eq)]
struct Selector {
    field: Field,
    /// `None`: the field is present and not empty.
    test: Option<(bool, String)>,
}

#[derive(Debug, PartialEq, Eq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

/// Splits `s` at `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A filter value or label key, without its quotes.
fn unquote(s: &str) -> Result<String, Status> {
    let s = s.trim();
    match s.strip_prefix('"') {
        Some(rest) => {
            let inner = rest
                .strip_suffix('"')
                .ok_or_else(|| Status::invalid_argument(format!("unterminated quote in {s:?}")))?;
            Ok(inner.replace("\\\"", "\"").replace("\\\\", "\\"))
        }
        None => Ok(s.to_owned()),
    }
}

/// The first operator outside quotes: its position and text.
fn operator(s: &str) -> Option<(usize, &'static str)> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted {
            for op in ["==", "!=", "~="] {
                if s[i..].starts_with(op) {
                    return Some((i, op));
                }
            }
        }
    }
    None
}

impl Filter {
    fn parse(filter: &str) -> Result<Filter, Status> {
        let mut selectors = Vec::new();
        for part in split_unquoted(filter, ',').into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let (path, test) = match operator(part) {
                Some((_, "~=")) => {
                    return Err(Status::unimplemented(format!(
                        "regular-expression filters ({part:?}) are not supported"
                    )))
                }
                Some((at, op)) => (&part[..at], Some((op == "==", unquote(&part[at + op.len()..])?))),
                None => (part, None),
            };
            let field = match path.trim() {
                "name" => Field::Name,
                "parent" => Field::Parent,
                "kind" => Field::Kind,
                p => match p.strip_prefix("labels.") {
                    Some(key) => Field::Label(unquote(key)?),
                    None => return Err(Status::invalid_argument(format!("unknown snapshot field in filter {part:?}"))),
                },
            };
            selectors.push(Selector { field, test });
        }
        Ok(Filter(selectors))
    }

    fn matches(&self, i: &ProxyInfo) -> bool {
        self.0.iter().all(|s| {
            let value = match &s.field {
                Field::Name => Some(i.name.as_str()),
                Field::Parent => Some(i.parent.as_str()),
                Field::Kind => Some(i.kind.as_str()),
                Field::Label(key) => i.labels.get(key).map(String::as_str),
            };
            match &s.test {
                None => value.is_some_and(|v| !v.is_empty()),
                Some((true, want)) => value == Some(want.as_str()),
                Some((false, want)) => value != Some(want.as_str()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
    use tonic::{transport::Endpoint, Code};

    use super::*;

    /// A server on a socket in a fresh store, and a client of containerd-client's making.
    async fn start() -> (tempfile::TempDir, SnapshotsClient<tonic::transport::Channel>) {
        let dir = tempfile::tempdir().unwrap();
        let store = ProxyStore::open(&dir.path().join("root"), Default::default()).await.unwrap();
        let socket = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(Server::new(store).into_service())
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let channel = Endpoint::from_static("http://pullbox")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move { tokio::net::UnixStream::connect(socket).await.map(hyper_util::rt::TokioIo::new) }
            }))
            .await
            .unwrap();
        (dir, SnapshotsClient::new(channel))
    }

    fn map(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    async fn names(
        c: &mut SnapshotsClient<tonic::transport::Channel>,
        filters: &[&str],
    ) -> Result<Vec<String>, Status> {
        use futures::StreamExt as _;
        let request = ListSnapshotsRequest {
            snapshotter: "pullbox".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        let mut stream = c.list(request).await?.into_inner();
        let mut names = Vec::new();
        while let Some(batch) = stream.next().await {
            names.extend(batch?.info.into_iter().map(|i| i.name));
        }
        Ok(names)
    }

    #[tokio::test]
    async fn every_call_containerd_makes() {
        let (dir, mut c) = start().await;
        let prepare = |key: &str, parent: &str| PrepareSnapshotRequest {
            snapshotter: "pullbox".into(),
            key: key.into(),
            parent: parent.into(),
            labels: map(&[("containerd.io/snapshot.ref", "x")]),
        };
        let m = c.prepare(prepare("default/1/extract", "")).await.unwrap().into_inner().mounts;
        assert_eq!((m.len(), m[0].r#type.as_str()), (1, "bind"));
        assert!(m[0].source.starts_with(dir.path().canonicalize().unwrap().to_str().unwrap()), "{m:?}");
        std::fs::write(std::path::Path::new(&m[0].source).join("f"), b"layer").unwrap();
        let again = c.prepare(prepare("default/1/extract", "")).await.unwrap_err();
        assert_eq!(again.code(), Code::AlreadyExists);
        let mounts = c.mounts(MountsRequest { snapshotter: "pullbox".into(), key: "default/1/extract".into() }).await;
        assert_eq!(mounts.unwrap().into_inner().mounts, m);
        let missing = c.prepare(prepare("default/2/x", "default/9/nope")).await.unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);

        let commit = |name: &str, key: &str| CommitSnapshotRequest {
            snapshotter: "pullbox".into(),
            name: name.into(),
            key: key.into(),
            labels: map(&[("containerd.io/snapshot.ref", "sha256:1")]),
        };
        c.commit(commit("default/3/sha256:1", "default/1/extract")).await.unwrap();
        let gone = c.commit(commit("default/3/sha256:2", "default/1/extract")).await.unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
        let stat = |key: &str| StatSnapshotRequest { snapshotter: "pullbox".into(), key: key.into() };
        let info = c.stat(stat("default/3/sha256:1")).await.unwrap().into_inner().info.unwrap();
        assert_eq!((info.kind, info.parent.as_str()), (Kind::Committed as i32, ""));
        assert_eq!(info.labels, map(&[("containerd.io/snapshot.ref", "sha256:1")]));
        assert!(info.created_at.unwrap().seconds > 1_600_000_000);
        assert_eq!(c.stat(stat("default/1/extract")).await.unwrap_err().code(), Code::NotFound);

        // A container's rootfs on the layer: an overlay; a view of it with one lower is a bind.
        let m = c.prepare(prepare("default/4/ctr", "default/3/sha256:1")).await.unwrap().into_inner().mounts;
        assert_eq!(m[0].r#type, "overlay");
        assert!(
            m[0].options.iter().any(|o| o.starts_with("upperdir="))
                && m[0].options.iter().any(|o| o.starts_with("lowerdir="))
        );
        let view = ViewSnapshotRequest {
            snapshotter: "pullbox".into(),
            key: "default/5/v".into(),
            parent: "default/3/sha256:1".into(),
            labels: Default::default(),
        };
        let m = c.view(view).await.unwrap().into_inner().mounts;
        assert_eq!((m[0].r#type.as_str(), m[0].options[0].as_str()), ("bind", "ro"));
        let not_active = c.commit(commit("default/6/y", "default/5/v")).await.unwrap_err();
        assert_eq!(not_active.code(), Code::FailedPrecondition);

        // Labels: by field path, and all at once.
        let update = |labels: &[(&str, &str)], paths: &[&str]| UpdateSnapshotRequest {
            snapshotter: "pullbox".into(),
            info: Some(Info { name: "default/3/sha256:1".into(), labels: map(labels), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
        };
        let i = c.update(update(&[("a", "1")], &["labels.a"])).await.unwrap().into_inner().info.unwrap();
        assert_eq!(i.labels, map(&[("containerd.io/snapshot.ref", "sha256:1"), ("a", "1")]));
        let i = c.update(update(&[("b", "2")], &[])).await.unwrap().into_inner().info.unwrap();
        assert_eq!(i.labels, map(&[("b", "2")]));
        assert_eq!(c.update(update(&[], &["kind"])).await.unwrap_err().code(), Code::InvalidArgument);

        assert_eq!(names(&mut c, &[]).await.unwrap(), ["default/3/sha256:1", "default/4/ctr", "default/5/v"]);
        assert_eq!(names(&mut c, &["kind==active"]).await.unwrap(), ["default/4/ctr"]);
        assert_eq!(
            names(&mut c, &["parent==\"default/3/sha256:1\",kind!=view", "labels.b==2"]).await.unwrap(),
            ["default/3/sha256:1", "default/4/ctr"]
        );
        assert_eq!(names(&mut c, &["labels.\"b\""]).await.unwrap(), ["default/3/sha256:1"]);
        assert_eq!(names(&mut c, &["name~=x"]).await.unwrap_err().code(), Code::Unimplemented);
        assert_eq!(names(&mut c, &["size==1"]).await.unwrap_err().code(), Code::InvalidArgument);

        let usage = c
            .usage(UsageRequest { snapshotter: "pullbox".into(), key: "default/3/sha256:1".into() })
            .await
            .unwrap()
            .into_inner();
        assert!(usage.size >= 5 && usage.inodes == 2, "{usage:?}");

        let remove = |key: &str| RemoveSnapshotRequest { snapshotter: "pullbox".into(), key: key.into() };
        assert_eq!(c.remove(remove("default/3/sha256:1")).await.unwrap_err().code(), Code::FailedPrecondition);
        for key in ["default/5/v", "default/4/ctr", "default/3/sha256:1"] {
            c.remove(remove(key)).await.unwrap();
        }
        assert_eq!(c.remove(remove("default/3/sha256:1")).await.unwrap_err().code(), Code::NotFound);
        c.cleanup(CleanupRequest { snapshotter: "pullbox".into() }).await.unwrap();
        assert!(names(&mut c, &[]).await.unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path().join("root/snapshots")).unwrap().count(), 0);
    }

    #[test]
    fn filters_parse_quotes_and_commas() {
        let f = Filter::parse(r#"labels."containerd.io/gc.root"=="a,b",name!=x"#).unwrap();
        assert_eq!(
            f,
            Filter(vec![
                Selector { field: Field::Label("containerd.io/gc.root".into()), test: Some((true, "a,b".into())) },
                Selector { field: Field::Name, test: Some((false, "x".into())) },
            ])
        );
    }
}

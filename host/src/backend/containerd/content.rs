//! The content store over containerd's content service.
//!
//! [`Content`] implements [`ContentStore`]; [`Writer`] is one `Write` stream, whose writes the
//! backends' shared [`Checked`] writer holds to the blob's size (containerd checks the digest).
//!
//! A write is one bidirectional `Write` call, opened with a `STAT` message that names the
//! ingest reference, the expected digest and the total size; containerd answers with the
//! ingest's offset (what an interrupted earlier write left: the caller resumes there), or
//! `AlreadyExists` when the blob is committed (and, the call carrying the lease header, the
//! lease now holds it). Bytes go in `WRITE` messages of at most [`CHUNK`] bytes; containerd
//! answers each, and at most [`WINDOW`] answers are outstanding, so bytes stream without a
//! round trip per message and without buffering a blob. `COMMIT` makes containerd verify size
//! and digest and move the blob into place; on a mismatch the ingest is aborted.
//!
//! The ingest reference is what containerd's own pullers use (`remotes.MakeRefKey`:
//! `layer-<digest>`, `manifest-<digest>`, …), so a pull by pullbox and one by containerd of
//! the same blob share one ingest: containerd locks it for one writer at a time, and the
//! other waits, as the embedded store's writers do (and as containerd's `content.OpenWriter`
//! does: it retries while the reference is locked).
//!
//! Small blobs read once are kept ([`SmallBlobs`]): a blob never changes under its digest, and
//! listing images that pullbox did not pull reads each one's manifest and config at every call
//! (two round trips each over gRPC). Up to [`SMALL_BLOB`] bytes a blob, [`SMALL_BLOBS_BYTES`]
//! in all, the least recently used dropped first. Only reads are answered from it: whether a
//! blob is still stored (`info`, `sizes`, which decide readiness) always asks containerd.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use containerd_client::{
    services::v1::{
        content_client::ContentClient, leases_client::LeasesClient, AbortRequest, AddResourceRequest,
        DeleteContentRequest, Info, InfoRequest, ReadContentRequest, Resource, UpdateRequest, WriteAction,
        WriteContentRequest, WriteContentResponse,
    },
    tonic::{Code as GrpcCode, Status, Streaming},
};
use futures::{channel::mpsc, SinkExt, StreamExt};

use super::{parse_digest, Conn};
use crate::{
    backend::{
        ingest::{Checked, Ingest},
        BlobReader, ContentInfo, ContentStore, ContentWriter, Labels, LeaseId,
    },
    error::{Error, Result},
    oci::{Descriptor, Digest},
};

/// The most bytes one `WRITE` message carries: large enough that per-message cost vanishes,
/// small enough to stay far below gRPC's message limits (containerd accepts 16 MiB).
const CHUNK: usize = 256 * 1024;

/// How many `WRITE` messages may await containerd's answer: 16 × 256 KiB keeps a fast disk
/// busy while bounding what one writer holds in flight to 4 MiB.
const WINDOW: usize = 16;

/// The first and the longest wait between attempts to open an ingest another writer holds.
const LOCK_POLL_FIRST: Duration = Duration::from_millis(20);
const LOCK_POLL_MAX: Duration = Duration::from_secs(1);

/// Blobs up to this size are kept in memory once read (manifests and configs are a few KiB).
const SMALL_BLOB: u64 = 64 * 1024;

/// The most bytes of small blobs kept: 16 MiB, a few thousand manifests and configs.
const SMALL_BLOBS_BYTES: u64 = 16 * 1024 * 1024;

/// Weighs a kept blob by its length.
#[derive(Clone)]
struct ByLength;

impl quick_cache::Weighter<Digest, Arc<[u8]>> for ByLength {
    fn weight(&self, _: &Digest, blob: &Arc<[u8]>) -> u64 {
        blob.len().max(1) as u64
    }
}

/// Small blobs read before, by digest (see the module docs).
type SmallBlobs = quick_cache::sync::Cache<Digest, Arc<[u8]>, ByLength>;

/// The content store of containerd's namespace.
pub(crate) struct Content {
    conn: Conn,
    small: SmallBlobs,
}

impl Content {
    pub(crate) fn new(conn: Conn) -> Content {
        Content { conn, small: SmallBlobs::with_weighter(4096, SMALL_BLOBS_BYTES, ByLength) }
    }

    /// `len` bytes of a blob from `offset`, which the caller checked against its size; nothing
    /// for a `len` of 0 (containerd would read everything).
    async fn read_range(&self, digest: &Digest, offset: u64, len: usize) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let req = self.conn.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: offset as i64,
            size: len as i64,
        });
        let mut stream = self.client().read(req).await.map_err(|s| self.conn.error(s))?.into_inner();
        let mut out = Vec::with_capacity(len);
        while let Some(msg) = stream.message().await.map_err(|s| self.conn.error(s))? {
            let room = len - out.len();
            out.extend_from_slice(&msg.data[..msg.data.len().min(room)]);
            if out.len() == len {
                break;
            }
        }
        Ok(out)
    }

    fn client(&self) -> ContentClient<containerd_client::tonic::transport::Channel> {
        ContentClient::new(self.conn.channel.clone())
    }

    /// Opens the `Write` stream of `reference` and sends the `STAT` message; returns the
    /// writer positioned at containerd's offset for the ingest.
    async fn open(&self, expected: &Descriptor, lease: &LeaseId, reference: &str) -> Result<Writer, Status> {
        let (mut tx, rx) = mpsc::channel(2);
        tx.send(WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.to_owned(),
            total: expected.size as i64,
            expected: expected.digest.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|_| Status::internal("write stream closed before it started"))?;
        let req = self.conn.leased(rx, lease).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut responses = self.client().write(req).await?.into_inner();
        let stat = responses.message().await?.ok_or_else(|| Status::unavailable("containerd ended the write"))?;
        let offset = u64::try_from(stat.offset).unwrap_or(0);
        Ok(Writer {
            conn: self.conn.clone(),
            expected: expected.clone(),
            lease: lease.clone(),
            reference: reference.to_owned(),
            tx,
            responses,
            sent: offset,
            buf: Vec::with_capacity(CHUNK),
            in_flight: 0,
        })
    }
}

/// The ingest reference of a blob, as containerd's `remotes.MakeRefKey` names it.
fn ingest_ref(desc: &Descriptor) -> String {
    let kind = match desc.media_type.as_str() {
        "application/vnd.docker.distribution.manifest.v2+json" | "application/vnd.oci.image.manifest.v1+json" => {
            "manifest"
        }
        "application/vnd.docker.distribution.manifest.list.v2+json" | "application/vnd.oci.image.index.v1+json" => {
            "index"
        }
        "application/vnd.docker.container.image.v1+json" | "application/vnd.oci.image.config.v1+json" => "config",
        t if crate::oci::Compression::of_layer(t).is_some() => "layer",
        _ => "unknown",
    };
    format!("{kind}-{}", desc.digest)
}

/// Whether a status says another writer holds the ingest (containerd's `ErrUnavailable`
/// "ref … locked"), as opposed to containerd being unreachable.
fn is_locked(status: &Status) -> bool {
    status.code() == GrpcCode::Unavailable && status.message().contains("locked")
}

fn content_info(info: Option<Info>) -> Result<ContentInfo> {
    let info = info.ok_or_else(|| Error::FailedPrecondition("containerd answered without content info".into()))?;
    Ok(ContentInfo {
        digest: parse_digest(&info.digest)?,
        size: u64::try_from(info.size).unwrap_or(0),
        labels: info.labels.into_iter().collect(),
    })
}

#[async_trait]
impl ContentStore for Content {
    async fn info(&self, digest: &Digest) -> Result<ContentInfo> {
        let req = self.conn.request(InfoRequest { digest: digest.to_string() });
        let resp = self.client().info(req).await.map_err(|s| self.conn.error(s))?;
        content_info(resp.into_inner().info)
    }

    async fn read(&self, digest: &Digest, offset: u64, len: usize) -> Result<Vec<u8>> {
        let window = |blob: &[u8]| -> Result<Vec<u8>> {
            let size = blob.len() as u64;
            if offset > size {
                return Err(crate::backend::past_end(digest, offset, size));
            }
            let end = size.min(offset.saturating_add(len as u64));
            Ok(blob[offset as usize..end as usize].to_vec())
        };
        if let Some(blob) = self.small.get(digest) {
            return window(&blob);
        }
        // containerd refuses a read past the end, and reads everything for a size of 0: clamp
        // to the blob's size first (which also bounds what is allocated).
        let size = self.info(digest).await?.size;
        if offset > size {
            return Err(crate::backend::past_end(digest, offset, size));
        }
        if size > 0 && size <= SMALL_BLOB {
            let blob: Arc<[u8]> = self.read_range(digest, 0, size as usize).await?.into();
            if blob.len() as u64 == size {
                self.small.insert(digest.clone(), blob.clone());
            }
            return window(&blob);
        }
        let len = size.saturating_sub(offset).min(len as u64) as usize;
        self.read_range(digest, offset, len).await
    }

    async fn open(&self, digest: &Digest) -> Result<BlobReader> {
        let req = self.conn.request(ReadContentRequest { digest: digest.to_string(), offset: 0, size: 0 });
        let stream = self.client().read(req).await.map_err(|s| self.conn.error(s))?.into_inner();
        let conn = self.conn.clone();
        let bytes = stream.map(move |msg| match msg {
            Ok(m) => Ok(bytes::Bytes::from(m.data)),
            Err(s) => Err(std::io::Error::other(conn.error(s))),
        });
        Ok(Box::new(tokio_util::io::StreamReader::new(bytes)))
    }

    async fn writer(&self, expected: &Descriptor, lease: &LeaseId) -> Result<Box<dyn ContentWriter>> {
        let reference = ingest_ref(expected);
        let mut wait = LOCK_POLL_FIRST;
        let mut announced = false;
        let mut restarted = false;
        loop {
            match self.open(expected, lease, &reference).await {
                Ok(w) => {
                    let mut w = Checked::new(expected.clone(), w.sent, None, w);
                    if w.offset() > expected.size {
                        // Left by a writer that wrote more than this blob has: start again.
                        w.truncate().await?;
                    }
                    return Ok(Box::new(w));
                }
                Err(s) if s.code() == GrpcCode::AlreadyExists => {
                    return Err(Error::AlreadyExists(format!("blob {}", expected.digest)))
                }
                Err(s) if is_locked(&s) => {
                    if !announced {
                        tracing::info!(digest = %expected.digest, "blob is being written by another writer; waiting for it");
                        announced = true;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(LOCK_POLL_MAX);
                }
                // An ingest left for another total size: discard it and start afresh, once.
                Err(s) if s.code() == GrpcCode::FailedPrecondition && !restarted => {
                    tracing::info!(digest = %expected.digest, "discarding an unusable ingest: {}", s.message());
                    restarted = true;
                    abort(&self.conn, &reference).await;
                }
                Err(s) => return Err(self.conn.error(s)),
            }
        }
    }

    async fn set_labels(&self, digest: &Digest, labels: &Labels) -> Result<ContentInfo> {
        // A path `labels.<key>` with the key absent from the info removes the label.
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let set = labels.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.clone(), v.clone())).collect();
        let req = self.conn.request(UpdateRequest {
            info: Some(Info { digest: digest.to_string(), labels: set, ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths }),
        });
        let resp = self.client().update(req).await.map_err(|s| self.conn.error(s))?;
        content_info(resp.into_inner().info)
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        self.small.remove(digest);
        let req = self.conn.request(DeleteContentRequest { digest: digest.to_string() });
        self.client().delete(req).await.map_err(|s| self.conn.error(s))?;
        Ok(())
    }
}

/// Aborts the ingest `reference`, best effort: a failure is logged (an ingest no lease holds
/// is containerd's garbage).
async fn abort(conn: &Conn, reference: &str) {
    let req = conn.request(AbortRequest { r#ref: reference.to_owned() });
    match ContentClient::new(conn.channel.clone()).abort(req).await {
        Ok(_) => {}
        Err(s) if s.code() == GrpcCode::NotFound => {}
        Err(s) => tracing::warn!(reference, "cannot abort a containerd ingest: {}", conn.error(s).chain()),
    }
}

/// One open `Write` stream.
pub(crate) struct Writer {
    conn: Conn,
    expected: Descriptor,
    lease: LeaseId,
    reference: String,
    tx: mpsc::Sender<WriteContentRequest>,
    responses: Streaming<WriteContentResponse>,
    /// Bytes sent; containerd's offset once it has handled every message sent.
    sent: u64,
    /// Bytes not yet sent, fewer than [`CHUNK`].
    buf: Vec<u8>,
    /// Messages sent that containerd has not answered yet.
    in_flight: usize,
}

impl Writer {
    /// Sends one message, first waiting for answers while [`WINDOW`] are outstanding.
    async fn send(&mut self, req: WriteContentRequest) -> Result<(), Status> {
        while self.in_flight >= WINDOW {
            self.receive().await?;
        }
        if self.tx.send(req).await.is_err() {
            // containerd ended the call; its status says why.
            return Err(self.ended().await);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Waits for containerd's next answer.
    async fn receive(&mut self) -> Result<WriteContentResponse, Status> {
        match self.responses.message().await? {
            Some(r) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                Ok(r)
            }
            None => Err(Status::unavailable(format!("containerd ended the write of {}", self.reference))),
        }
    }

    /// The status of a call containerd has ended.
    async fn ended(&mut self) -> Status {
        loop {
            match self.responses.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Status::unavailable(format!("containerd ended the write of {}", self.reference)),
                Err(s) => return s,
            }
        }
    }

    /// Sends the full buffer ([`CHUNK`] bytes) as one `WRITE`; the message takes the buffer
    /// itself, not a copy.
    async fn flush(&mut self) -> Result<(), Status> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let len = data.len();
        let req = WriteContentRequest {
            action: WriteAction::Write as i32,
            offset: self.sent as i64,
            data,
            ..Default::default()
        };
        self.sent += len as u64;
        self.send(req).await
    }

    fn error(&self, s: Status) -> Error {
        self.conn.error(s)
    }

    /// Commits what was sent; a status error as containerd sent it.
    async fn finish(&mut self) -> Result<(), Status> {
        let data = std::mem::take(&mut self.buf);
        let sent = self.sent + data.len() as u64;
        let req = WriteContentRequest {
            action: WriteAction::Commit as i32,
            offset: self.sent as i64,
            total: self.expected.size as i64,
            expected: self.expected.digest.to_string(),
            data,
            ..Default::default()
        };
        self.sent = sent;
        self.send(req).await?;
        // No more messages: containerd ends the call after answering the commit.
        self.tx.close_channel();
        loop {
            let r = self.receive().await?;
            if r.action == WriteAction::Commit as i32 {
                return Ok(());
            }
        }
    }

    /// Holds the committed blob under the writer's lease, for a commit that found the blob
    /// committed by another writer meanwhile (containerd then does not add it to the lease).
    async fn hold(&self) -> Result<()> {
        let req = self.conn.leased(
            AddResourceRequest {
                id: self.lease.0.clone(),
                resource: Some(Resource { id: self.expected.digest.to_string(), r#type: "content".into() }),
            },
            &self.lease,
        )?;
        LeasesClient::new(self.conn.channel.clone()).add_resource(req).await.map_err(|s| self.error(s))?;
        Ok(())
    }
}

#[async_trait]
impl Ingest for Writer {
    async fn reset(&mut self) -> Result<()> {
        self.buf.clear();
        if self.sent == 0 {
            return Ok(());
        }
        // A WRITE at offset 0 makes containerd truncate the ingest.
        self.sent = 0;
        let req = WriteContentRequest { action: WriteAction::Write as i32, offset: 0, ..Default::default() };
        self.send(req).await.map_err(|s| self.error(s))
    }

    async fn append(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                self.flush().await.map_err(|s| self.error(s))?;
            }
        }
        Ok(())
    }

    async fn discard(&mut self) {
        self.tx.close_channel();
        abort(&self.conn, &self.reference).await;
    }

    /// Commits; containerd verifies size and digest.
    async fn commit(mut self) -> Result<ContentInfo> {
        let digest = self.expected.digest.clone();
        match self.finish().await {
            Ok(()) => {}
            // Committed by another writer (another reference) meanwhile: the same bytes.
            Err(s) if s.code() == GrpcCode::AlreadyExists => self.hold().await?,
            // containerd checked size and digest: only the digest can differ here.
            Err(s) if s.code() == GrpcCode::FailedPrecondition => {
                abort(&self.conn, &self.reference).await;
                let actual = s
                    .message()
                    .strip_prefix("unexpected commit digest ")
                    .and_then(|rest| rest.split(',').next())
                    .unwrap_or(s.message())
                    .to_owned();
                return Err(Error::Mismatch { what: format!("blob {digest}"), expected: digest.to_string(), actual });
            }
            Err(s) => return Err(self.error(s)),
        }
        Content::new(self.conn.clone()).info(&digest).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(media_type: &str) -> Descriptor {
        Descriptor::of_bytes(media_type, b"x")
    }

    #[test]
    fn ingest_refs_follow_containerd() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(ingest_ref(&desc("application/vnd.oci.image.manifest.v1+json")), format!("manifest-{d}"));
        assert_eq!(ingest_ref(&desc("application/vnd.oci.image.index.v1+json")), format!("index-{d}"));
        assert_eq!(ingest_ref(&desc("application/vnd.oci.image.config.v1+json")), format!("config-{d}"));
        assert_eq!(ingest_ref(&desc("application/vnd.oci.image.layer.v1.tar+zstd")), format!("layer-{d}"));
        assert_eq!(ingest_ref(&desc("application/octet-stream")), format!("unknown-{d}"));
    }

    #[test]
    fn only_locked_refs_are_waited_for() {
        assert!(is_locked(&Status::unavailable("ref layer-sha256:ab locked for 1s (since now): unavailable")));
        assert!(!is_locked(&Status::unavailable("transport error")));
        assert!(!is_locked(&Status::failed_precondition("locked")));
    }
}

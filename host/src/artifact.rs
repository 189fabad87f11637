//! Pullers from a registry: `puller = "oci://REGISTRY/REPOSITORY@sha256:DIGEST"`.
//!
//! A puller component can be published as an OCI artifact: a manifest whose single layer is
//! the component, of media type `application/wasm` (what `oras push REF puller.wasm:application/wasm`
//! writes; the media types of the Bytecode Alliance's and CNCF's wasm artifact formats are
//! accepted too, see [`WASM_MEDIA_TYPES`]). The config blob is not read.
//!
//! [`Source`] says where a puller comes from: a file, or an `oci://` reference. [`fetch`]
//! brings an `oci://` puller onto the node with the host's own transport (`hosts.toml`
//! mirrors, TLS, credentials from Docker's `config.json`: the same [`Client`] that pulls
//! images) and keeps it as `<cache>/<algorithm>-<manifest hex>.wasm`:
//!
//! - the manifest's digest is checked against the reference's (the transport refuses a body
//!   that does not hash to the digest asked for), and the layer's against the manifest's, so
//!   the bytes loaded are the ones the digest names;
//! - a cached file is used without asking the registry again: a digest names the same bytes
//!   forever, so a restart or a reload of an unchanged digest costs no download (and the
//!   engine's compiled-component cache makes it cost no compilation either);
//! - a tag without a digest is refused ([`ArtifactError::Unpinned`]) unless the caller allows
//!   tags (the daemon's `allow_puller_tags`): a tag can move, and with it the policy of every
//!   node. An allowed tag is resolved on each load; an unchanged digest is not reloaded.
//!
//! A component is at most [`MAX_PULLER_BYTES`] (64 MiB; the default puller is about 360 KB).

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;

use crate::{
    backend::{
        ingest::{Checked, Ingest},
        BlobReader, ContentInfo, ContentStore, ContentWriter, Labels, LeaseId,
    },
    error::Error,
    oci::{Descriptor, Digest, Hasher},
    registry::{Client, Credentials, NoProgress, Repository, Sink},
};

/// The scheme of a puller reference.
pub const SCHEME: &str = "oci://";

/// The layer media types a puller artifact may have: `application/wasm` (oras' convention for
/// a single file), the CNCF wasm OCI artifact layer, and the Bytecode Alliance's component layer.
pub const WASM_MEDIA_TYPES: &[&str] = &[
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
];

/// The largest puller component accepted.
pub const MAX_PULLER_BYTES: u64 = 64 << 20;

/// Why a puller could not be had from a registry.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The reference is not `oci://REGISTRY/REPOSITORY@DIGEST` (or `:TAG`).
    #[error("puller reference {0:?} is not oci://REGISTRY/REPOSITORY@sha256:DIGEST")]
    BadReference(String),
    /// A tag without a digest, and tags are not allowed.
    #[error(
        "puller {0} names a tag, not a digest: pin it (oci://…@sha256:…) or allow tags (allow_puller_tags = true)"
    )]
    Unpinned(String),
    /// The artifact is not a puller component.
    #[error("{reference} is not a puller artifact: {reason}")]
    NotAPuller { reference: String, reason: String },
    /// The registry did not give it (not found, refused, unreachable, wrong bytes).
    #[error("cannot fetch puller {reference}")]
    Fetch {
        reference: String,
        #[source]
        source: Error,
    },
    /// The cache directory cannot be written.
    #[error("cannot keep puller {reference} in {}", .dir.display())]
    Cache {
        reference: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a puller comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A component file.
    File(PathBuf),
    /// An artifact in a registry: `repo` at `reference` (a digest, or a tag).
    Oci { repo: Repository, reference: String },
}

impl Source {
    /// `oci://REGISTRY/REPOSITORY@DIGEST`, `oci://REGISTRY/REPOSITORY:TAG`, or a file path.
    pub fn parse(path: &Path) -> Result<Source, ArtifactError> {
        let Some(rest) = path.to_str().and_then(|s| s.strip_prefix(SCHEME)) else {
            return Ok(Source::File(path.to_owned()));
        };
        let bad = || ArtifactError::BadReference(path.display().to_string());
        let (name, reference) = match rest.split_once('@') {
            Some((name, digest)) => (name, digest.parse::<Digest>().map_err(|_| bad())?.to_string()),
            None => {
                let slash = rest.rfind('/').ok_or_else(bad)?;
                match rest[slash..].rfind(':') {
                    Some(colon) => (&rest[..slash + colon], rest[slash + colon + 1..].to_owned()),
                    None => (rest, "latest".to_owned()),
                }
            }
        };
        let repo = Repository::parse(name).map_err(|_| bad())?;
        if !name.contains('/') || repo.to_string() != name {
            // Only full names: a puller reference names its registry.
            return Err(bad());
        }
        Ok(Source::Oci { repo, reference })
    }

    /// Whether the source names its bytes for good: a file (watched for changes), or a digest.
    pub fn is_pinned(&self) -> bool {
        match self {
            Source::File(_) => true,
            Source::Oci { reference, .. } => reference.contains(':'),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Oci { repo, reference } if reference.contains(':') => {
                write!(f, "{SCHEME}{repo}@{reference}")
            }
            Source::Oci { repo, reference } => write!(f, "{SCHEME}{repo}:{reference}"),
        }
    }
}

/// The component file of `source`: the file itself, or the artifact fetched into (or found
/// in) `cache_dir`, with the manifest digest it came from.
pub async fn fetch(
    client: &Client,
    source: &Source,
    credentials: &Credentials,
    cache_dir: &Path,
    allow_tags: bool,
) -> Result<(PathBuf, Option<Digest>), ArtifactError> {
    let (repo, reference) = match source {
        Source::File(p) => return Ok((p.clone(), None)),
        Source::Oci { repo, reference } => (repo, reference),
    };
    if !source.is_pinned() && !allow_tags {
        return Err(ArtifactError::Unpinned(source.to_string()));
    }
    let shown = source.to_string();
    let failed = |source: Error| ArtifactError::Fetch { reference: shown.clone(), source };
    let store = Arc::new(Memory::default());
    let sink = Sink::new(store.clone(), LeaseId("puller".into()), Arc::new(NoProgress), credentials.clone());
    let pinned: Option<Digest> = reference.parse().ok();
    if let Some(digest) = &pinned {
        let file = cache_file(cache_dir, digest);
        if file.is_file() {
            tracing::debug!(puller = shown, file = %file.display(), "puller found in the cache");
            return Ok((file, Some(digest.clone())));
        }
    }
    let root = client.resolve(repo, reference, &sink).await.map_err(failed)?;
    let file = cache_file(cache_dir, &root.digest);
    if file.is_file() {
        return Ok((file, Some(root.digest)));
    }
    let layer = puller_layer(&shown, &store.bytes(&root.digest).unwrap_or_default())?;
    client.fetch(repo, &layer, &sink, None).await.map_err(failed)?;
    let bytes = store.bytes(&layer.digest).unwrap_or_default();
    write_atomically(cache_dir, &file, &bytes).map_err(|source| ArtifactError::Cache {
        reference: shown.clone(),
        dir: cache_dir.to_owned(),
        source,
    })?;
    tracing::info!(puller = shown, manifest = %root.digest, layer = %layer.digest, "puller fetched from the registry");
    Ok((file, Some(root.digest)))
}

/// The file a puller of manifest `digest` is kept in.
fn cache_file(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join(format!("{}-{}.wasm", digest.algorithm_name(), digest.hex()))
}

/// The one wasm layer of the manifest `body`.
fn puller_layer(reference: &str, body: &[u8]) -> Result<Descriptor, ArtifactError> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    let not = |reason: String| ArtifactError::NotAPuller { reference: reference.to_owned(), reason };
    let m: Manifest = serde_json::from_slice(body).map_err(|e| not(format!("its manifest does not parse: {e}")))?;
    if !m.media_type.is_empty() && m.media_type != "application/vnd.oci.image.manifest.v1+json" {
        return Err(not(format!("it is a {}, not an OCI image manifest", m.media_type)));
    }
    let [layer] = m.layers.as_slice() else {
        return Err(not(format!("its manifest has {} layers, not one", m.layers.len())));
    };
    if !WASM_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
        return Err(not(format!("its layer is {}, not application/wasm", layer.media_type)));
    }
    if layer.size > MAX_PULLER_BYTES {
        return Err(not(format!("its layer is {} bytes, more than {MAX_PULLER_BYTES}", layer.size)));
    }
    Ok(layer.clone())
}

fn write_atomically(dir: &Path, file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}

/// A content store in memory, for the two blobs of a puller artifact: writes are verified
/// against their descriptor (size and digest) before they become visible.
#[derive(Default)]
struct Memory {
    blobs: Arc<Mutex<HashMap<Digest, Vec<u8>>>>,
}

impl Memory {
    fn bytes(&self, digest: &Digest) -> Option<Vec<u8>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner()).get(digest).cloned()
    }
}

#[async_trait]
impl ContentStore for Memory {
    async fn info(&self, digest: &Digest) -> crate::error::Result<ContentInfo> {
        let size = self.bytes(digest).ok_or_else(|| Error::NotFound(format!("blob {digest}")))?.len() as u64;
        Ok(ContentInfo { digest: digest.clone(), size, labels: Labels::new() })
    }

    async fn read(&self, digest: &Digest, offset: u64, len: usize) -> crate::error::Result<Vec<u8>> {
        let bytes = self.bytes(digest).ok_or_else(|| Error::NotFound(format!("blob {digest}")))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
        Ok(bytes[start..start.saturating_add(len).min(bytes.len())].to_vec())
    }

    async fn open(&self, digest: &Digest) -> crate::error::Result<BlobReader> {
        let bytes = self.bytes(digest).ok_or_else(|| Error::NotFound(format!("blob {digest}")))?;
        Ok(Box::new(std::io::Cursor::new(bytes)))
    }

    async fn writer(&self, expected: &Descriptor, _: &LeaseId) -> crate::error::Result<Box<dyn ContentWriter>> {
        if self.bytes(&expected.digest).is_some() {
            return Err(Error::AlreadyExists(format!("blob {}", expected.digest)));
        }
        let ingest = MemoryWriter { digest: expected.digest.clone(), data: Vec::new(), blobs: self.blobs.clone() };
        let hasher = Hasher::new(expected.digest.algorithm());
        Ok(Box::new(Checked::new(expected.clone(), 0, Some(hasher), ingest)))
    }

    async fn set_labels(&self, digest: &Digest, _: &Labels) -> crate::error::Result<ContentInfo> {
        self.info(digest).await
    }

    async fn delete(&self, digest: &Digest) -> crate::error::Result<()> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner()).remove(digest);
        Ok(())
    }
}

/// One blob being written to [`Memory`]; [`Checked`] holds it to its descriptor.
struct MemoryWriter {
    digest: Digest,
    data: Vec<u8>,
    blobs: Arc<Mutex<HashMap<Digest, Vec<u8>>>>,
}

#[async_trait]
impl Ingest for MemoryWriter {
    async fn append(&mut self, data: &[u8]) -> crate::error::Result<()> {
        self.data.extend_from_slice(data);
        Ok(())
    }

    async fn reset(&mut self) -> crate::error::Result<()> {
        self.data.clear();
        Ok(())
    }

    async fn discard(&mut self) {}

    async fn commit(self) -> crate::error::Result<ContentInfo> {
        let size = self.data.len() as u64;
        self.blobs.lock().unwrap_or_else(|e| e.into_inner()).insert(self.digest.clone(), self.data);
        Ok(ContentInfo { digest: self.digest, size, labels: Labels::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_only_full_names_with_a_digest_are_pinned() {
        let d = format!("sha256:{}", "a".repeat(64));
        let s = Source::parse(Path::new(&format!("oci://127.0.0.1:5000/pullers/default@{d}"))).unwrap();
        assert!(s.is_pinned());
        assert_eq!(s.to_string(), format!("oci://127.0.0.1:5000/pullers/default@{d}"));
        let t = Source::parse(Path::new("oci://registry.example.com/pullers/default:v1")).unwrap();
        assert!(!t.is_pinned());
        assert_eq!(t.to_string(), "oci://registry.example.com/pullers/default:v1");
        assert!(matches!(Source::parse(Path::new("/etc/pullbox/p.wasm")).unwrap(), Source::File(_)));
        for bad in ["oci://default", "oci://127.0.0.1:5000/p@sha256:abc", "oci://UPPER/x@sha256:"] {
            assert!(Source::parse(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_manifest_with_one_wasm_layer_is_a_puller() {
        let layer = |t: &str| format!(r#"{{"mediaType":"{t}","digest":"sha256:{}","size":8}}"#, "b".repeat(64));
        let manifest = |layers: &str| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[{layers}]}}"#
            )
        };
        assert!(puller_layer("r", manifest(&layer("application/wasm")).as_bytes()).is_ok());
        let two = format!("{},{}", layer("application/wasm"), layer("application/wasm"));
        assert!(puller_layer("r", manifest(&two).as_bytes()).unwrap_err().to_string().contains("2 layers"));
        let tar = layer("application/vnd.oci.image.layer.v1.tar+gzip");
        assert!(puller_layer("r", manifest(&tar).as_bytes()).unwrap_err().to_string().contains("not application/wasm"));
    }
}

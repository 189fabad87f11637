//! What one pull read, kept so that it can be replayed: [`Recording`] (the request, the
//! resolve answers and the small blobs the puller read through `content.read`), the
//! [`Recorder`] a session feeds while the pull runs, and the directory format recordings are
//! saved in.
//!
//! A recording directory is an OCI image layout plus one file:
//!
//! ```text
//! DIR/oci-layout                   {"imageLayoutVersion": "1.0.0"}
//! DIR/index.json                   one descriptor per resolve answer (annotations: the
//!                                  repository and reference it answered)
//! DIR/blobs/sha256/<hex>           each blob the puller read (indexes, manifests, configs)
//! DIR/pullbox-request.json         the request: reference, platform, runtime handler, pod
//! ```
//!
//! Layers are never recorded: only what `content.read` returned, and no blob larger than
//! [`MAX_MANIFEST`] (4 MiB, the cap on manifests and configs). A recording holds at most
//! [`MAX_RECORDED_BYTES`] in all, so a puller that reads a lot cannot make a recording pull
//! (the shadow puller's, in the daemon) hold much memory. Loading verifies every blob against
//! its file name: a recording edited by hand cannot feed a puller bytes under another digest.

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use serde::{Deserialize, Serialize};

use crate::{
    backend::ContentStore,
    error::{Error, Result},
    oci::{Descriptor, Digest, Platform},
    registry::{Repository, MAX_MANIFEST},
    service::PullContext,
};

/// The most bytes of blobs one recording keeps (a pull of an index with a hundred platforms
/// reads a few hundred kilobytes).
pub const MAX_RECORDED_BYTES: usize = 64 << 20;

/// The annotation of an `index.json` entry naming the repository a resolve asked for.
pub const NAME_ANNOTATION: &str = "dev.pullbox.resolve.name";
/// The annotation of an `index.json` entry naming the reference (tag or digest) asked for.
pub const REFERENCE_ANNOTATION: &str = "dev.pullbox.resolve.reference";
/// The OCI layout's annotation for what an entry is called: `name:reference` or `name@digest`.
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The file holding the request.
const REQUEST_FILE: &str = "pullbox-request.json";

/// The pull a recording is of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// The reference as the caller gave it.
    pub reference: String,
    /// The platform pulled for.
    pub platform: Platform,
    /// What the pull was for (runtime handler, annotations, pod).
    #[serde(default)]
    pub context: PullContext,
}

/// One resolve answer: `name` (a repository) and `reference` (a tag or digest) resolved to
/// `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub name: String,
    pub reference: String,
    pub root: Descriptor,
}

/// What one pull read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recording {
    pub request: RecordedRequest,
    pub resolved: Vec<Resolved>,
    pub blobs: BTreeMap<Digest, Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    media_type: String,
    manifests: Vec<Descriptor>,
}

impl Recording {
    /// Writes the recording into `dir` (created if needed; files of an earlier recording
    /// there are replaced, other files left alone).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |what: &str, e: std::io::Error| Error::FailedPrecondition(format!("cannot write {what}: {e}"));
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| io(&blobs.display().to_string(), e))?;
        for (digest, bytes) in &self.blobs {
            let file = dir.join("blobs").join(digest.algorithm_name()).join(digest.hex());
            std::fs::create_dir_all(file.parent().unwrap_or(dir)).map_err(|e| io("blobs", e))?;
            std::fs::write(&file, bytes).map_err(|e| io(&file.display().to_string(), e))?;
        }
        let manifests = self
            .resolved
            .iter()
            .map(|r| {
                let mut root = r.root.clone();
                let sep = if r.reference.contains(':') { '@' } else { ':' };
                root.annotations.insert(REF_NAME_ANNOTATION.into(), format!("{}{sep}{}", r.name, r.reference));
                root.annotations.insert(NAME_ANNOTATION.into(), r.name.clone());
                root.annotations.insert(REFERENCE_ANNOTATION.into(), r.reference.clone());
                root
            })
            .collect();
        let index =
            Index { schema_version: 2, media_type: "application/vnd.oci.image.index.v1+json".into(), manifests };
        std::fs::write(dir.join("oci-layout"), "{\"imageLayoutVersion\": \"1.0.0\"}\n")
            .map_err(|e| io("oci-layout", e))?;
        std::fs::write(dir.join("index.json"), pretty(&index)).map_err(|e| io("index.json", e))?;
        std::fs::write(dir.join(REQUEST_FILE), pretty(&self.request)).map_err(|e| io(REQUEST_FILE, e))?;
        Ok(())
    }

    /// Reads the recording in `dir`, verifying every blob.
    pub fn load(dir: &Path) -> Result<Recording> {
        let bad = |what: String| Error::InvalidArgument(format!("recording {}: {what}", dir.display()));
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| bad(format!("cannot read {name}: {e}")));
        let request: RecordedRequest =
            serde_json::from_slice(&read(REQUEST_FILE)?).map_err(|e| bad(format!("{REQUEST_FILE}: {e}")))?;
        let index: Index = serde_json::from_slice(&read("index.json")?).map_err(|e| bad(format!("index.json: {e}")))?;
        let mut resolved = Vec::new();
        for mut root in index.manifests {
            let name = root.annotations.remove(NAME_ANNOTATION);
            let reference = root.annotations.remove(REFERENCE_ANNOTATION);
            root.annotations.remove(REF_NAME_ANNOTATION);
            let (Some(name), Some(reference)) = (name, reference) else {
                return Err(bad(format!("index.json entry {} names no repository and reference", root.digest)));
            };
            resolved.push(Resolved { name, reference, root });
        }
        let mut blobs = BTreeMap::new();
        let mut total = 0usize;
        for algorithm in ["sha256", "sha512"] {
            let Ok(entries) = std::fs::read_dir(dir.join("blobs").join(algorithm)) else {
                continue;
            };
            for entry in entries {
                let entry = entry.map_err(|e| bad(format!("cannot list blobs: {e}")))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let digest: Digest =
                    format!("{algorithm}:{name}").parse().map_err(|e| bad(format!("blob {name}: {e}")))?;
                if entry.metadata().map(|m| m.len()).unwrap_or(u64::MAX) > MAX_MANIFEST {
                    return Err(bad(format!("blob {digest} is larger than {MAX_MANIFEST} bytes")));
                }
                let bytes = std::fs::read(entry.path()).map_err(|e| bad(format!("cannot read blob {digest}: {e}")))?;
                let mut hasher = crate::oci::Hasher::new(digest.algorithm());
                hasher.update(&bytes);
                let actual = hasher.finish();
                if actual != digest {
                    return Err(bad(format!("blob {digest} has the digest {actual}")));
                }
                total += bytes.len();
                if total > MAX_RECORDED_BYTES {
                    return Err(bad(format!("its blobs are more than {MAX_RECORDED_BYTES} bytes")));
                }
                blobs.insert(digest, bytes);
            }
        }
        Ok(Recording { request, resolved, blobs })
    }
}

/// `v` as pretty JSON with a final newline (serializing these types cannot fail).
fn pretty<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Collects a [`Recording`] while a pull runs: the session tells it about each resolve answer
/// and each blob read (see `interfaces::registry` and `interfaces::content`).
pub struct Recorder {
    recording: Mutex<Recording>,
}

impl Recorder {
    /// A recorder of the pull `request` describes.
    pub fn new(request: RecordedRequest) -> Recorder {
        Recorder { recording: Mutex::new(Recording { request, ..Recording::default() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.recording.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `repo` and `reference` resolved to `root`.
    pub fn resolved(&self, repo: &Repository, reference: &str, root: &Descriptor) {
        let entry = Resolved { name: repo.to_string(), reference: reference.to_owned(), root: root.clone() };
        let mut r = self.lock();
        if !r.resolved.contains(&entry) {
            r.resolved.push(entry);
        }
    }

    /// The puller read from `digest`: keeps a copy of the whole blob (once), unless it is
    /// larger than a manifest may be or the recording is full (then the replay of this pull
    /// cannot serve it, and says so).
    pub async fn read(&self, content: &dyn ContentStore, digest: &Digest) {
        if self.lock().blobs.contains_key(digest) {
            return;
        }
        let size = match content.info(digest).await {
            Ok(info) => info.size,
            Err(_) => return,
        };
        if size > MAX_MANIFEST {
            tracing::debug!(%digest, size, "not recorded: larger than a manifest may be");
            return;
        }
        let Ok(bytes) = content.read(digest, 0, size as usize).await else {
            return;
        };
        let mut r = self.lock();
        let total: usize = r.blobs.values().map(Vec::len).sum();
        if total + bytes.len() > MAX_RECORDED_BYTES {
            tracing::warn!(%digest, "not recorded: the recording holds {MAX_RECORDED_BYTES} bytes already");
            return;
        }
        r.blobs.insert(digest.clone(), bytes);
    }

    /// What was recorded so far.
    pub fn recording(&self) -> Recording {
        self.lock().clone()
    }
}

//! An in-memory [`Host`] for the unit tests of the pull and catalog logic, and of pullers
//! built on this crate (feature `fake`).
//!
//! [`FakeHost`] plays registry (blobs and tags pushed by the tests), content store,
//! snapshotter, differ and image store with the semantics the WIT documents, including the
//! error cases the puller must handle, and records every mutating call in
//! [`State::calls`] so tests can assert what was asked and in which order. Layers are
//! uncompressed: a layer's diff ID is the sha256 of its bytes unless
//! [`State::diff_override`] says otherwise. [`State::commit_race`] makes another
//! (imaginary) pull commit a snapshot just before ours.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use crate::digest::sha256;
use crate::error::{Error, Result};
use crate::host::{Host, MAX_BATCH, MAX_LIST_KEYS};
use crate::oci;
use crate::types::{
    label, ContentInfo, Descriptor, ImageRecord, Instant, Labelled, Level, Platform, Referrer, SnapshotInfo,
    SnapshotKind,
};

/// Media type of the fake's layers.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// One snapshot.
#[derive(Debug, Clone)]
pub struct Snap {
    pub parent: String,
    pub kind: SnapshotKind,
}

/// Everything the fake holds.
#[derive(Debug, Default)]
pub struct State {
    /// The registry's blobs.
    pub remote: BTreeMap<String, Vec<u8>>,
    /// The registry's manifests: (name, tag or digest) → root descriptor.
    pub refs: BTreeMap<(String, String), Descriptor>,
    /// The content store: digest → (bytes, labels).
    pub content: BTreeMap<String, (Vec<u8>, BTreeMap<String, String>)>,
    /// The default snapshotter's (`overlayfs`) snapshots.
    pub snapshots: BTreeMap<String, Snap>,
    /// The other snapshotters offered (`snapshots.select`), each with its snapshots.
    pub other_snapshots: BTreeMap<String, BTreeMap<String, Snap>>,
    /// The snapshotter `snapshots.select` chose; `None`: the default.
    pub selected: Option<String>,
    pub images: BTreeMap<String, ImageRecord>,
    pub logs: Vec<(Level, String)>,
    pub progress: Vec<(String, String)>,
    /// Mutating calls, in order: `fetch <digests>`, `prepare <key> <parent>`, `apply
    /// <digest> <key>`, `commit <name> <key>`, `remove <key>`, `label <digest>`, `create
    /// <name>`, `update <name>`, `delete <name>`.
    pub calls: Vec<String>,
    /// Reads, in order: `get <name>`, `list`, `list-labels <keys>`, `info <digest>`,
    /// `sizes <count>`, `stat <key>`, `stats <count>`, `referrers <name>@<digest> <type>`.
    pub lookups: Vec<String>,
    /// Every descriptor passed to `fetch`, in order.
    pub fetched: Vec<Descriptor>,
    /// Number of `content.read` calls.
    pub reads: usize,
    pub max_read: u32,
    /// Layer digest → the diff ID `apply` reports.
    pub diff_override: BTreeMap<String, String>,
    /// Layer digest → the error `apply` fails with.
    pub apply_error: BTreeMap<String, Error>,
    /// Snapshot names another pull commits right before ours.
    pub commit_race: BTreeSet<String>,
    pub clock: u64,
    /// The registry's referrers: (name, subject digest) → what `referrers` lists (before
    /// filtering by artifact type).
    pub referrers: BTreeMap<(String, String), Vec<Referrer>>,
    /// What `clock.now` answers.
    pub now: Instant,
}

impl State {
    /// The snapshots of the snapshotter this call works in.
    fn snaps(&mut self) -> &mut BTreeMap<String, Snap> {
        match &self.selected {
            Some(name) => self.other_snapshots.get_mut(name).expect("select checks the name"),
            None => &mut self.snapshots,
        }
    }
}

/// The fake host.
pub struct FakeHost {
    pub s: RefCell<State>,
}

/// A pushed single-platform image.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    pub diff_ids: Vec<String>,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost::new()
    }
}

impl FakeHost {
    pub fn new() -> FakeHost {
        FakeHost { s: RefCell::new(State { max_read: 1 << 20, ..State::default() }) }
    }

    /// Puts a blob into the registry.
    pub fn push_blob(&self, media_type: &str, bytes: &[u8]) -> Descriptor {
        let digest = sha256(bytes);
        self.s.borrow_mut().remote.insert(digest.clone(), bytes.to_vec());
        Descriptor { media_type: media_type.into(), digest, size: bytes.len() as u64, ..Descriptor::default() }
    }

    /// Pushes layers, a `linux/amd64` config and an OCI manifest.
    pub fn push_image(&self, layers: &[&[u8]], user: &str) -> Pushed {
        self.push_image_for(layers, user, "linux/amd64")
    }

    /// Pushes layers, a config for `platform` (`os/arch[/variant]`) and an OCI manifest.
    pub fn push_image_for(&self, layers: &[&[u8]], user: &str, platform: &str) -> Pushed {
        let layers: Vec<Descriptor> = layers.iter().map(|l| self.push_blob(LAYER_TAR, l)).collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
        let mut parts = platform.split('/');
        let mut config = serde_json::json!({
            "os": parts.next().unwrap_or_default(),
            "architecture": parts.next().unwrap_or_default(),
            "config": {"User": user},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let Some(variant) = parts.next() {
            config["variant"] = variant.into();
        }
        let config = self.push_blob(oci::OCI_CONFIG, config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::OCI_MANIFEST,
            "config": desc_json(&config),
            "layers": layers.iter().map(desc_json).collect::<Vec<_>>(),
        });
        let manifest = self.push_blob(oci::OCI_MANIFEST, manifest.to_string().as_bytes());
        Pushed { manifest, config, layers, diff_ids }
    }

    /// Pushes an OCI index of `entries`.
    pub fn push_index(&self, entries: &[(&Descriptor, &str)]) -> Descriptor {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(d, platform)| {
                let mut v = desc_json(d);
                if !platform.is_empty() {
                    let mut parts = platform.split('/');
                    let mut p = serde_json::json!({
                        "os": parts.next().unwrap(), "architecture": parts.next().unwrap(),
                    });
                    if let Some(variant) = parts.next() {
                        p["variant"] = variant.into();
                    }
                    v["platform"] = p;
                }
                v
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::OCI_INDEX, "manifests": manifests,
        });
        self.push_blob(oci::OCI_INDEX, index.to_string().as_bytes())
    }

    /// Makes `name:tag` and `name@digest` resolve to `root`.
    pub fn tag(&self, name: &str, tag: &str, root: &Descriptor) {
        let mut s = self.s.borrow_mut();
        s.refs.insert((name.into(), tag.into()), root.clone());
        s.refs.insert((name.into(), root.digest.clone()), root.clone());
    }

    /// Pushes `manifest` (a blob pushed already) as a referrer of `subject` in `name`, of
    /// `artifact_type`.
    pub fn push_referrer(&self, name: &str, subject: &str, manifest: &Descriptor, artifact_type: &str) {
        self.s.borrow_mut().referrers.entry((name.into(), subject.into())).or_default().push(Referrer {
            media_type: manifest.media_type.clone(),
            digest: manifest.digest.clone(),
            size: manifest.size,
            artifact_type: artifact_type.into(),
            annotations: manifest.annotations.clone(),
        });
    }

    pub fn calls(&self) -> Vec<String> {
        self.s.borrow().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.s.borrow_mut().calls.clear();
    }

    pub fn content_labels(&self, digest: &str) -> BTreeMap<String, String> {
        self.s.borrow().content.get(digest).map(|c| c.1.clone()).unwrap_or_default()
    }

    pub fn record_names(&self) -> Vec<String> {
        self.s.borrow().images.keys().cloned().collect()
    }

    fn call(&self, c: String) {
        self.s.borrow_mut().calls.push(c);
    }

    fn lookup(&self, l: String) {
        self.s.borrow_mut().lookups.push(l);
    }

    /// `content.info` without recording the look-up.
    fn info_of(&self, digest: &str) -> Result<ContentInfo> {
        let s = self.s.borrow();
        let (bytes, labels) = s.content.get(digest).ok_or_else(|| Error::NotFound(format!("content {digest}")))?;
        Ok(ContentInfo {
            digest: digest.into(),
            size: bytes.len() as u64,
            labels: labels.clone().into_iter().collect(),
        })
    }

    /// `snapshots.stat` without recording the look-up.
    fn stat_of(&self, key: &str) -> Result<SnapshotInfo> {
        let mut s = self.s.borrow_mut();
        let snap = s.snaps().get(key).ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        Ok(SnapshotInfo { name: key.into(), parent: snap.parent.clone(), kind: snap.kind, labels: vec![] })
    }
}

pub fn desc_json(d: &Descriptor) -> serde_json::Value {
    serde_json::json!({"mediaType": d.media_type, "digest": d.digest, "size": d.size})
}

/// `linux/amd64`-style platform.
pub fn platform(s: &str) -> Platform {
    let mut parts = s.split('/');
    Platform {
        os: parts.next().unwrap_or_default().into(),
        architecture: parts.next().unwrap_or_default().into(),
        variant: parts.next().unwrap_or_default().into(),
        ..Platform::default()
    }
}

impl Host for FakeHost {
    fn resolve(&self, name: &str, reference: &str) -> Result<Descriptor> {
        let mut s = self.s.borrow_mut();
        let desc = s
            .refs
            .get(&(name.to_string(), reference.to_string()))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("{name}:{reference}: manifest unknown")))?;
        if let Some(bytes) = s.remote.get(&desc.digest).cloned() {
            s.content.entry(desc.digest.clone()).or_insert((bytes, BTreeMap::new()));
        }
        Ok(desc)
    }

    fn fetch(&self, _name: &str, blobs: &[Descriptor]) -> Result<()> {
        let digests: Vec<&str> = blobs.iter().map(|b| b.digest.as_str()).collect();
        self.call(format!("fetch {}", digests.join(",")));
        let mut s = self.s.borrow_mut();
        s.fetched.extend(blobs.iter().cloned());
        for b in blobs {
            if let Some(bytes) = s.remote.get(&b.digest).cloned() {
                s.content.entry(b.digest.clone()).or_insert((bytes, BTreeMap::new()));
            }
        }
        Ok(())
    }

    fn referrers(&self, name: &str, digest: &str, artifact_type: &str) -> Result<Vec<Referrer>> {
        self.lookup(format!("referrers {name}@{digest} {artifact_type}"));
        crate::digest::parse(digest)?;
        Ok(self
            .s
            .borrow()
            .referrers
            .get(&(name.to_string(), digest.to_string()))
            .map(|all| {
                all.iter().filter(|r| artifact_type.is_empty() || r.artifact_type == artifact_type).cloned().collect()
            })
            .unwrap_or_default())
    }

    fn now(&self) -> Instant {
        self.s.borrow().now
    }

    fn content_info(&self, digest: &str) -> Result<ContentInfo> {
        self.lookup(format!("info {digest}"));
        self.info_of(digest)
    }

    fn content_sizes(&self, digests: &[String]) -> Result<Vec<Result<u64>>> {
        self.lookup(format!("sizes {}", digests.len()));
        batch_bound(digests.len(), "digests", "sizes")?;
        Ok(digests.iter().map(|d| self.info_of(d).map(|i| i.size)).collect())
    }

    fn content_read(&self, digest: &str, offset: u64, length: u32) -> Result<Vec<u8>> {
        let mut s = self.s.borrow_mut();
        s.reads += 1;
        if length > s.max_read {
            return Err(Error::ResourceExhausted(format!("read of {length} bytes over the cap")));
        }
        let (bytes, _) = s.content.get(digest).ok_or_else(|| Error::NotFound(format!("content {digest}")))?;
        if offset > bytes.len() as u64 {
            return Err(Error::InvalidArgument(format!("offset {offset} past the end of {digest}")));
        }
        let start = offset as usize;
        let end = (start + length as usize).min(bytes.len());
        Ok(bytes[start..end].to_vec())
    }

    fn content_max_read(&self) -> u32 {
        self.s.borrow().max_read
    }

    fn content_set_labels(&self, digest: &str, labels: &[(String, String)]) -> Result<()> {
        self.call(format!("label {digest}"));
        let mut s = self.s.borrow_mut();
        let (_, have) = s.content.get_mut(digest).ok_or_else(|| Error::NotFound(format!("content {digest}")))?;
        for (k, v) in labels {
            if v.is_empty() {
                have.remove(k);
            } else {
                have.insert(k.clone(), v.clone());
            }
        }
        Ok(())
    }

    fn snapshotter(&self) -> String {
        self.s.borrow().selected.clone().unwrap_or_else(|| "overlayfs".into())
    }

    fn snapshot_select(&self, snapshotter: &str) -> Result<()> {
        self.call(format!("select {snapshotter}"));
        let mut s = self.s.borrow_mut();
        s.selected = match snapshotter {
            "overlayfs" => None,
            other if s.other_snapshots.contains_key(other) => Some(other.into()),
            other => return Err(Error::NotFound(format!("snapshotter {other:?}"))),
        };
        Ok(())
    }

    fn snapshot_prepare(&self, key: &str, parent: &str) -> Result<()> {
        self.call(format!("prepare {key} {parent}"));
        let mut s = self.s.borrow_mut();
        let snaps = s.snaps();
        if snaps.contains_key(key) {
            return Err(Error::AlreadyExists(format!("snapshot {key}")));
        }
        if !parent.is_empty() {
            match snaps.get(parent) {
                None => return Err(Error::NotFound(format!("parent {parent}"))),
                Some(p) if p.kind != SnapshotKind::Committed => {
                    return Err(Error::FailedPrecondition(format!("parent {parent} not committed")))
                }
                Some(_) => {}
            }
        }
        snaps.insert(key.into(), Snap { parent: parent.into(), kind: SnapshotKind::Active });
        Ok(())
    }

    fn snapshot_commit(&self, name: &str, key: &str) -> Result<()> {
        self.call(format!("commit {name} {key}"));
        let mut s = self.s.borrow_mut();
        let raced = s.commit_race.remove(name);
        let snaps = s.snaps();
        if raced {
            let parent = snaps.get(key).map(|k| k.parent.clone()).unwrap_or_default();
            snaps.insert(name.into(), Snap { parent, kind: SnapshotKind::Committed });
        }
        if snaps.contains_key(name) {
            return Err(Error::AlreadyExists(format!("snapshot {name}")));
        }
        let snap = snaps.remove(key).ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        if snap.kind != SnapshotKind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {key} is not active")));
        }
        snaps.insert(name.into(), Snap { kind: SnapshotKind::Committed, ..snap });
        Ok(())
    }

    fn snapshot_stat(&self, key: &str) -> Result<SnapshotInfo> {
        self.lookup(format!("stat {key}"));
        self.stat_of(key)
    }

    fn snapshot_stats(&self, keys: &[String]) -> Result<Vec<Result<SnapshotInfo>>> {
        self.lookup(format!("stats {}", keys.len()));
        batch_bound(keys.len(), "keys", "stats")?;
        Ok(keys.iter().map(|k| self.stat_of(k)).collect())
    }

    fn snapshot_remove(&self, key: &str) -> Result<()> {
        self.call(format!("remove {key}"));
        let mut s = self.s.borrow_mut();
        let snaps = s.snaps();
        if snaps.values().any(|c| c.parent == key) {
            return Err(Error::FailedPrecondition(format!("snapshot {key} has children")));
        }
        snaps.remove(key).map(|_| ()).ok_or_else(|| Error::NotFound(format!("snapshot {key}")))
    }

    fn diff_apply(&self, layer: &Descriptor, key: &str) -> Result<String> {
        self.call(format!("apply {} {key}", layer.digest));
        let mut s = self.s.borrow_mut();
        if let Some(e) = s.apply_error.get(&layer.digest) {
            return Err(e.clone());
        }
        match s.snaps().get(key) {
            Some(snap) if snap.kind == SnapshotKind::Active => {}
            _ => {
                return Err(Error::PermissionDenied(format!(
                    "snapshot {key:?} is not an active snapshot this request prepared"
                )))
            }
        }
        let (bytes, _) =
            s.content.get(&layer.digest).ok_or_else(|| Error::NotFound(format!("content {}", layer.digest)))?;
        Ok(s.diff_override.get(&layer.digest).cloned().unwrap_or_else(|| sha256(bytes)))
    }

    fn image_get(&self, name: &str) -> Result<ImageRecord> {
        self.lookup(format!("get {name}"));
        self.s.borrow().images.get(name).cloned().ok_or_else(|| Error::NotFound(format!("image {name}")))
    }

    fn image_list(&self) -> Result<Vec<ImageRecord>> {
        self.lookup("list".into());
        Ok(self.s.borrow().images.values().cloned().collect())
    }

    fn image_list_labels(&self, keys: &[String]) -> Result<Vec<Labelled>> {
        self.lookup(format!("list-labels {}", keys.join(",")));
        if keys.len() > MAX_LIST_KEYS {
            return Err(Error::ResourceExhausted(format!("{} label keys", keys.len())));
        }
        if keys.iter().any(String::is_empty) {
            return Err(Error::InvalidArgument(format!("label keys {keys:?}")));
        }
        Ok(self
            .s
            .borrow()
            .images
            .values()
            .map(|r| Labelled {
                name: r.name.clone(),
                values: keys.iter().map(|k| label(&r.labels, k).map(str::to_string)).collect(),
            })
            .collect())
    }

    fn image_create(&self, image: &ImageRecord) -> Result<ImageRecord> {
        self.call(format!("create {}", image.name));
        let mut s = self.s.borrow_mut();
        if s.images.contains_key(&image.name) {
            return Err(Error::AlreadyExists(format!("image {}", image.name)));
        }
        s.clock += 1;
        let mut rec = image.clone();
        rec.labels.sort();
        rec.created_at = s.clock;
        rec.updated_at = s.clock;
        s.images.insert(rec.name.clone(), rec.clone());
        Ok(rec)
    }

    fn image_update(&self, image: &ImageRecord) -> Result<ImageRecord> {
        self.call(format!("update {}", image.name));
        let mut s = self.s.borrow_mut();
        s.clock += 1;
        let clock = s.clock;
        let old = s.images.get_mut(&image.name).ok_or_else(|| Error::NotFound(format!("image {}", image.name)))?;
        old.target = image.target.clone();
        old.labels = image.labels.clone();
        old.labels.sort();
        old.updated_at = clock;
        Ok(old.clone())
    }

    fn image_delete(&self, name: &str) -> Result<()> {
        self.call(format!("delete {name}"));
        self.s.borrow_mut().images.remove(name).map(|_| ()).ok_or_else(|| Error::NotFound(format!("image {name}")))
    }

    fn log(&self, level: Level, message: &str) {
        self.s.borrow_mut().logs.push((level, message.into()));
    }

    fn progress(&self, stage: &str, detail: &str) {
        self.s.borrow_mut().progress.push((stage.into(), detail.into()));
    }
}

/// The host's bound on a batched import: at most [`MAX_BATCH`] `noun`s per `call`.
fn batch_bound(n: usize, noun: &str, call: &str) -> Result<()> {
    if n > MAX_BATCH {
        return Err(Error::ResourceExhausted(format!("{n} {noun} in one {call} call")));
    }
    Ok(())
}

impl FakeHost {
    /// Leaves an active snapshot `key` behind, as a killed pull would.
    pub fn snapshot_prepare_direct(&self, key: &str) {
        self.s.borrow_mut().snapshots.insert(key.into(), Snap { parent: String::new(), kind: SnapshotKind::Active });
    }
}

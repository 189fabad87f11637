//! [`Host`]: everything the puller asks of pullbox's native side, one method per WIT import.
//!
//! The pull, status, list and remove logic is written against this trait, not against the
//! generated bindings, so it compiles natively and its unit tests run it against an
//! in-memory fake. In the component, `bindings::WitHost` implements it by calling the
//! imports. Methods take `&self`: the imports are free functions, and the fake keeps its
//! state behind a `RefCell`.

use crate::error::Result;
use crate::types::{label, ContentInfo, Descriptor, ImageRecord, Instant, Labelled, Level, Referrer, SnapshotInfo};

/// The most digests one `content.sizes` call, and the most keys one `snapshots.stats` call,
/// may name (the WIT documents this bound; the host refuses more with `resource-exhausted`).
pub const MAX_BATCH: usize = 1024;

/// The most label keys one `images.list-labels` call may name (the WIT documents this bound;
/// the host refuses more with `invalid-argument`).
pub const MAX_LIST_KEYS: usize = 16;

/// The imports of world `puller-world`, as the puller logic uses them.
pub trait Host {
    // --- registry ---

    /// `registry.resolve`: resolves `name` + tag or digest to the root descriptor, whose
    /// blob is then in the content store.
    fn resolve(&self, name: &str, reference: &str) -> Result<Descriptor>;
    /// `registry.fetch`: starts fetching `blobs` of repository `name`; returns at once.
    fn fetch(&self, name: &str, blobs: &[Descriptor]) -> Result<()>;
    /// `registry.referrers`: the manifests of `name` whose subject is `digest`, of
    /// `artifact_type` (all when empty), from the OCI 1.1 referrers API or its tag schema.
    fn referrers(&self, name: &str, digest: &str, artifact_type: &str) -> Result<Vec<Referrer>>;

    // --- content ---

    /// `content.info`: what the store knows of a blob; waits for a fetch in flight.
    fn content_info(&self, digest: &str) -> Result<ContentInfo>;
    /// `content.sizes`: the size (as `content_info` has it) of each of at most [`MAX_BATCH`]
    /// digests, in order, in one call. The outer error fails the whole call. The default asks
    /// `content_info` for each.
    fn content_sizes(&self, digests: &[String]) -> Result<Vec<Result<u64>>> {
        Ok(digests.iter().map(|d| self.content_info(d).map(|i| i.size)).collect())
    }
    /// `content.read`: up to `length` bytes from `offset`.
    fn content_read(&self, digest: &str, offset: u64, length: u32) -> Result<Vec<u8>>;
    /// `content.max-read`: the largest `length` `content_read` accepts.
    fn content_max_read(&self) -> u32;
    /// `content.set-labels`: sets (empty value: removes) labels on a blob.
    fn content_set_labels(&self, digest: &str, labels: &[(String, String)]) -> Result<()>;

    // --- snapshots ---

    /// `snapshots.name`: the snapshotter's name, for the GC label.
    fn snapshotter(&self) -> String;
    /// `snapshots.select`: later snapshot and diff calls of this call use the snapshotter
    /// `snapshotter` (one the host offers; before the call's first `snapshot_prepare`).
    fn snapshot_select(&self, snapshotter: &str) -> Result<()>;
    /// `snapshots.prepare`: an active snapshot `key` on top of `parent` (empty: none).
    fn snapshot_prepare(&self, key: &str, parent: &str) -> Result<()>;
    /// `snapshots.commit`: commits active `key` as `name`.
    fn snapshot_commit(&self, name: &str, key: &str) -> Result<()>;
    /// `snapshots.stat`: what the snapshotter knows of `key`.
    fn snapshot_stat(&self, key: &str) -> Result<SnapshotInfo>;
    /// `snapshots.stats`: `snapshot_stat` of each of at most [`MAX_BATCH`] keys, in order, in
    /// one call. The outer error fails the whole call. The default asks `snapshot_stat` for
    /// each.
    fn snapshot_stats(&self, keys: &[String]) -> Result<Vec<Result<SnapshotInfo>>> {
        Ok(keys.iter().map(|k| self.snapshot_stat(k)).collect())
    }
    /// `snapshots.remove`: removes a snapshot.
    fn snapshot_remove(&self, key: &str) -> Result<()>;

    // --- diff ---

    /// `diff.apply`: applies `layer` onto the active snapshot `key` this request prepared,
    /// returns its diff ID.
    fn diff_apply(&self, layer: &Descriptor, key: &str) -> Result<String>;

    // --- images ---

    /// `images.get`.
    fn image_get(&self, name: &str) -> Result<ImageRecord>;
    /// `images.list`.
    fn image_list(&self) -> Result<Vec<ImageRecord>>;
    /// `images.list-labels`: every record's name and the values of the labels `keys` (at
    /// most [`MAX_LIST_KEYS`]). The default takes them from `image_list`.
    fn image_list_labels(&self, keys: &[String]) -> Result<Vec<Labelled>> {
        Ok(self
            .image_list()?
            .into_iter()
            .map(|r| Labelled {
                values: keys.iter().map(|k| label(&r.labels, k).map(str::to_string)).collect(),
                name: r.name,
            })
            .collect())
    }
    /// `images.create`.
    fn image_create(&self, image: &ImageRecord) -> Result<ImageRecord>;
    /// `images.update`.
    fn image_update(&self, image: &ImageRecord) -> Result<ImageRecord>;
    /// `images.delete`.
    fn image_delete(&self, name: &str) -> Result<()>;

    // --- clock ---

    /// `clock.now`: the wall-clock time.
    fn now(&self) -> Instant;

    // --- log ---

    /// `log.log`.
    fn log(&self, level: Level, message: &str);
    /// `log.progress`.
    fn progress(&self, stage: &str, detail: &str);
}

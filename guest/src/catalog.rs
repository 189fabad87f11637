//! `image-status`, `list-images` and `remove-image`: answers from the image records.
//!
//! An image is the set of records whose `pullbox.io/image.id` label holds its ID (the
//! config digest): the record named by the ID itself, repo tags (`name:tag`) and repo
//! digests (`name@digest`). [`gather`] turns them into an [`ImageInfo`] from the labels a
//! pull wrote, so no manifest is read and no platform is needed. Records written by
//! anything but a pullbox puller (no such label: `ctr pull`, `ctr images import`, the
//! sandbox image containerd pulled) are images too, as containerd's CRI shows them: their
//! ID and the rest are derived from their target's content ([`crate::unlabelled`]), on every
//! call, so records that containerd or `ctr` add or remove beside pullbox show at once.
//!
//! An image is READY ([`is_ready`]) when its manifest and config are in the content store
//! and the snapshot named by its chain ID is committed; status and list answer only READY
//! images, so content or snapshots removed behind pullbox's back make an image disappear
//! instead of failing later in the runtime.
//!
//! An image is *pinned* (CRI `pinned`: kubelet never garbage-collects it) when one of its
//! records carries containerd CRI's label `io.cri-containerd.pinned=pinned`, or when one of
//! its names is among the names the caller passes (the default puller's `pinnedImages`
//! setting, see [`crate::settings`]): the setting takes effect for images already pulled,
//! and dropping a name from it unpins them.
//!
//! Status, list and remove read the records with `images.list-labels` ([`records`]): names
//! and the six labels of [`Record`] only, a fraction of what `images.list` would copy into
//! the guest. `list` scales with the number of records, not images × records: it groups the
//! records by image ID in one pass ([`by_image`]) and checks every image's readiness with a
//! few batched look-ups ([`ready_all`]: `content.sizes` and `snapshots.stats`, each shared
//! digest or chain ID asked once) instead of three host calls per image.
//!
//! An argument names an image ([`find_image_id`]) as containerd's CRI `localResolve` does:
//! a full digest is an image ID; `sha256:` plus hex is an ID prefix; anything else is a
//! reference first (`busybox` means `docker.io/library/busybox:latest`), and, when no record
//! has that name and the argument is all lowercase hex, an ID prefix. Two images matching a
//! prefix is `failed-precondition`.

use std::collections::{BTreeSet, HashMap};

use crate::digest;
use crate::error::{Error, Result, ResultExt};
use crate::host::{Host, MAX_BATCH};
use crate::labels;
use crate::reference::Reference;
use crate::types::{ImageInfo, Level, SnapshotKind};
use crate::unlabelled;

/// The labels of a record that the catalog reads, in the order of [`Record`]'s fields.
pub const RECORD_LABELS: [&str; 7] = [
    labels::IMAGE_ID,
    labels::IMAGE_MANIFEST,
    labels::IMAGE_CHAIN_ID,
    labels::IMAGE_SIZE,
    labels::IMAGE_USER,
    labels::CRI_PINNED,
    labels::IMAGE_SNAPSHOTTER,
];

/// An image record as the catalog reads it: its name and the values of its
/// [`RECORD_LABELS`] (`None`: the record has no such label).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The record's name: a repo tag, a repo digest or an image ID.
    pub name: String,
    /// `pullbox.io/image.id`: the ID of the image the record belongs to.
    pub id: Option<String>,
    /// `pullbox.io/image.manifest`.
    pub manifest: Option<String>,
    /// `pullbox.io/image.chain-id`.
    pub chain_id: Option<String>,
    /// `pullbox.io/image.size`.
    pub size: Option<String>,
    /// `pullbox.io/image.user`.
    pub user: Option<String>,
    /// `io.cri-containerd.pinned` is `pinned`.
    pub pinned: bool,
    /// `pullbox.io/image.snapshotter`: where the top snapshot is; `None`: the default
    /// snapshotter.
    pub snapshotter: Option<String>,
}

/// An image as its records describe it, and the snapshotter its top snapshot is in (`None`:
/// the host's default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub info: ImageInfo,
    pub snapshotter: Option<String>,
}

/// Every record, read with `images.list-labels` (see [`Record`]); those without pullbox's
/// labels filled in from content ([`unlabelled::fill`]; left with `id: None` when their
/// target is not an image on this node).
pub fn records<H: Host + ?Sized>(host: &H) -> Result<Vec<Record>> {
    let mut records = labelled(host)?;
    unlabelled::fill(host, &mut records)?;
    Ok(records)
}

/// Every record with the values of its [`RECORD_LABELS`], as `images.list-labels` has them.
fn labelled<H: Host + ?Sized>(host: &H) -> Result<Vec<Record>> {
    let keys: Vec<String> = RECORD_LABELS.iter().map(|k| k.to_string()).collect();
    Ok(host
        .image_list_labels(&keys)?
        .into_iter()
        .map(|l| {
            let mut values = l.values.into_iter();
            let mut next = || values.next().flatten();
            Record {
                id: next(),
                manifest: next(),
                chain_id: next(),
                size: next(),
                user: next(),
                pinned: next().as_deref() == Some(labels::CRI_PINNED_PINNED),
                snapshotter: next(),
                name: l.name,
            }
        })
        .collect())
}

/// The image `arg` names among `records`: its ID, or `None` when none does.
///
/// Errors: `invalid-argument` for an argument that is neither a reference nor an ID
/// (prefix); `failed-precondition` for an ambiguous ID prefix.
pub fn find_image_id(records: &[Record], arg: &str) -> Result<Option<String>> {
    if arg.is_empty() {
        return Err(Error::InvalidArgument("empty image reference".into()));
    }
    if digest::parse(arg).is_ok() {
        return by_id_prefix(records, arg);
    }
    if let Some((alg, hex)) = arg.split_once(':') {
        if matches!(alg, "sha256" | "sha512") && digest::is_lower_hex(hex) {
            return by_id_prefix(records, arg);
        }
    }
    match Reference::parse(arg) {
        Ok(reference) => {
            let name = reference.record_name();
            if let Some(record) = records.iter().find(|r| r.name == name) {
                if let Some(id) = &record.id {
                    return Ok(Some(id.clone()));
                }
            }
            if digest::is_lower_hex(arg) {
                return by_id_prefix(records, arg);
            }
            Ok(None)
        }
        // A 64-digit hex string is refused as a name: it is an ID.
        Err(_) if digest::is_lower_hex(arg) => by_id_prefix(records, arg),
        Err(e) => Err(e),
    }
}

/// The one image ID matching `query` (`sha256:<hex prefix>` or `<hex prefix>`).
fn by_id_prefix(records: &[Record], query: &str) -> Result<Option<String>> {
    let (alg, hex) = match query.split_once(':') {
        Some((alg, hex)) => (Some(alg), hex),
        None => (None, query),
    };
    let ids: BTreeSet<&str> = records
        .iter()
        .filter_map(|r| r.id.as_deref())
        .filter(|id| {
            let (id_alg, id_hex) = id.split_once(':').unwrap_or(("", id));
            alg.is_none_or(|a| a == id_alg) && id_hex.starts_with(hex)
        })
        .collect();
    match ids.len() {
        0 => Ok(None),
        1 => Ok(ids.into_iter().next().map(str::to_string)),
        n => Err(Error::FailedPrecondition(format!(
            "image ID prefix {query:?} is ambiguous: it matches {n} images ({})",
            ids.into_iter().collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The image `id` as its records describe it; `None` when it has none. `pinned`: the record
/// names the `pinnedImages` setting pins.
pub fn gather(records: &[Record], id: &str, pinned: &[String]) -> Option<Described> {
    let mine: Vec<Record> = records.iter().filter(|r| r.id.as_deref() == Some(id)).cloned().collect();
    describe(id.to_string(), mine, pinned)
}

/// Every image's records, by image ID, in one pass; records without an image ID (their
/// target is not an image on this node) are left out.
pub fn by_image(records: Vec<Record>) -> HashMap<String, Vec<Record>> {
    let mut images: HashMap<String, Vec<Record>> = HashMap::new();
    for mut r in records {
        if let Some(id) = r.id.take() {
            images.entry(id).or_default().push(r);
        }
    }
    images
}

/// The image `id` as `mine`, its records, describe it (their strings move into the answer);
/// `None` when there are none. `pinned`: the record names the `pinnedImages` setting pins.
fn describe(id: String, mut mine: Vec<Record>, pinned: &[String]) -> Option<Described> {
    let is_pinned = mine.iter().any(|r| r.pinned || pinned.contains(&r.name));
    // The metadata comes from the ID record when there is one (it moves with every pull of
    // the image), else from the first record by name.
    let meta = match mine.iter().position(|r| r.name == id) {
        Some(i) => i,
        None => (0..mine.len()).min_by(|&a, &b| mine[a].name.cmp(&mine[b].name))?,
    };
    let mut meta = mine.swap_remove(meta);
    let mut repo_tags = Vec::new();
    let mut repo_digests = Vec::new();
    let names = mine.into_iter().map(|r| r.name);
    for name in names.chain([std::mem::take(&mut meta.name)]) {
        if name == id || digest::parse(&name).is_ok() {
            continue;
        }
        // As containerd's CRI (`parseImageReferences`): names with a digest are repo
        // digests, names with a tag repo tags, and any other name (an image ID, an
        // import's bare repository, a name that is no reference) neither.
        if name.contains('@') {
            repo_digests.push(name);
        } else if name.rsplit('/').next().is_some_and(|last| last.contains(':')) {
            repo_tags.push(name);
        }
    }
    for names in [&mut repo_tags, &mut repo_digests] {
        names.sort_unstable();
        names.dedup();
    }
    let info = ImageInfo {
        id,
        repo_tags,
        repo_digests,
        size: meta.size.as_deref().unwrap_or_default().parse().unwrap_or(0),
        chain_id: meta.chain_id.unwrap_or_default(),
        manifest_digest: meta.manifest.unwrap_or_default(),
        user: meta.user.unwrap_or_default(),
        pinned: is_pinned,
    };
    Some(Described { info, snapshotter: meta.snapshotter })
}

/// Whether the image is READY: manifest and config present, top snapshot committed.
///
/// A missing piece is "not ready"; any other failure of the checks is logged as a warning
/// and also counts as not ready, so one broken image does not fail a whole list.
pub fn is_ready<H: Host + ?Sized>(host: &H, image: &Described) -> bool {
    let info = &image.info;
    let verdict = check(
        info,
        |d| host.content_info(d).map(drop),
        |key| {
            if let Some(name) = &image.snapshotter {
                host.snapshot_select(name).context_with(|| format!("snapshotter {name}"))?;
            }
            host.snapshot_stat(key).map(|s| s.kind)
        },
    );
    report(host, info, verdict)
}

/// [`is_ready`] of every image in `infos`, in order, from batched look-ups: every distinct
/// digest in `content.sizes` calls and every distinct chain ID in `snapshots.stats` calls,
/// at most [`MAX_BATCH`] a call, per snapshotter (images in another snapshotter than the
/// default are looked up after `snapshots.select` of theirs; one the host does not offer
/// makes its images not ready).
///
/// Errors: the error of a batched call that failed as a whole (a failure of one look-up
/// only makes its images not ready, as in [`is_ready`]).
pub fn ready_all<H: Host + ?Sized>(host: &H, images: &[Described]) -> Result<Vec<bool>> {
    // Each distinct digest and chain ID once, in first-seen order; chain IDs per snapshotter.
    let mut digests = Distinct::default();
    let mut chains: HashMap<Option<&str>, Distinct> = HashMap::new();
    for Described { info, snapshotter } in images {
        digests.add(&info.manifest_digest);
        digests.add(&info.id);
        chains.entry(snapshotter.as_deref()).or_default().add(&info.chain_id);
    }
    let mut sizes = Vec::with_capacity(digests.all.len());
    for batch in digests.all.chunks(MAX_BATCH) {
        let answers = host.content_sizes(batch).context_with(|| format!("looking up {} blobs", batch.len()))?;
        sizes.extend(answers.into_iter().map(|a| a.map(drop)));
    }
    // The default snapshotter's first, then each other one.
    let mut groups: Vec<(Option<&str>, Distinct)> = chains.into_iter().collect();
    groups.sort_unstable_by_key(|(name, _)| *name);
    let mut kinds: HashMap<Option<&str>, (Distinct, Vec<Result<SnapshotKind>>)> = HashMap::new();
    for (name, chains) in groups {
        let mut answers = Vec::with_capacity(chains.all.len());
        match name.map(|n| host.snapshot_select(n)) {
            Some(Err(e)) => {
                let e = e.context(format!("snapshotter {}", name.unwrap_or_default()));
                answers.resize(chains.all.len(), Err(e));
            }
            _ => {
                for batch in chains.all.chunks(MAX_BATCH) {
                    let got =
                        host.snapshot_stats(batch).context_with(|| format!("looking up {} snapshots", batch.len()))?;
                    answers.extend(got.into_iter().map(|a| a.map(|s| s.kind)));
                }
            }
        }
        kinds.insert(name, (chains, answers));
    }
    Ok(images
        .iter()
        .map(|Described { info, snapshotter }| {
            let verdict = check(
                info,
                |d| digests.answer(&sizes, d),
                |key| match kinds.get(&snapshotter.as_deref()) {
                    Some((chains, answers)) => chains.answer(answers, key),
                    None => Err(Error::Internal(format!("no look-up of snapshot {key}"))),
                },
            );
            report(host, info, verdict)
        })
        .collect())
}

/// Distinct non-empty strings in first-seen order, for batched look-ups.
#[derive(Default)]
struct Distinct<'a> {
    /// The strings, in order.
    all: Vec<String>,
    /// Where each is in `all`.
    at: HashMap<&'a str, usize>,
}

impl<'a> Distinct<'a> {
    fn add(&mut self, s: &'a str) {
        if !s.is_empty() && !self.at.contains_key(s) {
            self.at.insert(s, self.all.len());
            self.all.push(s.to_string());
        }
    }

    /// The answer about `s` among `answers` (one per string of `all`, in order).
    fn answer<T: Clone>(&self, answers: &[Result<T>], s: &str) -> Result<T> {
        self.at
            .get(s)
            .and_then(|&i| answers.get(i).cloned())
            .unwrap_or_else(|| Err(Error::Internal(format!("the host gave no answer for {s}"))))
    }
}

/// Why the image is not READY (what, and the error), given how to look up a blob and a
/// snapshot's kind; `Ok` when it is.
fn check(
    info: &ImageInfo,
    mut content: impl FnMut(&str) -> Result<()>,
    mut snapshot: impl FnMut(&str) -> Result<SnapshotKind>,
) -> std::result::Result<(), (String, Error)> {
    for (what, d) in [("manifest", &info.manifest_digest), ("config", &info.id)] {
        if d.is_empty() {
            return Err((format!("no {what} digest recorded"), Error::NotFound(String::new())));
        }
        content(d).map_err(|e| (format!("{what} {d}"), e))?;
    }
    if info.chain_id.is_empty() {
        return Ok(()); // an image without layers has no snapshot
    }
    let what = || format!("snapshot {}", info.chain_id);
    match snapshot(&info.chain_id) {
        Ok(SnapshotKind::Committed) => Ok(()),
        Ok(kind) => Err((what(), Error::FailedPrecondition(format!("it is {kind:?}, not committed")))),
        Err(e) => Err((what(), e)),
    }
}

/// Logs why an image is not ready (debug for a missing piece, warning for anything else);
/// whether it is ready.
fn report<H: Host + ?Sized>(host: &H, info: &ImageInfo, verdict: std::result::Result<(), (String, Error)>) -> bool {
    let Err((why, e)) = verdict else {
        return true;
    };
    let level = if e.is_not_found() { Level::Debug } else { Level::Warn };
    host.log(level, &format!("image {} is not ready: {why}: {e}", info.id));
    false
}

/// `image-status`: the READY image `arg` names, or `None`. `pinned`: the record names the
/// puller's settings pin.
pub fn status<H: Host + ?Sized>(host: &H, arg: &str, pinned: &[String]) -> Result<Option<ImageInfo>> {
    let records = records(host).context_with(|| format!("listing images for {arg:?}"))?;
    let Some(id) = find_image_id(&records, arg)? else {
        host.log(Level::Debug, &format!("status {arg:?}: no such image"));
        return Ok(None);
    };
    let Some(image) = gather(&records, &id, pinned) else {
        return Ok(None);
    };
    if !is_ready(host, &image) {
        return Ok(None);
    }
    host.log(Level::Debug, &format!("status {arg:?}: image {id}"));
    Ok(Some(image.info))
}

/// `list-images`: every READY image, sorted by ID. `pinned`: the record names the puller's
/// settings pin.
pub fn list<H: Host + ?Sized>(host: &H, pinned: &[String]) -> Result<Vec<ImageInfo>> {
    let records = records(host).context_with(|| "listing images")?;
    let mut by_id: Vec<(String, Vec<Record>)> = by_image(records).into_iter().collect();
    by_id.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
    let described: Vec<Described> = by_id.into_iter().filter_map(|(id, mine)| describe(id, mine, pinned)).collect();
    let ready = ready_all(host, &described)?;
    let images: Vec<ImageInfo> =
        described.into_iter().zip(ready).filter_map(|(image, ready)| ready.then_some(image.info)).collect();
    host.log(Level::Debug, &format!("list: {} ready images", images.len()));
    Ok(images)
}

/// `remove-image`: deletes every record of the image `arg` names; an unknown image is
/// fine.
pub fn remove<H: Host + ?Sized>(host: &H, arg: &str) -> Result<()> {
    let records = records(host).context_with(|| format!("listing images for {arg:?}"))?;
    let Some(id) = find_image_id(&records, arg)? else {
        host.log(Level::Info, &format!("remove {arg:?}: no such image, nothing to do"));
        return Ok(());
    };
    // The ID record last, so an interrupted remove still leaves the image findable by ID.
    let mut names: Vec<&str> =
        records.iter().filter(|r| r.id.as_deref() == Some(id.as_str())).map(|r| r.name.as_str()).collect();
    names.sort_by_key(|n| (*n == id, *n));
    for name in &names {
        match host.image_delete(name) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.context(format!("removing image record {name} of {id}"))),
        }
    }
    host.log(Level::Info, &format!("removed image {id} ({} records: {})", names.len(), names.join(", ")));
    Ok(())
}

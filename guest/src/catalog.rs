//! `image-status`, `list-images` and `remove-image`: answers from the image records.
//!
//! An image is the set of records whose `pullbox.io/image.id` label holds its ID (the
//! config digest): the record named by the ID itself, repo tags (`name:tag`) and repo
//! digests (`name@digest`). [`gather`] turns them into an [`ImageInfo`] from the labels a
//! pull wrote, so no manifest is read and no platform is needed. Records written by
//! anything but a pullbox puller (no such label) are not pullbox's images and are ignored.
//!
//! An image is READY ([`is_ready`]) when its manifest and config are in the content store
//! and the snapshot named by its chain ID is committed; status and list answer only READY
//! images, so content or snapshots removed behind pullbox's back make an image disappear
//! instead of failing later in the runtime.
//!
//! An argument names an image ([`find_image_id`]) as containerd's CRI `localResolve` does:
//! a full digest is an image ID; `sha256:` plus hex is an ID prefix; anything else is a
//! reference first (`busybox` means `docker.io/library/busybox:latest`), and, when no record
//! has that name and the argument is all lowercase hex, an ID prefix. Two images matching a
//! prefix is `failed-precondition`.

use std::collections::BTreeSet;

use crate::digest;
use crate::error::{Error, Result, ResultExt};
use crate::host::Host;
use crate::labels;
use crate::reference::Reference;
use crate::types::{label, ImageInfo, ImageRecord, Level, SnapshotKind};

/// The image `arg` names among `records`: its ID, or `None` when none does.
///
/// Errors: `invalid-argument` for an argument that is neither a reference nor an ID
/// (prefix); `failed-precondition` for an ambiguous ID prefix.
pub fn find_image_id(records: &[ImageRecord], arg: &str) -> Result<Option<String>> {
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
                if let Some(id) = label(&record.labels, labels::IMAGE_ID) {
                    return Ok(Some(id.to_string()));
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
fn by_id_prefix(records: &[ImageRecord], query: &str) -> Result<Option<String>> {
    let (alg, hex) = match query.split_once(':') {
        Some((alg, hex)) => (Some(alg), hex),
        None => (None, query),
    };
    let ids: BTreeSet<&str> = records
        .iter()
        .filter_map(|r| label(&r.labels, labels::IMAGE_ID))
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

/// The image `id` as its records describe it; `None` when it has none.
pub fn gather(records: &[ImageRecord], id: &str) -> Option<ImageInfo> {
    let mine: Vec<&ImageRecord> = records
        .iter()
        .filter(|r| label(&r.labels, labels::IMAGE_ID) == Some(id))
        .collect();
    // The metadata comes from the ID record when there is one (it moves with every pull of
    // the image), else from the first record by name.
    let meta = mine
        .iter()
        .find(|r| r.name == id)
        .or_else(|| mine.iter().min_by(|a, b| a.name.cmp(&b.name)))?;
    let get = |key| label(&meta.labels, key).unwrap_or_default().to_string();
    let mut repo_tags = BTreeSet::new();
    let mut repo_digests = BTreeSet::new();
    for r in &mine {
        if r.name == id {
            continue;
        }
        if r.name.contains('@') {
            repo_digests.insert(r.name.clone());
        } else {
            repo_tags.insert(r.name.clone());
        }
    }
    Some(ImageInfo {
        id: id.to_string(),
        repo_tags: repo_tags.into_iter().collect(),
        repo_digests: repo_digests.into_iter().collect(),
        size: get(labels::IMAGE_SIZE).parse().unwrap_or(0),
        chain_id: get(labels::IMAGE_CHAIN_ID),
        manifest_digest: get(labels::IMAGE_MANIFEST),
        user: get(labels::IMAGE_USER),
        pinned: false,
    })
}

/// Whether the image is READY: manifest and config present, top snapshot committed.
///
/// A missing piece is "not ready"; any other failure of the checks is logged as a warning
/// and also counts as not ready, so one broken image does not fail a whole list.
pub fn is_ready<H: Host + ?Sized>(host: &H, info: &ImageInfo) -> bool {
    let not_ready = |why: String, e: &Error| {
        let level = if e.is_not_found() {
            Level::Debug
        } else {
            Level::Warn
        };
        host.log(
            level,
            &format!("image {} is not ready: {why}: {e}", info.id),
        );
        false
    };
    for (what, d) in [("manifest", &info.manifest_digest), ("config", &info.id)] {
        if d.is_empty() {
            return not_ready(
                format!("no {what} digest recorded"),
                &Error::NotFound(String::new()),
            );
        }
        if let Err(e) = host.content_info(d) {
            return not_ready(format!("{what} {d}"), &e);
        }
    }
    if info.chain_id.is_empty() {
        return true; // an image without layers has no snapshot
    }
    match host.snapshot_stat(&info.chain_id) {
        Ok(s) if s.kind == SnapshotKind::Committed => true,
        Ok(s) => not_ready(
            format!("snapshot {}", info.chain_id),
            &Error::FailedPrecondition(format!("it is {:?}, not committed", s.kind)),
        ),
        Err(e) => not_ready(format!("snapshot {}", info.chain_id), &e),
    }
}

/// `image-status`: the READY image `arg` names, or `None`.
pub fn status<H: Host + ?Sized>(host: &H, arg: &str) -> Result<Option<ImageInfo>> {
    let records = host
        .image_list()
        .context_with(|| format!("listing images for {arg:?}"))?;
    let Some(id) = find_image_id(&records, arg)? else {
        host.log(Level::Debug, &format!("status {arg:?}: no such image"));
        return Ok(None);
    };
    let Some(info) = gather(&records, &id) else {
        return Ok(None);
    };
    if !is_ready(host, &info) {
        return Ok(None);
    }
    host.log(Level::Debug, &format!("status {arg:?}: image {id}"));
    Ok(Some(info))
}

/// `list-images`: every READY image, sorted by ID.
pub fn list<H: Host + ?Sized>(host: &H) -> Result<Vec<ImageInfo>> {
    let records = host.image_list().context_with(|| "listing images")?;
    let ids: BTreeSet<&str> = records
        .iter()
        .filter_map(|r| label(&r.labels, labels::IMAGE_ID))
        .collect();
    let mut images = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(info) = gather(&records, id) {
            if is_ready(host, &info) {
                images.push(info);
            }
        }
    }
    host.log(
        Level::Debug,
        &format!("list: {} ready images", images.len()),
    );
    Ok(images)
}

/// `remove-image`: deletes every record of the image `arg` names; an unknown image is
/// fine.
pub fn remove<H: Host + ?Sized>(host: &H, arg: &str) -> Result<()> {
    let records = host
        .image_list()
        .context_with(|| format!("listing images for {arg:?}"))?;
    let Some(id) = find_image_id(&records, arg)? else {
        host.log(
            Level::Info,
            &format!("remove {arg:?}: no such image, nothing to do"),
        );
        return Ok(());
    };
    // The ID record last, so an interrupted remove still leaves the image findable by ID.
    let mut names: Vec<&str> = records
        .iter()
        .filter(|r| label(&r.labels, labels::IMAGE_ID) == Some(id.as_str()))
        .map(|r| r.name.as_str())
        .collect();
    names.sort_by_key(|n| (*n == id, *n));
    for name in &names {
        match host.image_delete(name) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.context(format!("removing image record {name} of {id}"))),
        }
    }
    host.log(
        Level::Info,
        &format!(
            "removed image {id} ({} records: {})",
            names.len(),
            names.join(", ")
        ),
    );
    Ok(())
}

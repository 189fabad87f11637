//! Image records without pullbox's labels (pulled by `ctr`, imported with `ctr images
//! import`, the sandbox image containerd pulled itself, images from before the switch):
//! what the catalog needs of them, read from content.
//!
//! containerd's CRI shows every image record in its namespace, grouped by config digest,
//! whoever wrote it; so does pullbox's catalog. A record that a pullbox pull wrote carries
//! the image ID, manifest, chain ID, size and user as labels ([`crate::labels`]); for any
//! other record [`fill`] derives the same from its target, as containerd's CRI does for
//! every image (`getImage`: `RootFS` → chain ID, `Size`, `Config`):
//!
//! - a manifest target: its config (the image ID) and its layers;
//! - an index target: the manifest entry that is unpacked here. The read-only exports are
//!   not told the node's platform, so the entry is chosen by what is on the node: of the
//!   manifest entries whose blob is present (one `content.sizes` call), the only one, or,
//!   when several are, the first in index order whose chain ID snapshot is committed, and
//!   else the first. `ctr pull` and `ctr images import` fetch and unpack only the node's
//!   platform unless told otherwise, so this is the entry containerd's `platforms.Default()`
//!   picks. Indexes nested in an index are not followed: such a record is left out.
//! - size as [`crate::pull::image_size`] counts it (root, chosen manifest, config, layers);
//!   user from the config.
//!
//! Cost: the targets come from `images.get` per unlabelled record, or from one
//! `images.list` when there are more than [`GET_EACH_UP_TO`] of them; each distinct target
//! is read once per call (two small reads for a manifest; for an index one more read, a
//! `content.sizes` and, only with several platforms present, a few `snapshots.stat`). A
//! record whose target cannot be read as an image (missing content, an artifact, a
//! malformed document) is logged at debug level and left out, as containerd's CRI leaves out
//! images whose content is incomplete; it never fails a whole list.

use std::collections::HashMap;

use crate::blob::read_small;
use crate::catalog::Record;
use crate::digest;
use crate::error::{Error, Result};
use crate::host::Host;
use crate::oci::{self, Kind};
use crate::pull::image_size;
use crate::types::{Descriptor, Level, SnapshotKind};

/// Up to this many unlabelled records, their targets are read with one `images.get` each;
/// with more, one `images.list` is cheaper than that many calls (a record is a few hundred
/// bytes, a call tens of microseconds).
pub const GET_EACH_UP_TO: usize = 32;

/// What a pullbox pull would have labelled a record with, derived from its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// The config digest: the image ID.
    pub id: String,
    /// The manifest the image is unpacked from.
    pub manifest: String,
    /// The top chain ID; empty for an image without layers.
    pub chain_id: String,
    /// The size, as containerd's CRI counts it.
    pub size: u64,
    /// The config's `User`.
    pub user: String,
}

/// Fills the fields of every record in `records` that has no image ID label from its
/// target's content; records whose target cannot be read as an image keep `id: None`.
///
/// Errors: those of `images.list` (a failed `images.get` or content look-up only leaves
/// its record out).
pub fn fill<H: Host + ?Sized>(host: &H, records: &mut [Record]) -> Result<()> {
    let missing: Vec<usize> = (0..records.len()).filter(|&i| records[i].id.is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let targets: HashMap<String, Descriptor> = if missing.len() <= GET_EACH_UP_TO {
        let mut targets = HashMap::new();
        for &i in &missing {
            let name = &records[i].name;
            match host.image_get(name) {
                Ok(r) => {
                    targets.insert(r.name, r.target);
                }
                Err(e) => host.log(Level::Debug, &format!("image record {name}: {e}")),
            }
        }
        targets
    } else {
        host.image_list()?.into_iter().map(|r| (r.name, r.target)).collect()
    };
    let mut by_target: HashMap<String, Option<Derived>> = HashMap::new();
    for i in missing {
        let record = &mut records[i];
        let Some(target) = targets.get(&record.name) else {
            continue;
        };
        let derived = by_target.entry(target.digest.clone()).or_insert_with(|| match derive(host, target) {
            Ok(d) => Some(d),
            Err(e) => {
                host.log(
                    Level::Debug,
                    &format!("image record {} (target {}) is left out: {e}", record.name, target.digest),
                );
                None
            }
        });
        if let Some(d) = derived {
            record.id = Some(d.id.clone());
            record.manifest = Some(d.manifest.clone());
            record.chain_id = Some(d.chain_id.clone());
            record.size = Some(d.size.to_string());
            record.user = Some(d.user.clone());
        }
    }
    Ok(())
}

/// What the image `root` points at is, read from content (see the module docs).
///
/// Errors: `not-found` for missing blobs or an index with no manifest present;
/// `invalid-argument` for a root or manifest that is not a container image;
/// `failed-precondition` for malformed documents; those of reading blobs.
pub fn derive<H: Host + ?Sized>(host: &H, root: &Descriptor) -> Result<Derived> {
    if root.digest.is_empty() {
        return Err(Error::InvalidArgument("the record has no target".into()));
    }
    let mut kind = oci::kind_of(&root.media_type);
    let mut root_bytes = None;
    if kind == Kind::Unknown && oci::is_generic_json(&root.media_type) {
        let bytes = read_small(host, root, "root manifest")?;
        kind = oci::sniff(&bytes);
        root_bytes = Some(bytes);
    }
    let (path, manifest_desc, manifest, config) = match kind {
        Kind::Manifest => {
            let bytes = match root_bytes {
                Some(b) => b,
                None => read_small(host, root, "manifest")?,
            };
            let manifest = oci::parse_manifest(root, &bytes)?;
            let config = read_config(host, root, &manifest)?;
            (vec![root.clone()], root.clone(), manifest, config)
        }
        Kind::Index => {
            let bytes = match root_bytes {
                Some(b) => b,
                None => read_small(host, root, "index")?,
            };
            let (chosen, manifest, config) = in_index(host, root, &bytes)?;
            (vec![root.clone(), chosen.clone()], chosen, manifest, config)
        }
        Kind::Schema1 | Kind::Unknown => {
            return Err(Error::InvalidArgument(format!(
                "{} of media type {:?} is not an image index or manifest",
                root.digest, root.media_type
            )))
        }
    };
    Ok(Derived {
        id: manifest.config.digest.clone(),
        manifest: manifest_desc.digest,
        chain_id: digest::chain_ids(&config.diff_ids).pop().unwrap_or_default(),
        size: image_size(&path, &manifest),
        user: config.user,
    })
}

/// The config of `manifest` (read from `desc`), checked to be an image config that lists
/// one diff ID per layer.
fn read_config<H: Host + ?Sized>(host: &H, desc: &Descriptor, manifest: &oci::Manifest) -> Result<oci::Config> {
    if !oci::is_image_config(&manifest.config.media_type) {
        return Err(Error::InvalidArgument(format!(
            "manifest {} has a config of media type {:?}: not a container image",
            desc.digest, manifest.config.media_type
        )));
    }
    let bytes = read_small(host, &manifest.config, "config")?;
    let config = oci::parse_config(&manifest.config, &bytes)?;
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(Error::FailedPrecondition(format!(
            "config {} lists {} diff IDs but manifest {} has {} layers",
            manifest.config.digest,
            config.diff_ids.len(),
            desc.digest,
            manifest.layers.len()
        )));
    }
    Ok(config)
}

/// The manifest entry of index `root` (its bytes: `bytes`) that is on the node (see the
/// module docs), with its manifest and config.
fn in_index<H: Host + ?Sized>(
    host: &H,
    root: &Descriptor,
    bytes: &[u8],
) -> Result<(Descriptor, oci::Manifest, oci::Config)> {
    let index = oci::parse_index(root, bytes)?;
    let entries: Vec<Descriptor> = index
        .manifests
        .into_iter()
        .filter(|d| oci::kind_of(&d.media_type) == Kind::Manifest)
        .take(crate::host::MAX_BATCH)
        .collect();
    let digests: Vec<String> = entries.iter().map(|d| d.digest.clone()).collect();
    let present: Vec<&Descriptor> = host
        .content_sizes(&digests)?
        .into_iter()
        .zip(&entries)
        .filter_map(|(size, d)| matches!(size, Ok(s) if s == d.size).then_some(d))
        .collect();
    let mut first = None;
    for entry in &present {
        let read = read_small(host, entry, "manifest")
            .and_then(|b| oci::parse_manifest(entry, &b))
            .and_then(|m| read_config(host, entry, &m).map(|c| (m, c)));
        let (manifest, config) = match read {
            Ok(mc) => mc,
            Err(e) if present.len() > 1 => {
                host.log(Level::Debug, &format!("index {}: entry {} skipped: {e}", root.digest, entry.digest));
                continue;
            }
            Err(e) => return Err(e),
        };
        if present.len() == 1 {
            return Ok(((*entry).clone(), manifest, config));
        }
        let top = digest::chain_ids(&config.diff_ids).pop();
        let unpacked = match &top {
            None => true,
            Some(top) => matches!(
                host.snapshot_stat(top),
                Ok(s) if s.kind == SnapshotKind::Committed
            ),
        };
        if unpacked {
            return Ok(((*entry).clone(), manifest, config));
        }
        first.get_or_insert(((*entry).clone(), manifest, config));
    }
    first.ok_or_else(|| {
        Error::NotFound(format!(
            "index {}: none of its {} manifests is in the content store",
            root.digest,
            entries.len()
        ))
    })
}

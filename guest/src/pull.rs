//! `pull-image`: resolve, pick the platform's manifest, fetch, unpack, label, record.
//!
//! The order follows cri-containerd's `PullImage` and containerd's unpacker:
//!
//! 1. normalize the reference ([`Reference`]) and resolve it to the root descriptor;
//! 2. for an index (OCI) or manifest list (Docker), read it and pick the manifest for the
//!    requested platform ([`platform::select`]), fetch and read that manifest;
//! 3. fetch the config and every layer in one batch (the host downloads them in parallel
//!    and returns at once), read the config, check it lists one diff ID per layer;
//! 4. for each layer, bottom first: skip it when the snapshot named by its chain ID is
//!    committed; otherwise prepare `extract-<chain hex>` on the parent chain ID, apply the
//!    layer, check the diff ID the host computed against the config, commit as the chain ID;
//! 5. set containerd's GC labels (index → manifest, manifest → config and layers, config →
//!    top snapshot), then write the image records: the image ID (config digest), the repo
//!    tag and the repo digest (`name@<root digest>`), in that order, as containerd's CRI.
//!
//! The records carry the `pullbox.io/image.*` labels ([`crate::labels`]) that status and list
//! read. Everything a pull writes belongs to the host's lease for the request until the
//! records exist, so a failure here leaves no garbage behind.
//!
//! Size ([`image_size`]) is what containerd 1.6's CRI reports as `Image.size`: its
//! `images.Image.Size` walks the image for the platform with
//! `LimitManifests(FilterPlatforms(ChildrenHandler), platform, 1)` and adds up the `size` of
//! every descriptor it visits: the root (index or manifest), the one chosen manifest under
//! an index, the config and every layer (compressed sizes, repeated layers counted again).

use crate::blob::read_small;
use crate::digest;
use crate::error::{Error, Result, ResultExt};
use crate::host::Host;
use crate::labels;
use crate::oci::{self, Kind};
use crate::platform;
use crate::reference::Reference;
use crate::settings::Settings;
use crate::types::{
    Descriptor, ImageInfo, ImageRecord, Level, Platform, PullRequest, SnapshotKind,
};

/// Prefix of the key of an active snapshot a layer is unpacked into; the chain ID's hex
/// follows.
pub const EXTRACT_KEY_PREFIX: &str = "extract-";

/// What `pull` resolved and read, before unpacking.
struct Resolved {
    root: Descriptor,
    /// The chosen index entry, when the root is an index.
    from_index: Option<Descriptor>,
    manifest_desc: Descriptor,
    manifest: oci::Manifest,
}

/// Pulls the image `req` names, with `settings`, through `host`.
///
/// Errors: `invalid-argument` for a malformed reference or platform, or a root that is not
/// an image; `failed-precondition` for schema 1 manifests, malformed documents, a diff ID
/// that does not match; `not-found` when the index has no manifest for the platform;
/// `resource-exhausted` for metadata blobs over 4 MiB; any error of the imports, with the
/// reference or digest it concerns.
pub fn pull<H: Host + ?Sized>(
    host: &H,
    settings: &Settings,
    req: &PullRequest,
) -> Result<ImageInfo> {
    let reference = Reference::parse(&req.reference)?;
    let want = request_platform(&req.platform);
    host.log(
        Level::Info,
        &format!("pulling {reference} for {}", platform::display(&want)),
    );
    let resolved = resolve(host, &reference, &want)?;
    let id = resolved.manifest.config.digest.clone();
    let name = reference.name();

    // One batch: config and layers, each blob once.
    let mut batch: Vec<Descriptor> = Vec::with_capacity(resolved.manifest.layers.len() + 1);
    for d in std::iter::once(&resolved.manifest.config).chain(&resolved.manifest.layers) {
        if !batch.iter().any(|b| b.digest == d.digest) {
            batch.push(d.clone());
        }
    }
    host.log(
        Level::Debug,
        &format!(
            "fetching config {id} and {} layers of {reference}",
            resolved.manifest.layers.len()
        ),
    );
    host.progress("fetching", &format!("{} blobs", batch.len()));
    host.fetch(&name, &batch)
        .context_with(|| format!("fetching config and layers of {reference}"))?;

    let config_bytes = read_small(host, &resolved.manifest.config, "config")?;
    let config = oci::parse_config(&resolved.manifest.config, &config_bytes)?;
    if config.diff_ids.len() != resolved.manifest.layers.len() {
        return Err(Error::FailedPrecondition(format!(
            "{reference}: config {id} lists {} diff IDs but manifest {} has {} layers",
            config.diff_ids.len(),
            resolved.manifest_desc.digest,
            resolved.manifest.layers.len()
        )));
    }
    let chain = digest::chain_ids(&config.diff_ids);
    unpack(
        host,
        &reference,
        &resolved.manifest.layers,
        &config.diff_ids,
        &chain,
    )?;
    let top = chain.last().cloned().unwrap_or_default();

    set_gc_labels(host, settings, &resolved, &top)?;

    let size = image_size(
        &resolved.root,
        resolved.from_index.as_ref(),
        &resolved.manifest,
    );
    let record_labels = vec![
        (
            labels::CRI_IMAGE.to_string(),
            labels::CRI_IMAGE_MANAGED.to_string(),
        ),
        (labels::IMAGE_ID.to_string(), id.clone()),
        (
            labels::IMAGE_MANIFEST.to_string(),
            resolved.manifest_desc.digest.clone(),
        ),
        (labels::IMAGE_CHAIN_ID.to_string(), top.clone()),
        (labels::IMAGE_SIZE.to_string(), size.to_string()),
        (labels::IMAGE_USER.to_string(), config.user.clone()),
    ];
    let mut names = vec![id.clone()];
    names.extend(reference.repo_tag());
    names.push(reference.repo_digest(&resolved.root.digest));
    for record_name in &names {
        write_record(host, record_name, &resolved.root, &record_labels)?;
    }

    let records = host
        .image_list()
        .context_with(|| format!("listing images after pulling {reference}"))?;
    let info = crate::catalog::gather(&records, &id).ok_or_else(|| {
        Error::Internal(format!(
            "image {id} has no records right after pulling {reference}"
        ))
    })?;
    host.log(
        Level::Info,
        &format!(
            "pulled {reference}: image {id}, manifest {}, {size} bytes, {} layers",
            resolved.manifest_desc.digest,
            chain.len()
        ),
    );
    host.progress("done", &id);
    Ok(info)
}

/// The requested platform, with `linux` for an empty OS.
fn request_platform(p: &Platform) -> Platform {
    let mut p = p.clone();
    if p.os.is_empty() {
        p.os = "linux".into();
    }
    p
}

/// Steps 1 and 2: the root, and the manifest for the platform.
fn resolve<H: Host + ?Sized>(host: &H, reference: &Reference, want: &Platform) -> Result<Resolved> {
    let name = reference.name();
    host.progress("resolving", &reference.to_string());
    let root = host
        .resolve(&name, reference.resolve_target())
        .context_with(|| format!("resolving {reference}"))?;
    if let Some(d) = reference.digest() {
        if root.digest != d {
            return Err(Error::FailedPrecondition(format!(
                "resolving {reference}: the registry returned {} instead",
                root.digest
            )));
        }
    }
    host.log(
        Level::Debug,
        &format!(
            "resolved {reference} to {} ({}, {} bytes)",
            root.digest, root.media_type, root.size
        ),
    );
    host.progress("resolved", &root.digest);

    let mut kind = oci::kind_of(&root.media_type);
    let mut root_bytes = None;
    if kind == Kind::Unknown && oci::is_generic_json(&root.media_type) {
        let bytes = read_small(host, &root, "root manifest")?;
        kind = oci::sniff(&bytes);
        host.log(
            Level::Debug,
            &format!(
                "{}: media type {:?} read as {kind:?}",
                root.digest, root.media_type
            ),
        );
        root_bytes = Some(bytes);
    }
    match kind {
        Kind::Schema1 => Err(Error::FailedPrecondition(format!(
            "{reference} resolves to {}, a Docker schema 1 manifest ({}): schema 1 is deprecated \
             and not supported; push the image again as Docker schema 2 or OCI",
            root.digest, root.media_type
        ))),
        Kind::Unknown => Err(Error::InvalidArgument(format!(
            "{reference} resolves to {} of media type {:?}, which is not an image index or manifest",
            root.digest, root.media_type
        ))),
        Kind::Manifest => {
            let bytes = match root_bytes {
                Some(b) => b,
                None => read_small(host, &root, "manifest")?,
            };
            let manifest = oci::parse_manifest(&root, &bytes)?;
            check_manifest(reference, &root, &manifest)?;
            Ok(Resolved { manifest_desc: root.clone(), root, from_index: None, manifest })
        }
        Kind::Index => {
            let bytes = match root_bytes {
                Some(b) => b,
                None => read_small(host, &root, "index")?,
            };
            let index = oci::parse_index(&root, &bytes)?;
            let manifests: Vec<Descriptor> = index
                .manifests
                .iter()
                .filter(|d| oci::kind_of(&d.media_type) == Kind::Manifest)
                .cloned()
                .collect();
            if want.architecture.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{reference} is a multi-platform index and the request names no architecture"
                )));
            }
            let chosen = match platform::select(want, &manifests) {
                Some(i) => manifests[i].clone(),
                None => {
                    let have: Vec<String> = manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(platform::display))
                        .collect();
                    return Err(Error::NotFound(format!(
                        "{reference}: index {} has no manifest for platform {} (it has: {})",
                        root.digest,
                        platform::display(want),
                        if have.is_empty() { "none".to_string() } else { have.join(", ") }
                    )));
                }
            };
            host.log(
                Level::Debug,
                &format!(
                    "{reference}: chose manifest {} ({}) of {} in index {} for {}",
                    chosen.digest,
                    chosen.platform.as_ref().map(platform::display).unwrap_or_default(),
                    index.manifests.len(),
                    root.digest,
                    platform::display(want)
                ),
            );
            host.fetch(&name, std::slice::from_ref(&chosen))
                .context_with(|| format!("fetching manifest {} of {reference}", chosen.digest))?;
            let bytes = read_small(host, &chosen, "manifest")?;
            let manifest = oci::parse_manifest(&chosen, &bytes)?;
            check_manifest(reference, &chosen, &manifest)?;
            Ok(Resolved { root, from_index: Some(chosen.clone()), manifest_desc: chosen, manifest })
        }
    }
}

/// Refuses manifests that are not container images or whose layers `diff.apply` cannot
/// unpack, before anything is fetched.
fn check_manifest(reference: &Reference, desc: &Descriptor, m: &oci::Manifest) -> Result<()> {
    if !oci::is_image_config(&m.config.media_type) {
        return Err(Error::InvalidArgument(format!(
            "{reference}: manifest {} has a config of media type {:?}: not a container image",
            desc.digest, m.config.media_type
        )));
    }
    if let Some(layer) = m.layers.iter().find(|l| !oci::is_layer(&l.media_type)) {
        return Err(Error::InvalidArgument(format!(
            "{reference}: layer {} of manifest {} has unsupported media type {:?}",
            layer.digest, desc.digest, layer.media_type
        )));
    }
    Ok(())
}

/// Step 4: one committed snapshot per layer, named by its chain ID.
fn unpack<H: Host + ?Sized>(
    host: &H,
    reference: &Reference,
    layers: &[Descriptor],
    diff_ids: &[String],
    chain: &[String],
) -> Result<()> {
    for (i, layer) in layers.iter().enumerate() {
        let chain_id = &chain[i];
        let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
        match host.snapshot_stat(chain_id) {
            Ok(info) if info.kind == SnapshotKind::Committed => {
                host.log(
                    Level::Debug,
                    &format!(
                        "layer {} of {reference}: snapshot {chain_id} is committed, skipped",
                        layer.digest
                    ),
                );
                host.progress("skipped", &layer.digest);
                continue;
            }
            Ok(info) => host.log(
                Level::Debug,
                &format!(
                    "snapshot {chain_id} exists as {:?}, not committed; unpacking again",
                    info.kind
                ),
            ),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                return Err(e.context(format!("looking up snapshot {chain_id} of {reference}")))
            }
        }

        let key = format!("{EXTRACT_KEY_PREFIX}{}", digest::hex_part(chain_id));
        let mounts = match host.snapshot_prepare(&key, parent) {
            Err(e) if e.is_already_exists() => {
                host.log(
                    Level::Debug,
                    &format!("removing stale active snapshot {key}"),
                );
                remove_key(host, &key);
                host.snapshot_prepare(&key, parent)
            }
            other => other,
        }
        .context_with(|| {
            format!(
                "preparing snapshot {key} for layer {} of {reference}",
                layer.digest
            )
        })?;

        host.log(
            Level::Debug,
            &format!(
                "applying layer {} ({}, {} bytes) onto {key}",
                layer.digest, layer.media_type, layer.size
            ),
        );
        host.progress("unpacking", &layer.digest);
        let diff_id = match host.diff_apply(layer, &mounts) {
            Ok(d) => d,
            Err(e) => {
                remove_key(host, &key);
                return Err(e.context(format!("applying layer {} of {reference}", layer.digest)));
            }
        };
        if diff_id != diff_ids[i] {
            remove_key(host, &key);
            return Err(Error::FailedPrecondition(format!(
                "layer {} of {reference} unpacked to diff ID {diff_id}, but the config lists {}",
                layer.digest, diff_ids[i]
            )));
        }
        match host.snapshot_commit(chain_id, &key) {
            Ok(()) => {}
            Err(e) if e.is_already_exists() => {
                host.log(
                    Level::Debug,
                    &format!("snapshot {chain_id} was committed by another pull; dropping {key}"),
                );
                remove_key(host, &key);
            }
            Err(e) => {
                remove_key(host, &key);
                return Err(e.context(format!("committing snapshot {chain_id} of {reference}")));
            }
        }
        host.progress("unpacked", &layer.digest);
    }
    Ok(())
}

/// Removes an active snapshot, best effort: a failure is logged (the pull's lease collects
/// it anyway).
fn remove_key<H: Host + ?Sized>(host: &H, key: &str) {
    match host.snapshot_remove(key) {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => host.log(Level::Warn, &format!("removing snapshot {key}: {e}")),
    }
}

/// Step 5a: containerd's GC labels on index, manifest and config.
fn set_gc_labels<H: Host + ?Sized>(
    host: &H,
    settings: &Settings,
    r: &Resolved,
    top: &str,
) -> Result<()> {
    if let Some(chosen) = &r.from_index {
        let labels = vec![(labels::gc_manifest(0), chosen.digest.clone())];
        host.content_set_labels(&r.root.digest, &labels)
            .context_with(|| format!("labelling index {}", r.root.digest))?;
    }
    let mut labels = vec![(
        labels::GC_CONFIG.to_string(),
        r.manifest.config.digest.clone(),
    )];
    for (i, layer) in r.manifest.layers.iter().enumerate() {
        // With discard_unpacked_layers, an empty value removes a reference left by an
        // earlier pull, so the layer blobs go once nothing else holds them.
        let value = if settings.discard_unpacked_layers {
            String::new()
        } else {
            layer.digest.clone()
        };
        labels.push((labels::gc_layer(i), value));
    }
    host.content_set_labels(&r.manifest_desc.digest, &labels)
        .context_with(|| format!("labelling manifest {}", r.manifest_desc.digest))?;
    if !top.is_empty() {
        let labels = vec![(labels::gc_snapshot(&host.snapshotter()), top.to_string())];
        host.content_set_labels(&r.manifest.config.digest, &labels)
            .context_with(|| format!("labelling config {}", r.manifest.config.digest))?;
    }
    host.log(
        Level::Debug,
        &format!(
            "GC labels set on {}{} and config {}{}",
            if r.from_index.is_some() {
                "index, "
            } else {
                ""
            },
            r.manifest_desc.digest,
            r.manifest.config.digest,
            if settings.discard_unpacked_layers {
                " (layers discarded)"
            } else {
                ""
            }
        ),
    );
    Ok(())
}

/// The image size containerd 1.6's CRI reports (see the module doc): root, chosen manifest
/// under an index, config and layers.
pub fn image_size(root: &Descriptor, from_index: Option<&Descriptor>, m: &oci::Manifest) -> u64 {
    root.size
        + from_index.map_or(0, |d| d.size)
        + m.config.size
        + m.layers.iter().map(|l| l.size).sum::<u64>()
}

/// Creates the record `name`, or moves an existing one to `target` with `labels` (labels
/// the record has beyond these stay), as containerd CRI's `createImageReference`.
fn write_record<H: Host + ?Sized>(
    host: &H,
    name: &str,
    target: &Descriptor,
    labels: &[(String, String)],
) -> Result<()> {
    let record = ImageRecord {
        name: name.to_string(),
        target: target.clone(),
        labels: labels.to_vec(),
        created_at: 0,
        updated_at: 0,
    };
    match host.image_create(&record) {
        Ok(_) => {
            host.log(
                Level::Debug,
                &format!("created image record {name} -> {}", target.digest),
            );
            return Ok(());
        }
        Err(e) if e.is_already_exists() => {}
        Err(e) => return Err(e.context(format!("creating image record {name}"))),
    }
    let old = host
        .image_get(name)
        .context_with(|| format!("reading image record {name}"))?;
    let mut merged = old.labels.clone();
    for (k, v) in labels {
        crate::types::set_label(&mut merged, k, v);
    }
    if old.target.digest == target.digest && merged == old.labels {
        host.log(Level::Debug, &format!("image record {name} is up to date"));
        return Ok(());
    }
    if old.target.digest != target.digest {
        host.log(
            Level::Info,
            &format!(
                "moving {name} from {} to {}",
                old.target.digest, target.digest
            ),
        );
    }
    let record = ImageRecord {
        labels: merged,
        ..record
    };
    host.image_update(&record)
        .context_with(|| format!("updating image record {name}"))?;
    Ok(())
}

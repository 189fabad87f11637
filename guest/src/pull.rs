//! `pull-image`: check, resolve, pick the platform's manifest, fetch, unpack, label, record.
//!
//! The order follows cri-containerd's `PullImage` and containerd's unpacker, with the
//! policy ([`Policy`]) asked at each stage as soon as what it judges is known, and before
//! anything that depends on it is fetched:
//!
//! 1. normalize the reference ([`Reference`]); **policy: reference** (registries,
//!    repositories, tags, digest required) — before the registry is contacted;
//! 2. resolve it to the root descriptor (the host stores the root blob, checked against a
//!    digest the reference names); **policy: resolved** (the root digest);
//! 3. for an index (OCI) or manifest list (Docker), read it and pick the manifest for the
//!    requested platform ([`platform::select`], containerd's `platforms.Only`); when no entry
//!    with a platform matches, entries without one are tried in order by their config's OS
//!    and architecture, as containerd's `images.Manifest` does, and then indexes nested in
//!    the index (at most [`MAX_INDEX_NESTING`] deep). Fetch (unless present) and read that
//!    manifest. Schema 1 manifests and anything that is not a container image
//!    (OCI artifacts, Helm charts, …) are refused here, as are layers `diff.apply` cannot
//!    unpack; **policy: manifest** (platform of the index entry, size, layer count, layer
//!    media types) — before config and layers are fetched;
//! 4. fetch the config (unless present), read it, check it lists one diff ID per layer;
//!    **policy: config** (the platform the config declares) — before any layer is fetched;
//! 5. fetch only what is missing: layers below the highest committed chain ID are not
//!    fetched at all (their snapshots exist; with `discard_unpacked_layers` their blobs
//!    may be long gone), nor are blobs the content store already has. Non-distributable
//!    layers (with `urls`) are fetched like the others, as containerd does: its fetcher
//!    tries the URLs first and falls back to the registry; pullbox's host fetches from the
//!    registry, and URLs the policy refuses ([`Policy::allows_url_host`]) or that are not
//!    `http`/`https` are dropped from the descriptor;
//! 6. for each layer, bottom first: skip it when the snapshot named by its chain ID is
//!    committed; otherwise prepare `extract-<chain hex>` on the parent chain ID, apply the
//!    layer, check the diff ID the host computed against the config, commit as the chain ID;
//! 7. set containerd's GC labels (index → any nested index → manifest, manifest → config
//!    and layers, config → top snapshot), then write the image records: the image ID
//!    (config digest), the repo tag and the repo digest (`name@<root digest>`), in that
//!    order, as containerd's CRI.
//!
//! Records are merged as cri-containerd's `updateImageMetadata` merged repo tags and
//! digests: each is a record of its own, so pulling a second tag of an image adds that
//! tag and keeps the others, pulling by digest adds only the repo digest, and a tag that
//! now names another image moves to it (the old image keeps its other names). The records
//! carry the `pullbox.io/image.*` labels ([`crate::labels`]) that status and list read.
//! Everything a pull writes belongs to the host's lease for the request until the records
//! exist, so a failure here leaves no garbage behind.
//!
//! Size ([`image_size`]) is what containerd 1.6's CRI reports as `Image.size`: its
//! `images.Image.Size` walks the image for the platform with
//! `LimitManifests(FilterPlatforms(ChildrenHandler), platform, 1)` and adds up the `size` of
//! every descriptor it visits: the root (index or manifest), any nested indexes, the one
//! chosen manifest under an index, the config and every layer (compressed sizes, repeated
//! layers counted again).

use crate::blob::read_small;
use crate::digest;
use crate::error::{Error, Result, ResultExt};
use crate::host::Host;
use crate::labels;
use crate::oci::{self, Kind};
use crate::platform;
use crate::policy::{self, canonical_host, Image, Policy, Stage};
use crate::reference::Reference;
use crate::settings::Settings;
use crate::types::{Descriptor, ImageInfo, ImageRecord, Level, Platform, PullRequest, SnapshotKind};

/// Prefix of the key of an active snapshot a layer is unpacked into; the chain ID's hex
/// follows.
pub const EXTRACT_KEY_PREFIX: &str = "extract-";

/// How a pull writes what it pulled (policy aside).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Drop the GC references from manifests to layer blobs, so they are collected once
    /// unpacked (containerd's `discard_unpacked_layers`).
    pub discard_unpacked_layers: bool,
    /// Record names (normalized references) of pinned images: the answer's `pinned` counts
    /// them (see [`crate::catalog`]).
    pub pinned_images: Vec<String>,
    /// The snapshotter to unpack into (`snapshots.select`), recorded on the image's records;
    /// `None`: the host's default.
    pub snapshotter: Option<String>,
}

/// What `pull` resolved and read, before unpacking.
struct Resolved {
    root: Descriptor,
    /// Indexes nested in the root index, from the root's entry down to the one whose
    /// entry `from_index` is (usually none).
    nested: Vec<Descriptor>,
    /// The chosen index entry, when the root is an index.
    from_index: Option<Descriptor>,
    manifest_desc: Descriptor,
    manifest: oci::Manifest,
}

impl Resolved {
    fn image(&self) -> Image<'_> {
        Image {
            root: &self.root,
            index_entry: self.from_index.as_ref(),
            manifest_desc: &self.manifest_desc,
            manifest: &self.manifest,
        }
    }
}

/// Pulls the image `req` names with the default puller's `settings` as options and policy.
/// See [`pull_with`].
pub fn pull<H: Host + ?Sized>(host: &H, settings: &Settings, req: &PullRequest) -> Result<ImageInfo> {
    let runtime = settings.runtime_platform(&req.runtime_handler);
    let options = Options {
        discard_unpacked_layers: settings.discard_unpacked_layers,
        pinned_images: settings.pinned_images.clone(),
        snapshotter: runtime.and_then(|r| r.snapshotter.clone()),
    };
    // A runtime handler's platform replaces the request's (containerd's `runtime_platforms`).
    let for_handler;
    let req = match runtime.and_then(|r| r.platform.as_ref()) {
        Some(platform) => {
            for_handler = PullRequest { platform: platform.clone(), ..req.clone() };
            &for_handler
        }
        None => req,
    };
    let policy = settings.policy_for(req);
    if !settings.scopes.is_empty() {
        let names = policy.scope_names();
        host.log(
            Level::Debug,
            &format!(
                "policy scopes for namespace {:?}, runtime handler {:?}: {}",
                req.pod.as_ref().map(|p| p.namespace.as_str()),
                req.runtime_handler,
                if names.is_empty() { "none apply".to_string() } else { names.join(", ") }
            ),
        );
    }
    pull_with(host, &options, &policy, req)
}

/// Pulls the image `req` names through `host`, asking `policy` at every stage (see the
/// module docs), and records it.
///
/// Errors: `invalid-argument` for a malformed reference or platform, or a root that is not
/// an image; `permission-denied` when the policy refuses the image (the message names each
/// rule broken and why); `failed-precondition` for schema 1 manifests, malformed documents,
/// a diff ID that does not match; `not-found` when the index has no manifest for the
/// platform; `resource-exhausted` for metadata blobs over 4 MiB; any error of the imports,
/// with the reference or digest it concerns.
pub fn pull_with<H: Host + ?Sized, P: Policy + ?Sized>(
    host: &H,
    options: &Options,
    policy: &P,
    req: &PullRequest,
) -> Result<ImageInfo> {
    let reference = Reference::parse(&req.reference)?;
    if let Some(name) = &options.snapshotter {
        host.snapshot_select(name).context_with(|| format!("runtime handler {:?}", req.runtime_handler))?;
    }
    let want = request_platform(&req.platform);
    host.log(Level::Info, &format!("pulling {reference} for {}", platform::display(&want)));
    policy::enforce(host, policy, Stage::Reference, &reference, policy.check_reference(&reference))?;

    let root = resolve_root(host, &reference)?;
    policy::enforce(host, policy, Stage::Root, &reference, policy.check_root(&reference, &root))?;

    let resolved = select_manifest(host, &reference, &want, root)?;
    policy::enforce(host, policy, Stage::Manifest, &reference, policy.check_manifest(&reference, &resolved.image()))?;
    let id = resolved.manifest.config.digest.clone();

    // The config: small, read before any layer is fetched.
    fetch_missing(host, &reference, std::slice::from_ref(&resolved.manifest.config))?;
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
    policy::enforce(
        host,
        policy,
        Stage::Config,
        &reference,
        policy.check_config(&reference, &resolved.image(), &config),
    )?;

    // Layers: only those above the highest committed snapshot, only blobs not present.
    let chain = digest::chain_ids(&config.diff_ids);
    let first = first_uncommitted(host, &reference, &chain)?;
    let mut layers = resolved.manifest.layers.clone();
    for layer in &mut layers[first..] {
        *layer = with_allowed_urls(host, policy, &reference, layer);
    }
    if first > 0 {
        host.log(
            Level::Debug,
            &format!(
                "{reference}: the snapshots of the lowest {first} of {} layers are committed; \
                 those layers are not fetched",
                chain.len()
            ),
        );
    }
    fetch_missing(host, &reference, &layers[first..])?;
    unpack(host, &reference, first, &layers, &config.diff_ids, &chain)?;
    let top = chain.last().cloned().unwrap_or_default();

    set_gc_labels(host, options, &resolved, &top)?;

    let size = image_size(
        std::iter::once(&resolved.root).chain(&resolved.nested).chain(&resolved.from_index),
        &resolved.manifest,
    );
    let mut record_labels = vec![
        (labels::CRI_IMAGE.to_string(), labels::CRI_IMAGE_MANAGED.to_string()),
        (labels::IMAGE_ID.to_string(), id.clone()),
        (labels::IMAGE_MANIFEST.to_string(), resolved.manifest_desc.digest.clone()),
        (labels::IMAGE_CHAIN_ID.to_string(), top.clone()),
        (labels::IMAGE_SIZE.to_string(), size.to_string()),
        (labels::IMAGE_USER.to_string(), config.user.clone()),
    ];
    if let Some(name) = &options.snapshotter {
        record_labels.push((labels::IMAGE_SNAPSHOTTER.to_string(), name.clone()));
    }
    let mut names = vec![id.clone()];
    names.extend(reference.repo_tag());
    names.push(reference.repo_digest(&resolved.root.digest));
    for record_name in &names {
        write_record(host, record_name, &resolved.root, &record_labels)?;
    }

    let records = crate::catalog::records(host).context_with(|| format!("listing images after pulling {reference}"))?;
    let info = crate::catalog::gather(&records, &id, &options.pinned_images)
        .map(|image| image.info)
        .ok_or_else(|| Error::Internal(format!("image {id} has no records right after pulling {reference}")))?;
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

/// Step 2: the root descriptor, checked against the reference's digest.
fn resolve_root<H: Host + ?Sized>(host: &H, reference: &Reference) -> Result<Descriptor> {
    let name = reference.name();
    host.progress("resolving", &reference.to_string());
    let root = host.resolve(&name, reference.resolve_target()).context_with(|| format!("resolving {reference}"))?;
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
        &format!("resolved {reference} to {} ({}, {} bytes)", root.digest, root.media_type, root.size),
    );
    host.progress("resolved", &root.digest);
    Ok(root)
}

/// Starts fetching those of `blobs` the content store does not have (with the right size).
/// Returns at once; reads and applies wait for the downloads.
fn fetch_missing<H: Host + ?Sized>(host: &H, reference: &Reference, blobs: &[Descriptor]) -> Result<()> {
    let mut missing: Vec<Descriptor> = Vec::with_capacity(blobs.len());
    for d in blobs {
        if missing.iter().any(|m| m.digest == d.digest) {
            continue;
        }
        match host.content_info(&d.digest) {
            Ok(info) if info.size == d.size => {
                host.log(Level::Debug, &format!("{} is in the content store, not fetched", d.digest));
                continue;
            }
            Ok(info) => host.log(
                Level::Warn,
                &format!(
                    "{} is in the content store with {} bytes, its descriptor says {}; fetching",
                    d.digest, info.size, d.size
                ),
            ),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                return Err(e.context(format!("looking up {} of {reference}", d.digest)));
            }
        }
        missing.push(d.clone());
    }
    if missing.is_empty() {
        host.log(Level::Debug, &format!("{reference}: nothing to fetch"));
        return Ok(());
    }
    let digests: Vec<&str> = missing.iter().map(|d| d.digest.as_str()).collect();
    host.log(Level::Debug, &format!("{reference}: fetching {}", digests.join(", ")));
    host.progress("fetching", &format!("{} blobs", missing.len()));
    host.fetch(&reference.name(), &missing).context_with(|| format!("fetching {} of {reference}", digests.join(", ")))
}

/// Step 3: the manifest for the platform, read and checked.
fn select_manifest<H: Host + ?Sized>(
    host: &H,
    reference: &Reference,
    want: &Platform,
    root: Descriptor,
) -> Result<Resolved> {
    let mut kind = oci::kind_of(&root.media_type);
    let mut root_bytes = None;
    if kind == Kind::Unknown && oci::is_generic_json(&root.media_type) {
        let bytes = read_small(host, &root, "root manifest")?;
        kind = oci::sniff(&bytes);
        host.log(Level::Debug, &format!("{}: media type {:?} read as {kind:?}", root.digest, root.media_type));
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
            Ok(Resolved { manifest_desc: root.clone(), root, nested: vec![], from_index: None, manifest })
        }
        Kind::Index => {
            let bytes = match root_bytes {
                Some(b) => b,
                None => read_small(host, &root, "index")?,
            };
            if want.architecture.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{reference} is a multi-platform index and the request names no architecture"
                )));
            }
            let Some(found) = select_in_index(host, reference, want, &root, &bytes, 0)? else {
                let index = oci::parse_index(&root, &bytes)?;
                let have: Vec<String> =
                    index.manifests.iter().filter_map(|d| d.platform.as_ref().map(platform::display)).collect();
                return Err(Error::NotFound(format!(
                    "{reference}: index {} has no manifest for platform {} (it has: {})",
                    root.digest,
                    platform::display(want),
                    if have.is_empty() { "none".to_string() } else { have.join(", ") }
                )));
            };
            check_manifest(reference, &found.chosen, &found.manifest)?;
            Ok(Resolved {
                root,
                nested: found.nested,
                from_index: Some(found.chosen.clone()),
                manifest_desc: found.chosen,
                manifest: found.manifest,
            })
        }
    }
}

/// The most indexes nested in an index that a pull follows (the root index not counted).
pub const MAX_INDEX_NESTING: usize = 4;

/// A manifest found in an index, and the nested indexes on the way to it.
struct Found {
    /// Nested indexes from the root's entry down to the one listing `chosen`.
    nested: Vec<Descriptor>,
    chosen: Descriptor,
    manifest: oci::Manifest,
}

/// The manifest for `want` in the index `desc` (its bytes: `bytes`), or `None`: the best
/// manifest entry with a platform ([`platform::select`]); else, in order, the first entry
/// without a platform whose config runs on `want` ([`by_config_platform`]); else the first
/// nested index (an entry without a platform, or with one `want` runs) that has one,
/// searched the same way, as containerd's `images.Manifest` walks nested indexes.
/// `depth`: how many indexes are above this one.
///
/// Errors: `invalid-argument` for indexes nested deeper than [`MAX_INDEX_NESTING`]; those
/// of reading the index, its manifests and configs.
fn select_in_index<H: Host + ?Sized>(
    host: &H,
    reference: &Reference,
    want: &Platform,
    desc: &Descriptor,
    bytes: &[u8],
    depth: usize,
) -> Result<Option<Found>> {
    let index = oci::parse_index(desc, bytes)?;
    let of_kind = |kind: Kind| -> Vec<Descriptor> {
        index.manifests.iter().filter(|d| oci::kind_of(&d.media_type) == kind).cloned().collect()
    };
    let manifests = of_kind(Kind::Manifest);
    if let Some(i) = platform::select(want, &manifests) {
        let chosen = manifests[i].clone();
        host.log(
            Level::Debug,
            &format!(
                "{reference}: chose manifest {} ({}) of {} in index {} for {}",
                chosen.digest,
                chosen.platform.as_ref().map(platform::display).unwrap_or_default(),
                index.manifests.len(),
                desc.digest,
                platform::display(want)
            ),
        );
        let manifest = read_manifest(host, reference, &chosen)?;
        return Ok(Some(Found { nested: vec![], chosen, manifest }));
    }
    if let Some((chosen, manifest)) = by_config_platform(host, reference, want, &manifests)? {
        return Ok(Some(Found { nested: vec![], chosen, manifest }));
    }
    for entry in of_kind(Kind::Index) {
        let runs = entry.platform.is_none() || platform::select(want, std::slice::from_ref(&entry)).is_some();
        if !runs {
            continue;
        }
        if depth >= MAX_INDEX_NESTING {
            return Err(Error::InvalidArgument(format!(
                "{reference}: index {} nests indexes more than {MAX_INDEX_NESTING} deep",
                desc.digest
            )));
        }
        host.log(
            Level::Debug,
            &format!(
                "{reference}: looking for {} in index {} nested in {}",
                platform::display(want),
                entry.digest,
                desc.digest
            ),
        );
        fetch_missing(host, reference, std::slice::from_ref(&entry))?;
        let nested_bytes = read_small(host, &entry, "index")?;
        if let Some(mut found) = select_in_index(host, reference, want, &entry, &nested_bytes, depth + 1)? {
            found.nested.insert(0, entry);
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Fetches (unless present) and reads the manifest an index entry points at.
fn read_manifest<H: Host + ?Sized>(host: &H, reference: &Reference, desc: &Descriptor) -> Result<oci::Manifest> {
    fetch_missing(host, reference, std::slice::from_ref(desc))?;
    let bytes = read_small(host, desc, "manifest")?;
    oci::parse_manifest(desc, &bytes)
}

/// containerd's fallback for index entries without a platform: in index order, the first
/// whose config's OS and architecture run on `want`.
fn by_config_platform<H: Host + ?Sized>(
    host: &H,
    reference: &Reference,
    want: &Platform,
    manifests: &[Descriptor],
) -> Result<Option<(Descriptor, oci::Manifest)>> {
    for entry in manifests.iter().filter(|d| d.platform.is_none()) {
        let manifest = read_manifest(host, reference, entry)?;
        if !oci::is_image_config(&manifest.config.media_type) {
            continue;
        }
        fetch_missing(host, reference, std::slice::from_ref(&manifest.config))?;
        let bytes = read_small(host, &manifest.config, "config")?;
        let config = oci::parse_config(&manifest.config, &bytes)?;
        let fits = platform::config_matches(want, &config.os, &config.architecture);
        host.log(
            Level::Debug,
            &format!(
                "{reference}: index entry {} has no platform; its config is for {}/{}: {}",
                entry.digest,
                config.os,
                config.architecture,
                if fits { "chosen" } else { "skipped" }
            ),
        );
        if fits {
            return Ok(Some((entry.clone(), manifest)));
        }
    }
    Ok(None)
}

/// Refuses manifests that are not container images or whose layers `diff.apply` cannot
/// unpack, before anything more is fetched.
fn check_manifest(reference: &Reference, desc: &Descriptor, m: &oci::Manifest) -> Result<()> {
    if !oci::is_image_config(&m.config.media_type) {
        let what = if m.artifact_type.is_empty() {
            format!("a config of media type {:?}", m.config.media_type)
        } else {
            format!("artifact type {:?} (config media type {:?})", m.artifact_type, m.config.media_type)
        };
        return Err(Error::InvalidArgument(format!(
            "{reference}: manifest {} has {what}: it is not a container image; \
             pullbox pulls only images (config {:?} or {:?})",
            desc.digest,
            oci::OCI_CONFIG,
            oci::DOCKER_CONFIG
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

/// The number of layers, from the bottom, whose snapshots are committed (the highest
/// committed chain ID implies all below it).
fn first_uncommitted<H: Host + ?Sized>(host: &H, reference: &Reference, chain: &[String]) -> Result<usize> {
    for i in (0..chain.len()).rev() {
        match host.snapshot_stat(&chain[i]) {
            Ok(info) if info.kind == SnapshotKind::Committed => return Ok(i + 1),
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.context(format!("looking up snapshot {} of {reference}", chain[i]))),
        }
    }
    Ok(0)
}

/// `layer` with only the alternative URLs that may be handed to the host: `http`/`https`
/// URLs whose host the policy allows. The others are dropped (and logged); the blob then
/// comes from the registry.
fn with_allowed_urls<H: Host + ?Sized, P: Policy + ?Sized>(
    host: &H,
    policy: &P,
    reference: &Reference,
    layer: &Descriptor,
) -> Descriptor {
    if layer.urls.is_empty() {
        return layer.clone();
    }
    let mut layer = layer.clone();
    let urls = std::mem::take(&mut layer.urls);
    for url in urls {
        let verdict = match url_host(&url) {
            Some(h) if policy.allows_url_host(&h) => None,
            Some(h) => Some(format!("policy refuses its host {h}")),
            None => Some("not an http or https URL with a valid host".to_string()),
        };
        match verdict {
            None => layer.urls.push(url),
            Some(why) => host.log(
                Level::Warn,
                &format!(
                    "{reference}: dropped URL {url:?} of non-distributable layer {}: {why}; \
                     it is fetched from the registry",
                    layer.digest
                ),
            ),
        }
    }
    host.log(
        Level::Debug,
        &format!(
            "{reference}: layer {} is non-distributable ({}), URLs kept: {:?}",
            layer.digest, layer.media_type, layer.urls
        ),
    );
    layer
}

/// The host of an `http(s)://host[:port]/…` URL, canonical.
fn url_host(url: &str) -> Option<crate::policy::HostPort> {
    let lower = url.get(..8).map(str::to_ascii_lowercase).unwrap_or_default();
    let rest = if lower.starts_with("https://") {
        &url[8..]
    } else if lower.starts_with("http://") {
        &url[7..]
    } else {
        return None;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return None; // credentials in a URL: refuse rather than guess
    }
    canonical_host(authority).ok()
}

/// Step 6: one committed snapshot per layer, named by its chain ID. The lowest `first`
/// layers are known to be committed already.
fn unpack<H: Host + ?Sized>(
    host: &H,
    reference: &Reference,
    first: usize,
    layers: &[Descriptor],
    diff_ids: &[String],
    chain: &[String],
) -> Result<()> {
    for (i, layer) in layers.iter().enumerate() {
        let chain_id = &chain[i];
        if i < first {
            host.progress("skipped", &layer.digest);
            continue;
        }
        let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
        match host.snapshot_stat(chain_id) {
            Ok(info) if info.kind == SnapshotKind::Committed => {
                host.log(
                    Level::Debug,
                    &format!("layer {} of {reference}: snapshot {chain_id} is committed, skipped", layer.digest),
                );
                host.progress("skipped", &layer.digest);
                continue;
            }
            Ok(info) => host.log(
                Level::Debug,
                &format!("snapshot {chain_id} exists as {:?}, not committed; unpacking again", info.kind),
            ),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.context(format!("looking up snapshot {chain_id} of {reference}"))),
        }

        let key = format!("{EXTRACT_KEY_PREFIX}{}", digest::hex_part(chain_id));
        let () = match host.snapshot_prepare(&key, parent) {
            Err(e) if e.is_already_exists() => {
                host.log(Level::Debug, &format!("removing stale active snapshot {key}"));
                remove_key(host, &key);
                host.snapshot_prepare(&key, parent)
            }
            other => other,
        }
        .context_with(|| format!("preparing snapshot {key} for layer {} of {reference}", layer.digest))?;

        host.log(
            Level::Debug,
            &format!("applying layer {} ({}, {} bytes) onto {key}", layer.digest, layer.media_type, layer.size),
        );
        host.progress("unpacking", &layer.digest);
        let diff_id = match host.diff_apply(layer, &key) {
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
                host.log(Level::Debug, &format!("snapshot {chain_id} was committed by another pull; dropping {key}"));
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

/// Step 7a: containerd's GC labels on index, manifest and config.
fn set_gc_labels<H: Host + ?Sized>(host: &H, settings: &Options, r: &Resolved, top: &str) -> Result<()> {
    if let Some(chosen) = &r.from_index {
        // Each index references the next one down, the last one the manifest.
        let parents = std::iter::once(&r.root).chain(&r.nested);
        let children = r.nested.iter().chain([chosen]);
        for (parent, child) in parents.zip(children) {
            let labels = vec![(labels::gc_manifest(0), child.digest.clone())];
            host.content_set_labels(&parent.digest, &labels)
                .context_with(|| format!("labelling index {}", parent.digest))?;
        }
    }
    let mut labels = vec![(labels::GC_CONFIG.to_string(), r.manifest.config.digest.clone())];
    for (i, layer) in r.manifest.layers.iter().enumerate() {
        // With discard_unpacked_layers, an empty value removes a reference left by an
        // earlier pull, so the layer blobs go once nothing else holds them.
        let value = if settings.discard_unpacked_layers { String::new() } else { layer.digest.clone() };
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
            if r.from_index.is_some() { "index, " } else { "" },
            r.manifest_desc.digest,
            r.manifest.config.digest,
            if settings.discard_unpacked_layers { " (layers discarded)" } else { "" }
        ),
    );
    Ok(())
}

/// The image size containerd 1.6's CRI reports (see the module doc): `path` (the root, any
/// nested indexes and the chosen manifest under an index), config and layers.
pub fn image_size<'a>(path: impl IntoIterator<Item = &'a Descriptor>, m: &oci::Manifest) -> u64 {
    path.into_iter().map(|d| d.size).sum::<u64>() + m.config.size + m.layers.iter().map(|l| l.size).sum::<u64>()
}

/// Creates the record `name`, or moves an existing one to `target` with `labels` (labels
/// the record has beyond these stay, except [`labels::IMAGE_SNAPSHOTTER`]), as containerd
/// CRI's `createImageReference`.
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
            host.log(Level::Debug, &format!("created image record {name} -> {}", target.digest));
            return Ok(());
        }
        Err(e) if e.is_already_exists() => {}
        Err(e) => return Err(e.context(format!("creating image record {name}"))),
    }
    let old = host.image_get(name).context_with(|| format!("reading image record {name}"))?;
    let mut merged = old.labels.clone();
    // The snapshotter label is set only by pulls that chose one: another pull moves the
    // image back to the default snapshotter.
    merged.retain(|(k, _)| k != labels::IMAGE_SNAPSHOTTER);
    for (k, v) in labels {
        crate::types::set_label(&mut merged, k, v);
    }
    if old.target.digest == target.digest && merged == old.labels {
        host.log(Level::Debug, &format!("image record {name} is up to date"));
        return Ok(());
    }
    if old.target.digest != target.digest {
        host.log(Level::Info, &format!("moving {name} from {} to {}", old.target.digest, target.digest));
    }
    let record = ImageRecord { labels: merged, ..record };
    host.image_update(&record).context_with(|| format!("updating image record {name}"))?;
    Ok(())
}

//! OCI images on the test side: building them with `umoci`, pushing and inspecting them
//! with `skopeo`, and the digests pullbox must agree with.
//!
//! Key types:
//! - [`Layout`]: an OCI image layout on disk that `umoci` edits. Layers are added by
//!   unpacking the image, changing its rootfs in a closure and repacking (`umoci repack`
//!   writes one gzip layer with the difference, whiteouts included).
//! - [`RemoteImage`] / [`RemoteIndex`]: what the registry serves for a reference, read back
//!   with `skopeo inspect --raw` (so the tests compare pullbox against what is really there,
//!   not against what the builder meant to push).
//! - [`chain_id`]: the identity of a stack of layers, the name of an image's top snapshot.
//! - [`layer_entries`]: what one layer tarball holds, read with the `tar` crate.
//!
//! Every push uses `--preserve-digests`: skopeo must not recompress or substitute blobs
//! (its blob-info cache would otherwise reuse a zstd or uncompressed copy of a layer that
//! it has seen before), so the registry serves exactly the bytes the layout holds.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::process::tool;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` of a file's contents.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// The hex part of `sha256:<hex>`; panics on anything else (test inputs are well formed).
pub fn digest_hex(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    assert!(is_hex64(hex), "not a sha256 digest: {digest}");
    hex
}

/// Whether `s` is `sha256:` followed by 64 lowercase hex digits.
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(is_hex64)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The chain ID of a stack of layers, bottom first (OCI image spec, "Layer ChainID"):
/// `chain[0] = diff_ids[0]`, `chain[i] = sha256("<chain[i-1]> <diff_ids[i]>")`. The chain ID
/// of the whole stack names the image's top snapshot.
pub fn chain_id<S: AsRef<str>>(diff_ids: &[S]) -> String {
    let mut ids = diff_ids.iter().map(AsRef::as_ref);
    let first = ids.next().expect("chain_id of no layers").to_owned();
    ids.fold(first, |chain, diff_id| sha256_digest(format!("{chain} {diff_id}").as_bytes()))
}

/// Whether this process runs as root. Otherwise `umoci` works rootless and the images
/// cannot carry files owned by other users.
pub fn is_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// An OCI platform: `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Self {
        let mut parts = s.split('/');
        Platform {
            os: parts.next().unwrap_or_default().to_owned(),
            architecture: parts.next().unwrap_or_default().to_owned(),
            variant: parts.next().map(str::to_owned),
        }
    }

    /// The platform of the machine running the tests, in OCI terms (`linux/amd64`,
    /// `linux/arm64`, ...), as pullbox picks it when `--platform` is not given.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform { os: "linux".into(), architecture: architecture.into(), variant: None }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({ "os": self.os, "architecture": self.architecture });
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        v
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// An OCI image layout that `umoci` edits. Images in it are named by tag
/// (`org.opencontainers.image.ref.name`).
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// `umoci init --layout DIR` (DIR must not exist).
    pub fn init(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        tool(umoci(&["init", "--layout"]).arg(&dir))?;
        Ok(Layout { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `layout:tag`, as umoci and skopeo's `oci:` transport name an image.
    pub fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.dir.display())
    }

    /// `umoci new --image layout:tag`: an image with no layers.
    pub fn new_image(&self, tag: &str) -> Result<()> {
        tool(&mut umoci(&["new", "--image", &self.image(tag)]))?;
        Ok(())
    }

    /// Adds one layer to image `tag`: unpacks it into a bundle (`--rootless` unless root),
    /// lets `change` edit the bundle's rootfs, and repacks. umoci writes the difference as a
    /// gzip layer: new and changed files, `.wh.` whiteouts for deleted ones, hardlinks as
    /// link entries.
    pub fn add_layer(&self, tag: &str, change: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let bundle = self.dir.with_extension(format!("bundle-{tag}"));
        let _ = fs::remove_dir_all(&bundle);
        let mut unpack = umoci(&["unpack", "--image", &self.image(tag)]);
        if !is_root() {
            unpack.arg("--rootless");
        }
        tool(unpack.arg(&bundle))?;
        change(&bundle.join("rootfs")).with_context(|| format!("building a layer of {tag}"))?;
        tool(umoci(&["repack", "--image", &self.image(tag)]).arg(&bundle))?;
        fs::remove_dir_all(&bundle)?;
        Ok(())
    }

    /// `umoci config --image layout:tag ARGS...` (for example `--config.user 1000`), in place.
    pub fn config(&self, tag: &str, args: &[&str]) -> Result<()> {
        tool(umoci(&["config", "--image", &self.image(tag)]).args(args))?;
        Ok(())
    }

    /// Like [`Layout::config`] but saves the result as `new_tag`, leaving `tag` alone.
    pub fn config_as(&self, tag: &str, new_tag: &str, args: &[&str]) -> Result<()> {
        tool(umoci(&["config", "--image", &self.image(tag), "--tag", new_tag]).args(args))?;
        Ok(())
    }

    /// `umoci unpack` of the whole image into `bundle` (must not exist): the reference root
    /// filesystem is `bundle/rootfs`.
    pub fn unpack(&self, tag: &str, bundle: &Path) -> Result<PathBuf> {
        let mut unpack = umoci(&["unpack", "--image", &self.image(tag)]);
        if !is_root() {
            unpack.arg("--rootless");
        }
        tool(unpack.arg(bundle))?;
        Ok(bundle.join("rootfs"))
    }

    /// The top-level descriptor `index.json` holds for `tag`.
    pub fn descriptor(&self, tag: &str) -> Result<Value> {
        let index: Value = serde_json::from_slice(&fs::read(self.dir.join("index.json"))?)?;
        index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .cloned()
            .with_context(|| format!("no tag {tag} in {}", self.dir.display()))
    }

    /// The path of blob `digest`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest_hex(digest))
    }

    /// Reads blob `digest` and checks that it has that digest.
    pub fn blob(&self, digest: &str) -> Result<Vec<u8>> {
        let bytes = fs::read(self.blob_path(digest))?;
        ensure!(sha256_digest(&bytes) == digest, "blob {digest} does not match its digest");
        Ok(bytes)
    }

    /// Writes `bytes` as a blob and returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<String> {
        let digest = sha256_digest(bytes);
        fs::write(self.blob_path(&digest), bytes)?;
        Ok(digest)
    }

    /// Writes an image index over existing tags, each with its platform, and tags it `tag`.
    /// umoci has no command for this: the index is an ordinary blob plus an `index.json`
    /// entry. Returns the index digest.
    pub fn write_index(&self, tag: &str, entries: &[(&str, Platform)]) -> Result<String> {
        let mut manifests = Vec::new();
        for (child, platform) in entries {
            let mut descriptor = self.descriptor(child)?;
            descriptor.as_object_mut().unwrap().remove("annotations");
            descriptor["platform"] = platform.to_json();
            manifests.push(descriptor);
        }
        let index = json!({ "schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": manifests });
        let bytes = serde_json::to_vec(&index)?;
        let digest = self.write_blob(&bytes)?;
        let path = self.dir.join("index.json");
        let mut top: Value = serde_json::from_slice(&fs::read(&path)?)?;
        top["manifests"].as_array_mut().context("index.json has no manifests")?.push(json!({
            "mediaType": MEDIA_TYPE_INDEX,
            "digest": digest,
            "size": bytes.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }));
        fs::write(&path, serde_json::to_vec(&top)?)?;
        Ok(digest)
    }
}

fn umoci(args: &[&str]) -> Command {
    let mut cmd = Command::new("umoci");
    cmd.args(args);
    cmd
}

/// `skopeo` with the settings every call here uses: no signature policy file needed
/// (`--insecure-policy`), plain HTTP to the test registry.
pub fn skopeo(args: &[&str]) -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy").args(args);
    cmd
}

/// `skopeo copy --preserve-digests [EXTRA...] SRC DEST` with plain HTTP on both sides;
/// `src` and `dest` carry their transport (`oci:`, `dir:`, `docker://`). See the module docs
/// for `--preserve-digests`.
pub fn skopeo_copy(src: &str, dest: &str, extra: &[&str]) -> Result<()> {
    tool(
        skopeo(&["copy", "--quiet", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args(extra)
            .args([src, dest]),
    )?;
    Ok(())
}

/// `skopeo inspect --raw` of `docker://reference`: the manifest or index bytes as served.
pub fn fetch_manifest(reference: &str) -> Result<Vec<u8>> {
    tool(&mut skopeo(&["inspect", "--tls-verify=false", "--raw", &format!("docker://{reference}")]))
}

/// An image (one manifest) as the registry serves it. `reference` is what the test passes
/// to pullbox.
#[derive(Debug, Clone)]
pub struct RemoteImage {
    /// The reference it was read from, for example `127.0.0.1:PORT/team/app:1.0`.
    pub reference: String,
    /// `127.0.0.1:PORT/team/app`.
    pub repo: String,
    /// The digest of the manifest bytes the registry serves.
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub manifest: Value,
    /// The config digest: the image ID pullbox must report.
    pub config_digest: String,
    pub config_size: u64,
    /// The config (its digest is checked against `config_digest`).
    pub config: Value,
    /// `config.rootfs.diff_ids`, bottom first.
    pub diff_ids: Vec<String>,
    /// The layer descriptors of the manifest, bottom first.
    pub layers: Vec<LayerDescriptor>,
}

/// One layer descriptor of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl RemoteImage {
    /// Reads the manifest and config of `reference` (`host/repo:tag` or `host/repo@digest`,
    /// the latter also for a manifest inside an index) with skopeo, and checks that they are
    /// consistent: the config has the digest the manifest names, and as many diff IDs as the
    /// manifest has layers.
    pub fn inspect(reference: &str) -> Result<Self> {
        let raw = fetch_manifest(reference)?;
        let manifest: Value = serde_json::from_slice(&raw)?;
        ensure!(manifest["config"].is_object(), "{reference} is not an image manifest (an index?): {manifest}");
        let config_digest = manifest["config"]["digest"].as_str().context("config.digest")?.to_owned();
        let config_size = manifest["config"]["size"].as_u64().context("config.size")?;
        let config_raw = tool(&mut skopeo(&[
            "inspect",
            "--tls-verify=false",
            "--config",
            "--raw",
            &format!("docker://{reference}"),
        ]))?;
        ensure!(
            sha256_digest(&config_raw) == config_digest,
            "the config skopeo returns for {reference} does not have digest {config_digest}"
        );
        let config: Value = serde_json::from_slice(&config_raw)?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .context("config.rootfs.diff_ids")?
            .iter()
            .map(|d| d.as_str().map(str::to_owned).context("diff ID is not a string"))
            .collect::<Result<_>>()?;
        let layers: Vec<LayerDescriptor> = manifest["layers"]
            .as_array()
            .context("manifest.layers")?
            .iter()
            .map(|l| {
                Ok(LayerDescriptor {
                    media_type: l["mediaType"].as_str().context("layer mediaType")?.to_owned(),
                    digest: l["digest"].as_str().context("layer digest")?.to_owned(),
                    size: l["size"].as_u64().context("layer size")?,
                })
            })
            .collect::<Result<_>>()?;
        ensure!(layers.len() == diff_ids.len(), "{reference}: {} layers but {} diff IDs", layers.len(), diff_ids.len());
        Ok(RemoteImage {
            reference: reference.to_owned(),
            repo: repo_of(reference),
            manifest_digest: sha256_digest(&raw),
            manifest_size: raw.len() as u64,
            manifest,
            config_digest,
            config_size,
            config,
            diff_ids,
            layers,
        })
    }

    /// The repository path without the registry host, for example `team/app`.
    pub fn path(&self) -> &str {
        self.repo.split_once('/').map_or(&self.repo, |(_, path)| path)
    }

    /// The image ID pullbox must report: the config digest.
    pub fn id(&self) -> &str {
        &self.config_digest
    }

    /// The chain ID of all its layers: the name of its top snapshot.
    pub fn chain_id(&self) -> String {
        chain_id(&self.diff_ids)
    }

    /// `repo@<manifest digest>`: the repo digest pullbox must record, and a reference that
    /// pulls this exact manifest.
    pub fn digest_reference(&self) -> String {
        format!("{}@{}", self.repo, self.manifest_digest)
    }

    /// Every blob the image consists of: manifest, config, layers.
    pub fn blobs(&self) -> Vec<String> {
        let mut blobs = vec![self.manifest_digest.clone(), self.config_digest.clone()];
        blobs.extend(self.layers.iter().map(|l| l.digest.clone()));
        blobs
    }

    /// Config plus compressed layers, the size containerd's CRI counts (without the
    /// manifest; some implementations add it, see [`RemoteImage::size_range`]).
    pub fn content_size(&self) -> u64 {
        self.config_size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }

    /// The sizes an implementation following containerd may report: config plus compressed
    /// layers, with or without the manifest (and, pulled through an index, the index).
    pub fn size_range(&self, index_size: u64) -> std::ops::RangeInclusive<u64> {
        self.content_size()..=self.content_size() + self.manifest_size + index_size
    }
}

/// A multi-platform image index as the registry serves it.
#[derive(Debug, Clone)]
pub struct RemoteIndex {
    pub reference: String,
    pub repo: String,
    /// The digest of the index bytes: the repo digest pullbox records for a pull through it.
    pub index_digest: String,
    pub index_size: u64,
    pub index: Value,
    /// Each platform with its image, in index order.
    pub images: Vec<(Platform, RemoteImage)>,
}

impl RemoteIndex {
    /// Reads an index and every image it lists (each by `repo@digest`).
    pub fn inspect(reference: &str) -> Result<Self> {
        let raw = fetch_manifest(reference)?;
        let index: Value = serde_json::from_slice(&raw)?;
        let repo = repo_of(reference);
        let mut images = Vec::new();
        for entry in index["manifests"].as_array().with_context(|| format!("{reference} is not an index"))? {
            let p = &entry["platform"];
            let platform = Platform {
                os: p["os"].as_str().context("platform.os")?.to_owned(),
                architecture: p["architecture"].as_str().context("platform.architecture")?.to_owned(),
                variant: p["variant"].as_str().map(str::to_owned),
            };
            let digest = entry["digest"].as_str().context("manifest digest")?;
            images.push((platform, RemoteImage::inspect(&format!("{repo}@{digest}"))?));
        }
        Ok(RemoteIndex {
            reference: reference.to_owned(),
            index_digest: sha256_digest(&raw),
            index_size: raw.len() as u64,
            repo,
            index,
            images,
        })
    }

    /// The image for `platform` (exact match, variant included).
    pub fn image_for(&self, platform: &Platform) -> Option<&RemoteImage> {
        self.images.iter().find(|(p, _)| p == platform).map(|(_, image)| image)
    }

    /// `repo@<index digest>`.
    pub fn digest_reference(&self) -> String {
        format!("{}@{}", self.repo, self.index_digest)
    }
}

/// `host/repo` of `host/repo:tag` or `host/repo@digest`.
pub fn repo_of(reference: &str) -> String {
    let name = reference.split('@').next().unwrap();
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => name[..i].to_owned(),
        _ => name.to_owned(),
    }
}

/// What kind of entry a layer holds at a path, as far as comparing a layer with its
/// snapshot goes. Directories are left out: an applier creates parents a layer does not
/// list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryKind {
    /// A regular file, or a hardlink to one.
    File,
    Symlink,
    /// A `.wh.NAME` entry: NAME is deleted. In an overlay snapshot, a 0:0 char device.
    Whiteout,
    /// `.wh..wh..opq`: the directory hides what lower layers have in it.
    OpaqueDir,
    /// Devices, FIFOs.
    Other,
}

/// The non-directory entries of a layer tarball, gzip or uncompressed (zstd is not needed:
/// the zstd copies of the fixture's layers hold the same tar streams), as paths relative to
/// the root, whiteouts translated to the path they delete.
pub fn layer_entries(blob: &Path, media_type: &str) -> Result<BTreeSet<(PathBuf, EntryKind)>> {
    let file = fs::File::open(blob).with_context(|| format!("open {}", blob.display()))?;
    let reader: Box<dyn Read> = match media_type {
        MEDIA_TYPE_LAYER_GZIP | "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            Box::new(flate2::read::GzDecoder::new(file))
        }
        MEDIA_TYPE_LAYER_TAR => Box::new(file),
        other => bail!("layer_entries: unsupported media type {other}"),
    };
    let mut archive = tar::Archive::new(reader);
    let mut entries = BTreeSet::new();
    for entry in archive.entries()? {
        let entry = entry?;
        let path: PathBuf = entry
            .path()?
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir | std::path::Component::RootDir))
            .collect();
        if path.as_os_str().is_empty() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let parent = path.parent().unwrap_or(Path::new("")).to_owned();
        use tar::EntryType as T;
        let kind = match entry.header().entry_type() {
            T::Directory => continue,
            _ if name == ".wh..wh..opq" => {
                entries.insert((parent, EntryKind::OpaqueDir));
                continue;
            }
            _ if name.starts_with(".wh.") => {
                entries.insert((parent.join(&name[4..]), EntryKind::Whiteout));
                continue;
            }
            T::Regular | T::Continuous | T::Link => EntryKind::File,
            T::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        };
        entries.insert((path, kind));
    }
    Ok(entries)
}

/// The SHA-256 of a layer's uncompressed tar stream: its diff ID.
pub fn diff_id_of(blob: &Path, media_type: &str) -> Result<String> {
    let file = fs::File::open(blob)?;
    let mut reader: Box<dyn Read> = match media_type {
        MEDIA_TYPE_LAYER_GZIP => Box::new(flate2::read::GzDecoder::new(file)),
        MEDIA_TYPE_LAYER_TAR => Box::new(file),
        other => bail!("diff_id_of: unsupported media type {other}"),
    };
    let mut hasher = Sha256::new();
    std::io::copy(&mut reader, &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_follows_the_spec() {
        let a = "sha256:aaaa";
        assert_eq!(chain_id(&[a]), a);
        // Golden values from `printf 'sha256:aaaa sha256:bbbb' | sha256sum` and so on.
        let ab = "sha256:2c4d8760379f05d0ad1ed610712309f0114e7345e6e6a351494cff030ffdf197";
        assert_eq!(chain_id(&[a, "sha256:bbbb"]), ab);
        assert_eq!(
            chain_id(&[a, "sha256:bbbb", "sha256:cccc"]),
            "sha256:10f847b3ece58353f298bec20c58125235b631360ad43ac162131980750211ff"
        );
    }

    #[test]
    fn repo_of_strips_tag_and_digest() {
        assert_eq!(repo_of("127.0.0.1:5000/team/app:1.0"), "127.0.0.1:5000/team/app");
        assert_eq!(repo_of("127.0.0.1:5000/team/app@sha256:00"), "127.0.0.1:5000/team/app");
        assert_eq!(repo_of("127.0.0.1:5000/team/app"), "127.0.0.1:5000/team/app");
    }

    #[test]
    fn platform_round_trips() {
        assert_eq!(Platform::parse("linux/arm/v7").to_string(), "linux/arm/v7");
        assert_eq!(Platform::parse("linux/amd64").variant, None);
    }
}

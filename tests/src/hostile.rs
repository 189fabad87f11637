//! Hostile layers: hand-made tar archives pushed as image layers, for the applier's safety
//! tests.
//!
//! Key items: [`HostileTar`] (a tar builder that writes names and link targets verbatim, so
//! `..`, absolute paths and overlong names get in, which the `tar` crate's checked builder
//! refuses) and [`push_image`] (an OCI image layout written by hand, config, manifest and
//! gzip layers, pushed with `skopeo copy --preserve-digests` so the registry serves exactly
//! these bytes). [`nonce`] makes names no other test uses, so a search for them proves that
//! nothing was written where it must not be.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Result};
use serde_json::json;
use tar::{EntryType, Header};

use crate::oci::{sha256_digest, skopeo_copy, Platform, MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_MANIFEST};
use crate::registry::Registry;

/// A tar archive built entry by entry, names and link targets taken verbatim.
pub struct HostileTar(tar::Builder<Vec<u8>>);

impl Default for HostileTar {
    fn default() -> Self {
        Self::new()
    }
}

impl HostileTar {
    pub fn new() -> Self {
        HostileTar(tar::Builder::new(Vec::new()))
    }

    /// An entry with `name` and `link` written verbatim: in the header's 100-byte fields, or,
    /// when longer, in PAX `path` and `linkpath` records, as GNU tar and Go write them.
    pub fn entry(&mut self, kind: EntryType, name: &str, link: &str, mode: u32, data: &[u8]) -> &mut Self {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let mut pax: Vec<(&str, &[u8])> = Vec::new();
        if name.len() > 100 {
            pax.push(("path", name.as_bytes()));
        } else {
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        }
        if link.len() > 100 {
            pax.push(("linkpath", link.as_bytes()));
        } else {
            h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        if !pax.is_empty() {
            self.0.append_pax_extensions(pax).unwrap();
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(EntryType::Regular, name, "", 0o644, data)
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(EntryType::Directory, name, "", 0o755, b"")
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(EntryType::Symlink, name, target, 0o777, b"")
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(EntryType::Link, name, target, 0o644, b"")
    }

    /// The archive (with its end-of-archive marker).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.0, tar::Builder::new(Vec::new())).into_inner().unwrap()
    }
}

/// A name no other test run uses: process id and time.
pub fn nonce() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("pullbox-hostile-{}-{nanos}", std::process::id())
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data)?;
    Ok(e.finish()?)
}

/// Pushes an image whose layers are `layers` (uncompressed tars, bottom first, gzip-compressed
/// here) as `ADDR/<name>`, for the host's platform; returns the reference. `work` is a
/// scratch directory for the layout.
pub fn push_image(registry: &Registry, name: &str, layers: &[Vec<u8>], work: &Path) -> Result<String> {
    let blobs = layers
        .iter()
        .map(|tar| Ok(GzipLayer { gz: gzip(tar)?, diff_id: sha256_digest(tar) }))
        .collect::<Result<Vec<_>>>()?;
    push_layers(registry, name, &blobs, work)
}

/// A gzip layer blob and its diff ID (the sha256 of the uncompressed tar).
pub struct GzipLayer {
    pub gz: Vec<u8>,
    pub diff_id: String,
}

/// [`push_image`] for layers already compressed (the layer bombs of [`crate::bombs`], whose
/// uncompressed form is too large to hold).
pub fn push_layers(registry: &Registry, name: &str, layers: &[GzipLayer], work: &Path) -> Result<String> {
    let dir = work.join(format!("layout-{}", name.replace(['/', ':'], "-")));
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> Result<String> {
        let digest = sha256_digest(bytes);
        fs::write(blobs.join(&digest["sha256:".len()..]), bytes)?;
        Ok(digest)
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        diff_ids.push(layer.diff_id.clone());
        descriptors
            .push(json!({ "mediaType": MEDIA_TYPE_LAYER_GZIP, "digest": put(&layer.gz)?, "size": layer.gz.len() }));
    }
    let platform = Platform::host();
    let config = serde_json::to_vec(&json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config)?, "size": config.len() },
        "layers": descriptors,
    }))?;
    let manifest_digest = put(&manifest)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": MEDIA_TYPE_MANIFEST,
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": "image" },
            }],
        }))?,
    )?;
    ensure!(name.contains(':'), "name the image with a tag: {name}");
    let reference = format!("{}/{name}", registry.addr());
    skopeo_copy(&format!("oci:{}:image", dir.display()), &format!("docker://{reference}"), &[])?;
    Ok(reference)
}

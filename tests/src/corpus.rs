//! The store corpus: images built with `umoci` that hold every kind of entry an applier must
//! get right, and `umoci unpack`'s root filesystem of them as the reference.
//!
//! Key items: [`corpus`] (built and pushed once per test process, into the shared fixture's
//! registry) and [`Corpus`]. The image `ADDR/store/corpus:1` has six layers, bottom first:
//!
//! 1. (umoci) regular files; an executable; setuid, setgid and sticky (and setgid+sticky)
//!    modes; files and directories owned by other users (as root); a hardlink pair; relative,
//!    absolute and dangling symlinks; a FIFO; a character device (as root); a file and a
//!    directory that layer 3 swaps; a directory and files that later layers delete;
//! 2. (umoci) [`MANY_FILES`] small files in [`MANY_DIRS`] directories, and a changed file
//!    whose mode and owner change too;
//! 3. (umoci) deletions across layers: a file of layer 1, a whole directory of layer 1 (one
//!    whiteout), a file of layer 2; a file that becomes a directory and a directory that
//!    becomes a file; a retargeted symlink; a new hardlink pair;
//! 4. (`umoci raw add-layer`, hand-made) an opaque directory: `var/cache/.wh..wh..opq` hides
//!    what layer 1 put there, beside a new file;
//! 5. (`umoci raw add-layer`) an empty layer;
//! 6. (umoci) a small last layer.
//!
//! `ADDR/store/corpus-mixed:1` is the same image (same config, so the same image ID and chain
//! IDs) whose manifest names layer 2 uncompressed and layer 6 zstd-compressed (skopeo's
//! recompression of it): one image, all three layer formats.
//!
//! `ADDR/store/app-plus:1` is the fixture's `team/app` with one more layer: an image that
//! shares all of `app`'s layers, for the tests of concurrent pulls.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::fixture::fixture;
use crate::oci::{
    is_root, sha256_digest, skopeo, skopeo_copy, Layout, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD,
    MEDIA_TYPE_MANIFEST,
};
use crate::process::tool;

/// Directories of layer 2's small files.
pub const MANY_DIRS: usize = 30;
/// Small files of layer 2, spread over [`MANY_DIRS`] directories.
pub const MANY_FILES: usize = 1500;
/// The number of layers.
pub const LAYERS: usize = 6;

/// The corpus images. See the module docs.
#[derive(Debug)]
pub struct Corpus {
    /// `ADDR/store/corpus:1`: umoci's gzip layers.
    pub image: String,
    /// `ADDR/store/corpus-mixed:1`: the same image with an uncompressed and a zstd layer.
    pub mixed: String,
    /// The media types of `mixed`'s layers, bottom first.
    pub mixed_media_types: Vec<String>,
    /// The image ID (config digest) of both.
    pub id: String,
    /// `ADDR/store/app-plus:1`: `team/app`'s three layers and one more.
    pub app_plus: String,
    /// `umoci unpack`'s root filesystem of the image.
    pub rootfs: PathBuf,
}

/// The corpus, built on first use. Panics (in the calling test) when building fails.
pub fn corpus() -> &'static Corpus {
    static CORPUS: OnceLock<Result<Corpus, String>> = OnceLock::new();
    CORPUS
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .unwrap_or_else(|e| panic!("building the store corpus failed: {e}"))
}

fn build() -> Result<Corpus> {
    let registry = &fixture().registry;
    let addr = registry.addr().to_owned();
    // Inside the registry's directory: deleted with it when the test process ends.
    let work = registry.dir().join("store-corpus");
    fs::create_dir_all(&work)?;
    let layout = Layout::init(work.join("layout"))?;
    layout.new_image("corpus")?;
    layout.add_layer("corpus", layer1)?;
    layout.add_layer("corpus", layer2)?;
    layout.add_layer("corpus", layer3)?;
    raw_layer(&layout, "corpus", &opaque_layer()?, &work.join("opaque.tar"))?;
    raw_layer(&layout, "corpus", &[0u8; 1024], &work.join("empty.tar"))?;
    layout.add_layer("corpus", layer6)?;
    layout.config("corpus", &["--config.cmd", "/bin/tool"])?;

    let oci = |tag: &str| format!("oci:{}", layout.image(tag));
    let image = format!("{addr}/store/corpus:1");
    skopeo_copy(&oci("corpus"), &format!("docker://{image}"), &[])?;

    let (mixed_manifest, id, mixed_media_types) = mixed(&layout, &work)?;
    let mixed = format!("{addr}/store/corpus-mixed:1");
    tag_manifest(&layout, "corpus-mixed", &mixed_manifest)?;
    skopeo_copy(&oci("corpus-mixed"), &format!("docker://{mixed}"), &[])?;

    let rootfs = layout.unpack("corpus", &work.join("unpacked"))?;

    let app = &fixture().layout;
    app.config_as("app", "store-app-plus", &["--no-history"])?;
    app.add_layer("store-app-plus", |root| write(root, "opt/app/plus.txt", "one more layer\n", 0o644))?;
    let app_plus = format!("{addr}/store/app-plus:1");
    skopeo_copy(&format!("oci:{}", app.image("store-app-plus")), &format!("docker://{app_plus}"), &[])?;
    Ok(Corpus { image, mixed, mixed_media_types, id, app_plus, rootfs })
}

fn write(root: &Path, path: &str, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    let path = root.join(path);
    fs::create_dir_all(path.parent().unwrap())?;
    fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn mkdir(root: &Path, path: &str, mode: u32) -> Result<()> {
    let path = root.join(path);
    fs::create_dir_all(&path)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `chown` when running as root (rootless umoci cannot record other owners).
fn own(root: &Path, path: &str, uid: u32, gid: u32) -> Result<()> {
    if is_root() {
        chown(root.join(path), Some(uid), Some(gid)).with_context(|| format!("chown {path}"))?;
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    tool(cmd).map(drop)
}

fn layer1(root: &Path) -> Result<()> {
    write(root, "etc/keep.txt", "keep, version 1\n", 0o644)?;
    write(root, "etc/gone.txt", "deleted in layer 3\n", 0o644)?;
    write(root, "etc/dir-gone/a", "a\n", 0o644)?;
    write(root, "etc/dir-gone/b/c", "c\n", 0o644)?;
    write(root, "var/cache/old1", "hidden by the opaque directory\n", 0o644)?;
    write(root, "var/cache/sub/old2", "hidden too\n", 0o644)?;
    write(root, "bin/tool", "#!/bin/sh\necho tool\n", 0o755)?;
    write(root, "bin/su", "setuid\n", 0o4755)?;
    write(root, "usr/bin/sg", "setgid\n", 0o2755)?;
    own(root, "usr/bin/sg", 0, 42)?;
    fs::set_permissions(root.join("usr/bin/sg"), fs::Permissions::from_mode(0o2755))?;
    mkdir(root, "tmp", 0o1777)?;
    mkdir(root, "shared", 0o3775)?;
    own(root, "shared", 0, 100)?;
    fs::set_permissions(root.join("shared"), fs::Permissions::from_mode(0o3775))?;
    mkdir(root, "srv/data", 0o750)?;
    write(root, "srv/data/secret", "for uid 1000 only\n", 0o600)?;
    own(root, "srv/data", 1000, 1000)?;
    own(root, "srv/data/secret", 1000, 1000)?;
    write(root, "usr/lib/a", "one inode, two names\n", 0o644)?;
    fs::hard_link(root.join("usr/lib/a"), root.join("usr/lib/a-link"))?;
    symlink("usr/lib", root.join("lib"))?;
    symlink("/etc/keep.txt", root.join("etc/abs-link"))?;
    symlink("/nonexistent/target", root.join("etc/dangling"))?;
    fs::create_dir_all(root.join("run"))?;
    run(Command::new("mkfifo").arg("-m").arg("0640").arg(root.join("run/fifo")))?;
    if is_root() {
        fs::create_dir_all(root.join("dev"))?;
        run(Command::new("mknod").args(["-m", "0666"]).arg(root.join("dev/null-copy")).args(["c", "1", "3"]))?;
    }
    write(root, "opt/was-file", "a file in layer 1, a directory from layer 3\n", 0o644)?;
    write(root, "opt/was-dir/child", "a directory in layer 1, a file from layer 3\n", 0o644)?;
    Ok(())
}

fn layer2(root: &Path) -> Result<()> {
    for i in 0..MANY_FILES {
        let (dir, file) = (i % MANY_DIRS, i / MANY_DIRS);
        write(root, &format!("data/many/d{dir:02}/f{file:03}"), format!("file {i}\n"), 0o644)?;
    }
    write(root, "etc/keep.txt", "keep, version 2\n", 0o600)?;
    own(root, "etc/keep.txt", 1000, 1000)?;
    Ok(())
}

fn layer3(root: &Path) -> Result<()> {
    fs::remove_file(root.join("etc/gone.txt"))?;
    fs::remove_dir_all(root.join("etc/dir-gone"))?;
    fs::remove_file(root.join("data/many/d00/f000"))?;
    fs::remove_file(root.join("opt/was-file"))?;
    write(root, "opt/was-file/inside", "now inside a directory\n", 0o644)?;
    fs::remove_dir_all(root.join("opt/was-dir"))?;
    write(root, "opt/was-dir", "now a file\n", 0o640)?;
    fs::remove_file(root.join("etc/abs-link"))?;
    symlink("/etc/other", root.join("etc/abs-link"))?;
    write(root, "etc/other", "the new target\n", 0o644)?;
    write(root, "usr/lib/b", "another inode, two names\n", 0o755)?;
    fs::hard_link(root.join("usr/lib/b"), root.join("usr/lib/b2"))?;
    Ok(())
}

fn layer6(root: &Path) -> Result<()> {
    write(root, "etc/last.txt", "from the last layer (zstd in corpus-mixed)\n", 0o644)?;
    write(root, "data/many/d01/f000", "changed in the last layer\n", 0o644)?;
    Ok(())
}

/// Layer 4: `var/cache` made opaque, with one new file.
fn opaque_layer() -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_mtime(1_700_000_000);
    dir.set_size(0);
    tar.append_data(&mut dir, "var/", std::io::empty())?;
    tar.append_data(&mut dir.clone(), "var/cache/", std::io::empty())?;
    let mut marker = tar::Header::new_ustar();
    marker.set_mode(0o644);
    marker.set_size(0);
    tar.append_data(&mut marker, "var/cache/.wh..wh..opq", std::io::empty())?;
    let data = b"the only file left in var/cache\n";
    let mut file = tar::Header::new_ustar();
    file.set_mode(0o644);
    file.set_mtime(1_700_000_000);
    file.set_size(data.len() as u64);
    tar.append_data(&mut file, "var/cache/new", &data[..])?;
    Ok(tar.into_inner()?)
}

/// `umoci raw add-layer` of an uncompressed tar (umoci compresses it with gzip).
fn raw_layer(layout: &Layout, tag: &str, tar: &[u8], file: &Path) -> Result<()> {
    fs::write(file, tar)?;
    run(Command::new("umoci").args(["raw", "add-layer", "--image", &layout.image(tag)]).arg(file))
}

/// The manifest of `corpus-mixed` (see the module docs), the image ID, the layer media types.
fn mixed(layout: &Layout, work: &Path) -> Result<(Vec<u8>, String, Vec<String>)> {
    let manifest: Value =
        serde_json::from_slice(&layout.blob(layout.descriptor("corpus")?["digest"].as_str().unwrap())?)?;
    let mut mixed = manifest.clone();
    let layers = mixed["layers"].as_array_mut().context("manifest layers")?;
    ensure!(layers.len() == LAYERS, "corpus has {} layers, not {LAYERS}", layers.len());

    // Layer 2, uncompressed.
    let gz = layout.blob(layers[1]["digest"].as_str().unwrap())?;
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut plain)?;
    let digest = layout.write_blob(&plain)?;
    layers[1] = serde_json::json!({ "mediaType": MEDIA_TYPE_LAYER_TAR, "digest": digest, "size": plain.len() });

    // Layer 6, zstd: skopeo recompresses the whole image; take that one layer.
    let zstd = work.join("zstd");
    tool(
        skopeo(&["copy", "--quiet", "--dest-compress", "--dest-compress-format", "zstd"])
            .args([format!("oci:{}", layout.image("corpus")), format!("oci:{}:corpus", zstd.display())]),
    )?;
    let zstd_layout: Value = serde_json::from_slice(&fs::read(zstd.join("index.json"))?)?;
    let zstd_manifest_digest = zstd_layout["manifests"][0]["digest"].as_str().context("zstd manifest")?;
    let zstd_blob = |digest: &str| fs::read(zstd.join("blobs/sha256").join(digest.trim_start_matches("sha256:")));
    let zstd_manifest: Value = serde_json::from_slice(&zstd_blob(zstd_manifest_digest)?)?;
    let last = zstd_manifest["layers"][LAYERS - 1].clone();
    ensure!(last["mediaType"] == MEDIA_TYPE_LAYER_ZSTD, "skopeo did not write a zstd layer: {last}");
    let bytes = zstd_blob(last["digest"].as_str().unwrap())?;
    ensure!(sha256_digest(&bytes) == last["digest"].as_str().unwrap(), "zstd layer digest");
    layout.write_blob(&bytes)?;
    layers[LAYERS - 1] = last;

    let media_types = layers.iter().map(|l| l["mediaType"].as_str().unwrap_or_default().to_owned()).collect();
    let id = mixed["config"]["digest"].as_str().context("config digest")?.to_owned();
    Ok((serde_json::to_vec(&mixed)?, id, media_types))
}

/// Writes `manifest` as a blob and tags it `tag` in the layout's `index.json`.
fn tag_manifest(layout: &Layout, tag: &str, manifest: &[u8]) -> Result<()> {
    let digest = layout.write_blob(manifest)?;
    let path = layout.dir().join("index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&path)?)?;
    index["manifests"].as_array_mut().context("index.json manifests")?.push(serde_json::json!({
        "mediaType": MEDIA_TYPE_MANIFEST,
        "digest": digest,
        "size": manifest.len(),
        "annotations": { "org.opencontainers.image.ref.name": tag },
    }));
    fs::write(&path, serde_json::to_vec(&index)?)?;
    Ok(())
}

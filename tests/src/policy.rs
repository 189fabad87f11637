//! Helpers for the policy and puller tests (`tests/all/policy.rs`, `tests/all/puller.rs`):
//! settings files, private copies of the fixture images, and removing blobs from the
//! registry to prove that a pull did not fetch them.
//!
//! Key items: [`SettingsFile`] (a JSON document on disk, for `--settings`), [`pull_with`]
//! (`pullbox pull --settings FILE [ARGS] REF`, success or failure the caller's to check),
//! [`assert_denied`] (what a refused pull must print and leave), [`private_copy`] (the
//! fixture's image under a repository only the calling test uses, so that it can retag or
//! delete there without disturbing the tests that run in parallel), [`delete_blob`].

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::oci::{skopeo_copy, RemoteImage};
use crate::process::Captured;
use crate::pullbox::Pullbox;

/// A settings document written to a temporary file, for `--settings`.
#[derive(Debug)]
pub struct SettingsFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl SettingsFile {
    /// Writes `json` (any text: invalid documents are tests too).
    pub fn new(json: impl AsRef<str>) -> Self {
        let dir = tempfile::Builder::new().prefix("pullbox-settings-").tempdir().expect("temporary directory");
        let path = dir.path().join("settings.json");
        std::fs::write(&path, json.as_ref()).expect("write settings");
        SettingsFile { dir, path }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        let _ = &self.dir;
        &self.path
    }
}

/// `pullbox pull --settings FILE ARGS... REF` on `pb`'s store; `args` go before the
/// reference (for example `--puller`, `--platform`, `--log`).
pub fn pull_with(pb: &Pullbox, settings: &SettingsFile, args: &[&str], reference: &str) -> Captured {
    let mut all: Vec<OsString> = vec!["--settings".into(), settings.path().into()];
    all.extend(args.iter().map(OsString::from));
    all.push(reference.into());
    pb.run("pull", all)
}

/// Panics unless `out` is a pull the policy refused by `rule` (the CLI exits non-zero and
/// prints `policy denies <reference>: rule <rule>: <reason>`), and `pb`'s store, empty
/// before, holds no image and no blob afterwards.
#[track_caller]
pub fn assert_denied(pb: &Pullbox, out: &Captured, rule: &str) {
    out.assert_failure();
    assert!(
        out.stderr.contains("policy denies") && out.stderr.contains(&format!("rule {rule}: ")),
        "expected a denial by rule {rule}:\n{out}"
    );
    assert_eq!(pb.images_json().len(), 0, "a refused pull recorded an image:\n{out}");
    assert_eq!(pb.blob_digests().unwrap(), Vec::<String>::new(), "a refused pull left content behind:\n{out}");
}

/// Copies the fixture image `src` (`ADDR/repo:tag`) to `ADDR/<dest>` (`repo:tag`) and reads
/// it back.
pub fn private_copy(addr: &str, src: &str, dest: &str) -> Result<RemoteImage> {
    let dest = format!("{addr}/{dest}");
    skopeo_copy(&format!("docker://{src}"), &format!("docker://{dest}"), &[])?;
    RemoteImage::inspect(&dest)
}

/// Copies image `tag` of an OCI layout (as the fixture's `Layout::image` names it,
/// `DIR:tag`) to `ADDR/<dest>` and reads it back.
pub fn push_layout_image(layout_image: &str, addr: &str, dest: &str) -> Result<RemoteImage> {
    let dest = format!("{addr}/{dest}");
    skopeo_copy(&format!("oci:{layout_image}"), &format!("docker://{dest}"), &[])?;
    RemoteImage::inspect(&dest)
}

/// `DELETE /v2/<repo>/blobs/<digest>` on the registry at `addr` (deletion is enabled in the
/// test registry's config): the repository no longer serves the blob. Other repositories
/// that hold the same blob keep it.
pub fn delete_blob(addr: &str, repo: &str, digest: &str) -> Result<()> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "DELETE /v2/{repo}/blobs/{digest} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let status: u16 = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    if status != 202 {
        bail!("DELETE blob {digest} of {repo}: HTTP {status}:\n{response}");
    }
    Ok(())
}

/// The port of a `127.0.0.1:PORT` address.
pub fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or_default()
}

/// Pushes the component `wasm` to `ADDR/<dest>` (`repo:tag`) as a puller artifact, laid out as
/// `oras push ADDR/<dest> puller.wasm:application/wasm` writes it (an empty config, one layer
/// of media type `application/wasm`), from an OCI layout with `skopeo copy`. Returns the
/// manifest digest.
pub fn push_puller(wasm: &Path, addr: &str, dest: &str) -> Result<String> {
    use sha2::Digest as _;
    let layout = tempfile::tempdir()?;
    let blobs = layout.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8], media_type: &str| -> Result<serde_json::Value> {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes)?;
        Ok(serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()}))
    };
    let mut layer = put(&std::fs::read(wasm).with_context(|| format!("read {}", wasm.display()))?, "application/wasm")?;
    layer["annotations"] = serde_json::json!({"org.opencontainers.image.title": "puller.wasm"});
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.pullbox.puller.v1+wasm",
        "config": put(b"{}", "application/vnd.oci.empty.v1+json")?,
        "layers": [layer],
    });
    let mut desc = put(manifest.to_string().as_bytes(), "application/vnd.oci.image.manifest.v1+json")?;
    desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "puller"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    std::fs::write(layout.path().join("index.json"), index.to_string())?;
    std::fs::write(layout.path().join("oci-layout"), r#"{"imageLayoutVersion": "1.0.0"}"#)?;
    skopeo_copy(&format!("oci:{}:puller", layout.path().display()), &format!("docker://{addr}/{dest}"), &[])?;
    Ok(desc["digest"].as_str().unwrap_or_default().to_owned())
}

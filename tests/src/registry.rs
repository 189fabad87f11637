//! A real OCI registry for the tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on a free port of 127.0.0.1, plain HTTP, storage in a temporary directory.
//!
//! Key type: [`Registry`]. [`Registry::start`] writes a config, starts the registry and
//! waits until `GET /v2/` answers 200; dropping the value stops it and removes its files.
//!
//! The registry runs as a [`Service`]: when the value is dropped, or the test process ends
//! (even killed, or with a `static` fixture never dropped), the registry is stopped and its
//! directory deleted. No registry outlives its tests.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::service::{loopback_addr, start_retrying, Service, Spec};

/// Debian's package installs the registry here.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long the registry may take to answer. It starts in well under a second.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a stopping registry may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running registry. See the module docs.
#[derive(Debug)]
pub struct Registry {
    addr: String,
    service: Service,
}

impl Registry {
    /// Starts a registry on a free port of 127.0.0.1 and waits until it answers. Port races
    /// (another process takes the port between our probe and the registry's bind) are retried.
    pub fn start() -> Result<Self> {
        start_retrying(REGISTRY_BIN, Self::try_start)
    }

    fn try_start() -> Result<Self> {
        // Each attempt has its own directory: a failed attempt's supervisor deletes its own.
        let dir = tempfile::Builder::new().prefix("pullbox-registry-").tempdir()?.keep();
        let addr = loopback_addr()?;
        let storage = dir.join("storage");
        fs::create_dir_all(&storage)?;
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                storage.display()
            ),
        )?;
        let service = serve(&config, dir, &addr, || matches!(request(&addr, "GET", "/v2/"), Ok((200, _))))?;
        Ok(Registry { addr, service })
    }

    /// `127.0.0.1:PORT`, the host part of image references pushed here.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The registry's directory (config, log, storage). It is deleted when the registry stops.
    pub fn dir(&self) -> &Path {
        self.service.dir()
    }

    /// Whether the registry holds blob `digest` in repository `repo` (for example
    /// `team/app`), with `HEAD /v2/<repo>/blobs/<digest>`. Returns its size when it does.
    pub fn blob_size(&self, repo: &str, digest: &str) -> Result<Option<u64>> {
        let (status, head) = request(&self.addr, "HEAD", &format!("/v2/{repo}/blobs/{digest}"))?;
        match status {
            200 => {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                    })
                    .context("no Content-Length")?;
                Ok(Some(length))
            }
            404 => Ok(None),
            other => bail!("HEAD blob {digest}: HTTP {other}"),
        }
    }

    /// `GET path`; returns the status and the response (head and body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        request(&self.addr, "GET", path)
    }

    /// Uploads `bytes` as a blob of `repo` (POST starts an upload, PUT to its Location with
    /// the digest completes it); returns its digest.
    pub fn upload(&self, repo: &str, bytes: &[u8]) -> Result<String> {
        upload(&self.addr, repo, bytes)
    }

    /// Pushes `manifest` (of media type `media_type`) as `repo:reference` through the
    /// registry API; the blobs and manifests it names must be in `repo` already.
    pub fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, manifest: &[u8]) -> Result<()> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let (status, response) = send(&self.addr, "PUT", &path, media_type, manifest)?;
        ensure!(status == 201, "PUT {path}: HTTP {status}: {response}");
        Ok(())
    }
}

/// Starts `docker-registry serve CONFIG` as a [`Service`] in `dir`, its log `registry.log`,
/// and waits until `ready` says it answers on `addr`. [`crate::configured_registry`] starts
/// its registries with it too.
pub(crate) fn serve(config: &Path, dir: PathBuf, addr: &str, ready: impl FnMut() -> bool) -> Result<Service> {
    let mut command = Command::new(REGISTRY_BIN);
    command.arg("serve").arg(config);
    Service::start(Spec {
        name: "docker-registry",
        command,
        dir,
        log: "registry.log",
        cleanup: "",
        stop_timeout: STOP_TIMEOUT,
    })?
    .ready(addr, READY_TIMEOUT, ready)
}

/// A minimal HTTP/1.0 client: enough for readiness probes, `HEAD` on blobs and pushes through
/// the registry API, without pulling an HTTP stack into the harness. With a `content_type`,
/// `body` is sent with it (a request without one has no body).
pub fn send(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n");
    if !content_type.is_empty() {
        head += &format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n", body.len());
    }
    write!(stream, "{head}\r\n")?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    Ok((status, response))
}

/// [`Registry::upload`] to the registry at `addr`.
pub fn upload(addr: &str, repo: &str, bytes: &[u8]) -> Result<String> {
    let digest = crate::oci::sha256_digest(bytes);
    let (st, head) = send(addr, "POST", &format!("/v2/{repo}/blobs/uploads/"), "application/octet-stream", &[])?;
    ensure!(st == 202, "upload start: {st}: {head}");
    let location = head
        .lines()
        .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
        .context("no Location")?
        .trim();
    let location = location.strip_prefix(&format!("http://{addr}")).unwrap_or(location);
    let sep = if location.contains('?') { '&' } else { '?' };
    let (st, head) = send(addr, "PUT", &format!("{location}{sep}digest={digest}"), "application/octet-stream", bytes)?;
    ensure!(st == 201, "upload: {st}: {head}");
    Ok(digest)
}

/// [`send`] without a body.
fn request(addr: &str, method: &str, path: &str) -> Result<(u16, String)> {
    send(addr, method, path, "", &[])
}

//! Debian's `docker-registry` with authentication and TLS, serving an existing storage
//! directory read-only (usually the shared fixture registry's), so the transport tests get
//! the fixture images behind htpasswd basic auth, bearer-token auth or TLS (optionally with
//! client certificates) without pushing anything again.
//!
//! With [`ConfiguredRegistry::start_redirecting`] the registry answers blob GETs with a 307
//! to another server, as registries on object storage do (the distribution registry's
//! `redirect` storage middleware): the location is that server's base URL plus the blob's
//! path in the storage (`/docker/registry/v2/blobs/sha256/…/data`), which [`BlobStorage`]
//! (busybox's `httpd` over the same directory) serves.
//!
//! Key types: [`ConfiguredRegistry`], [`Auth`], [`Tls`], [`BlobStorage`]. The registry runs as a [`Service`],
//! as [`crate::registry::Registry`] does: when the value is dropped or the test process ends,
//! the registry is stopped and its directory deleted. The storage it serves is not touched:
//! `maintenance.readonly` refuses writes and upload purging is off.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::registry::{serve, REGISTRY_BIN};
use crate::service::{loopback_addr, start_retrying, Service, Spec};

/// busybox-static's binary (its `httpd` serves [`BlobStorage`]).
const BUSYBOX: &str = "/bin/busybox";

/// How clients must authenticate.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Anyone may pull.
    None,
    /// HTTP basic auth against these users (name, password), stored bcrypt-hashed.
    Htpasswd(Vec<(String, String)>),
    /// Bearer tokens from a token server (see [`crate::token_server`]).
    Token { realm: String, service: String, issuer: String, root_cert_bundle: PathBuf },
}

/// The registry's TLS settings.
#[derive(Debug, Clone)]
pub struct Tls {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// A running registry. See the module docs.
#[derive(Debug)]
pub struct ConfiguredRegistry {
    addr: String,
    service: Service,
}

impl ConfiguredRegistry {
    /// Starts a registry over `storage` (a registry `rootdirectory`) on a free port.
    pub fn start(storage: &Path, auth: &Auth, tls: Option<&Tls>) -> Result<Self> {
        start_retrying(REGISTRY_BIN, || Self::try_start(storage, auth, tls, None))
    }

    /// As [`ConfiguredRegistry::start`], but blob GETs are redirected (307) to `base_url`
    /// (`scheme://host:port`) plus the blob's path in `storage`.
    pub fn start_redirecting(storage: &Path, auth: &Auth, tls: Option<&Tls>, base_url: &str) -> Result<Self> {
        start_retrying(REGISTRY_BIN, || Self::try_start(storage, auth, tls, Some(base_url)))
    }

    fn try_start(storage: &Path, auth: &Auth, tls: Option<&Tls>, redirect: Option<&str>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("pullbox-registry-cfg-").tempdir()?.keep();
        let addr = loopback_addr()?;
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: true\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some(t) = tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.certificate.display(),
                t.key.display()
            ));
            if let Some(ca) = &t.client_ca {
                config.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        }
        // After `http:` and its `tls:`, which this must not split.
        if let Some(base_url) = redirect {
            config.push_str(&format!(
                "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {base_url}\n"
            ));
        }
        match auth {
            Auth::None => {}
            Auth::Htpasswd(users) => {
                let mut file = String::new();
                for (user, password) in users {
                    // The lowest cost bcrypt allows: the registry checks it on every request.
                    let hash = bcrypt::hash_with_result(password, 4)?.format_for_version(bcrypt::Version::TwoA);
                    file.push_str(&format!("{user}:{hash}\n"));
                }
                let path = dir.join("htpasswd");
                fs::write(&path, file)?;
                config
                    .push_str(&format!("auth:\n  htpasswd:\n    realm: pullbox-test\n    path: {}\n", path.display()));
            }
            Auth::Token { realm, service, issuer, root_cert_bundle } => {
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                    root_cert_bundle.display()
                ));
            }
        }
        let config_path = dir.join("config.yml");
        fs::write(&config_path, config)?;
        let service = serve(&config_path, dir, &addr, || TcpStream::connect(&addr).is_ok())?;
        Ok(ConfiguredRegistry { addr, service })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The registry's own log, for failure messages.
    pub fn log(&self) -> String {
        self.service.log()
    }
}

/// busybox's `httpd` serving a registry storage directory read-only as static files: the
/// object storage a [`ConfiguredRegistry::start_redirecting`] registry sends blob GETs to.
#[derive(Debug)]
pub struct BlobStorage {
    addr: String,
    _service: Service,
}

impl BlobStorage {
    /// Serves `storage` on a free port of 127.0.0.1.
    pub fn start(storage: &Path) -> Result<Self> {
        start_retrying(BUSYBOX, || {
            let dir = tempfile::Builder::new().prefix("pullbox-blob-storage-").tempdir()?.keep();
            let addr = loopback_addr()?;
            let mut command = Command::new(BUSYBOX);
            command.args(["httpd", "-f", "-p", &addr, "-h"]).arg(storage);
            let service = Service::start(Spec {
                name: "busybox httpd",
                command,
                dir,
                log: "httpd.log",
                cleanup: "",
                stop_timeout: Duration::from_secs(5),
            })?
            .ready(&addr, Duration::from_secs(10), || TcpStream::connect(&addr).is_ok())?;
            Ok(BlobStorage { addr, _service: service })
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

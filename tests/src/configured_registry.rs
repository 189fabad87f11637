//! Debian's `docker-registry` with authentication and TLS, serving an existing storage
//! directory read-only (usually the shared fixture registry's), so the transport tests get
//! the fixture images behind htpasswd basic auth, bearer-token auth or TLS (optionally with
//! client certificates) without pushing anything again.
//!
//! Key types: [`ConfiguredRegistry`], [`Auth`], [`Tls`]. The registry runs under the same
//! kind of `sh` supervisor as [`crate::registry::Registry`]: when the value is dropped or the
//! test process ends, the registry is stopped and its directory deleted. The storage it
//! serves is not touched: `maintenance.readonly` refuses writes and upload purging is off.

use std::fs;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::wait_until;
use crate::registry::REGISTRY_BIN;

/// How long the registry may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// See [`crate::registry`]: `$0` the binary, `$1` its config, `$2` the directory to delete.
const SUPERVISOR: &str = r#"
exec 3<&0
"$0" serve "$1" </dev/null 3<&- &
pid=$!
(
    read -r _ <&3
    kill "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -rf "$2"
) &
wait "$pid"
"#;

/// How clients must authenticate.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Anyone may pull.
    None,
    /// HTTP basic auth against these users (name, password), stored bcrypt-hashed.
    Htpasswd(Vec<(String, String)>),
    /// Bearer tokens from a token server (see [`crate::token_server`]).
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert_bundle: PathBuf,
    },
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
    dir: PathBuf,
    supervisor: Child,
    stdin: Option<ChildStdin>,
}

impl ConfiguredRegistry {
    /// Starts a registry over `storage` (a registry `rootdirectory`) on a free port.
    pub fn start(storage: &Path, auth: &Auth, tls: Option<&Tls>) -> Result<Self> {
        let mut errors = Vec::new();
        for _ in 0..5 {
            match Self::try_start(storage, auth, tls) {
                Ok(r) => return Ok(r),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!("cannot start {REGISTRY_BIN}:\n{}", errors.join("\n"))
    }

    fn try_start(storage: &Path, auth: &Auth, tls: Option<&Tls>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("pullbox-registry-cfg-").tempdir()?.keep();
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
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
                config.push_str(&format!("auth:\n  htpasswd:\n    realm: pullbox-test\n    path: {}\n", path.display()));
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
        let log_path = dir.join("registry.log");
        let log = fs::File::create(&log_path)?;
        let mut supervisor = match Command::new("/bin/sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg(REGISTRY_BIN)
            .arg(&config_path)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e).context("cannot start /bin/sh");
            }
        };
        let stdin = supervisor.stdin.take();
        let mut registry = ConfiguredRegistry { addr, dir, supervisor, stdin };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = registry.supervisor.try_wait()? {
                bail!("docker-registry exited ({status}):\n{}", fs::read_to_string(&log_path).unwrap_or_default());
            }
            if TcpStream::connect(&registry.addr).is_ok() {
                return Ok(registry);
            }
            if Instant::now() >= deadline {
                bail!("docker-registry did not listen on {} within {READY_TIMEOUT:?}", registry.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The registry's own log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for ConfiguredRegistry {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        if !matches!(wait_until(&mut self.supervisor, Instant::now() + Duration::from_secs(10)), Ok(Some(_))) {
            let _ = self.supervisor.kill();
            let _ = self.supervisor.wait();
        }
    }
}

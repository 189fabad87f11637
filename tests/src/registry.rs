//! A real OCI registry for the tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on a free port of 127.0.0.1, plain HTTP, storage in a temporary directory.
//!
//! Key type: [`Registry`]. [`Registry::start`] writes a config, starts the registry and
//! waits until `GET /v2/` answers 200; dropping the value stops it and removes its files.
//!
//! The registry is started through a small `sh` supervisor whose stdin is a pipe from the
//! test process. When that pipe closes — the `Registry` is dropped, or the test process
//! exits without dropping it (a `static` fixture is never dropped), or it is killed — the
//! supervisor kills the registry and deletes its directory. No registry outlives its tests.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::wait_until;

/// Debian's package installs the registry here.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long the registry may take to answer `/v2/`. It starts in well under a second.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Port races (another process takes the port between our probe and the registry's bind)
/// are retried this many times.
const START_ATTEMPTS: usize = 5;

/// The supervisor: `$0` is the registry binary, `$1` its config, `$2` the directory to
/// delete afterwards. It exits when the registry does. Its watcher, a subshell, reads the
/// pipe from the test process (kept on fd 3, since an asynchronous list's stdin is
/// `/dev/null`); at end of file it stops the registry and deletes the directory.
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

/// A running registry. See the module docs.
#[derive(Debug)]
pub struct Registry {
    addr: String,
    dir: PathBuf,
    supervisor: Child,
    stdin: Option<ChildStdin>,
}

impl Registry {
    /// Starts a registry on a free port of 127.0.0.1 and waits until it answers.
    pub fn start() -> Result<Self> {
        let mut errors = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start() {
                Ok(registry) => return Ok(registry),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!("cannot start {REGISTRY_BIN}:\n{}", errors.join("\n"))
    }

    fn try_start() -> Result<Self> {
        // Each attempt has its own directory: a failed attempt's watcher deletes its own.
        let dir = tempfile::Builder::new()
            .prefix("pullbox-registry-")
            .tempdir()?
            .keep();
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
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
        let log_path = dir.join("registry.log");
        let log = fs::File::create(&log_path)?;
        let spawned = Command::new("/bin/sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg(REGISTRY_BIN)
            .arg(&config)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn();
        let mut supervisor = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e).context("cannot start /bin/sh");
            }
        };
        let stdin = supervisor.stdin.take();
        // From here on, dropping `registry` stops everything and cleans up.
        let mut registry = Registry {
            addr,
            dir,
            supervisor,
            stdin,
        };
        let log = || fs::read_to_string(&log_path).unwrap_or_default();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = registry.supervisor.try_wait()? {
                bail!(
                    "docker-registry exited ({status}) before answering on {}:\n{}",
                    registry.addr,
                    log()
                );
            }
            if matches!(registry.get("/v2/"), Ok((200, _))) {
                return Ok(registry);
            }
            if Instant::now() >= deadline {
                bail!(
                    "docker-registry did not answer on {} within {READY_TIMEOUT:?}:\n{}",
                    registry.addr,
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`, the host part of image references pushed here.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The registry's directory (config, log, storage). It is deleted when the registry stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the registry holds blob `digest` in repository `repo` (for example
    /// `team/app`), with `HEAD /v2/<repo>/blobs/<digest>`. Returns its size when it does.
    pub fn blob_size(&self, repo: &str, digest: &str) -> Result<Option<u64>> {
        let (status, head) = self.request("HEAD", &format!("/v2/{repo}/blobs/{digest}"))?;
        match status {
            200 => {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
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
        self.request("GET", path)
    }

    /// A minimal HTTP/1.0 client: enough for readiness probes and `HEAD` on blobs, without
    /// pulling an HTTP stack into the harness.
    fn request(&self, method: &str, path: &str) -> Result<(u16, String)> {
        let mut stream = TcpStream::connect(&self.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )?;
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
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Closing the pipe tells the supervisor to stop the registry and clean up.
        drop(self.stdin.take());
        if !matches!(
            wait_until(
                &mut self.supervisor,
                Instant::now() + Duration::from_secs(10)
            ),
            Ok(Some(_))
        ) {
            let _ = self.supervisor.kill();
            let _ = self.supervisor.wait();
        }
    }
}

//! A CRI client and a `pullbox serve` daemon for tests.
//!
//! - [`connect`]: the `k8s-cri` crate's generated `ImageServiceClient` over a unix socket
//!   (pullbox's, or containerd's own CRI for comparisons); [`connect_runtime`]: the
//!   `RuntimeServiceClient` (containerd's CRI runs pods and containers).
//! - [`Daemon`]: `pullbox serve` on a private socket and store root, with a generated TOML
//!   config; stopped with SIGTERM on drop (the test can also stop it and check the exit, or
//!   kill it with SIGKILL and start it again on the same config, root and sockets).
//! - [`grpcio_call`]: one unary call from Python's `grpcio` (grpc C-core), which sends the
//!   socket path as `:authority`. It runs in the virtualenv `make setup` makes
//!   (`target/grpcio`, PyPI's grpcio [`GRPCIO_VERSION`]; Debian 12's python3-grpcio 1.51
//!   predates that behaviour, which C-core has had since 1.57).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Pullbox;

/// A CRI image-service client on the unix socket `socket`.
pub async fn connect(socket: &Path) -> Result<ImageServiceClient<Channel>> {
    Ok(ImageServiceClient::new(channel(socket).await?))
}

/// A CRI runtime-service client on the unix socket `socket`.
pub async fn connect_runtime(socket: &Path) -> Result<RuntimeServiceClient<Channel>> {
    Ok(RuntimeServiceClient::new(channel(socket).await?))
}

async fn channel(socket: &Path) -> Result<Channel> {
    let socket = socket.to_owned();
    // The URI is required by the API and unused: the connector dials the socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
        .context("cannot connect to the CRI socket")?;
    Ok(channel)
}

/// `pullbox serve` with its own socket and root.
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    /// Starts the daemon with the TOML `extra` appended to a config that sets the socket and
    /// the root (in a fresh directory under `$TMPDIR`, else `/tmp`); waits until the socket
    /// accepts connections.
    pub fn start(extra: &str) -> Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("pbd-").tempdir()?;
        let socket = dir.path().join("pullbox.sock");
        let root = dir.path().join("root");
        std::fs::write(
            dir.path().join("config.toml"),
            format!("socket = {:?}\nroot = {:?}\n{extra}\n", socket.display().to_string(), root.display().to_string()),
        )?;
        let stderr = dir.path().join("stderr.log");
        let mut d = Daemon { child: None, dir, socket, stderr };
        d.spawn()?;
        Ok(d)
    }

    /// Starts `pullbox serve` on the daemon's config (appending to its log) and waits until
    /// the socket accepts connections.
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.stderr)?;
        let child = Command::new(Pullbox::bin()?)
            .args(["serve", "--config"])
            .arg(self.dir.path().join("config.toml"))
            .env("PULLBOX_LOG", "info")
            .env_remove("PULLBOX_ROOT")
            .env_remove("PULLBOX_PULLER")
            .env_remove("PULLBOX_SETTINGS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start pullbox serve")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("pullbox serve exited with {status}: {}", self.log());
            }
            if Instant::now() > deadline {
                bail!("pullbox serve did not open {} in 30 s: {}", self.socket.display(), self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills the daemon with SIGKILL (a crash: nothing of its own runs) and waits for it.
    pub fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().context("daemon stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts the daemon again, after [`Daemon::kill`] or [`Daemon::stop`], on the same
    /// config, root and sockets.
    pub fn restart(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "the daemon is running");
        self.spawn()
    }

    /// The CRI socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The store root (embedded backend).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends `signal` (for example `HUP`) to the daemon.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.child.as_ref().context("daemon stopped")?.id().to_string();
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(&pid).status()?.success();
        anyhow::ensure!(ok, "kill -{signal} {pid} failed");
        Ok(())
    }

    /// A directory of the daemon's own, for files its config names.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited successfully.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else { return Ok(true) };
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                child.kill()?;
                bail!("pullbox serve ignored SIGTERM for 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The grpcio release `make setup` installs (keep in step with the Makefile's `GRPCIO_VERSION`).
pub const GRPCIO_VERSION: &str = "1.85.4";

/// Calls `/runtime.v1.ImageService/<method>` with an empty request from Python's `grpcio`,
/// on a plain `unix://` channel (no authority override); returns the serialized response.
///
/// The interpreter is `PULLBOX_GRPCIO_PYTHON`, or `target/grpcio/bin/python` (`make setup`).
pub fn grpcio_call(socket: &Path, method: &str) -> Result<std::result::Result<Vec<u8>, String>> {
    let python = match std::env::var_os("PULLBOX_GRPCIO_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Pullbox::workspace().join("target/grpcio/bin/python"),
    };
    anyhow::ensure!(python.is_file(), "{} not found: run `make setup`", python.display());
    // An empty protobuf message is empty bytes: no generated code is needed. Prints the
    // grpcio version, then the response in hex or the status code and message.
    const SCRIPT: &str = r#"
import sys, grpc
print(grpc.__version__)
channel = grpc.insecure_channel("unix://" + sys.argv[1])
try:
    print("ok", channel.unary_unary("/runtime.v1.ImageService/" + sys.argv[2])(b"", timeout=10).hex())
except grpc.RpcError as e:
    print("error", e.code(), e.details())
"#;
    let mut cmd = Command::new(&python);
    cmd.args(["-c", SCRIPT]).arg(socket).arg(method);
    let out = crate::process::run(cmd, Duration::from_secs(30))?;
    let mut lines = out.stdout.lines();
    let version = lines.next().unwrap_or_default();
    anyhow::ensure!(
        version == GRPCIO_VERSION,
        "grpcio {version:?} instead of {GRPCIO_VERSION}: run `make setup`\n{out}"
    );
    match lines.next().and_then(|l| l.split_once(' ')) {
        Some(("ok", hex)) => Ok(Ok(hex::decode(hex.trim()).context("grpcio's answer")?)),
        Some(("error", status)) => Ok(Err(status.to_owned())),
        _ => bail!("unexpected output from the grpcio client:\n{out}"),
    }
}

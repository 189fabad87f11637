//! Helpers of the hostile-puller suite (`tests/all/sandbox/`).
//!
//! - [`SwapDaemon`]: a [`cri::Daemon`] whose puller and settings are files of the test's
//!   own, so the test can rewrite them and send SIGHUP (the daemon's live reload), and learn
//!   which puller and settings serve through [`whoami`] (`pullbox-hostile` answers
//!   `image-status` of [`WHOAMI`] with its behavior and settings; any other puller with
//!   none). It runs on either backend ([`Backend`]): its [`Store`] (a root, or a fresh namespace of
//!   the shared containerd) says what the store holds, and [`SwapDaemon::assert_clean`]
//!   checks that a failed pull left it as it found it.
//! - [`peak_rss_kib`]: a process's peak resident memory, to catch host-side amplification.
//! - [`wasm_tools`] and [`build_component`]: components made from WIT by the test itself
//!   (load-time checks).
//! - [`slow_server`]: a server that answers every request after a delay, to make a host
//!   import take long while the guest does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{ImageSpec, ImageStatusRequest};

use crate::backends::{Backend, Store};
use crate::fault_server::{Fault, FaultServer};
use crate::{cri, Pullbox};

/// The reference `pullbox-hostile` answers with its behavior and settings.
pub const WHOAMI: &str = "pullbox-hostile/whoami";

/// `pullbox-hostile.wasm`, built by `make build`.
pub fn hostile() -> Result<PathBuf> {
    Pullbox::puller("pullbox-hostile.wasm")
}

/// The default puller, built by `make build`.
pub fn default_puller() -> Result<PathBuf> {
    Pullbox::puller("pullbox-puller.wasm")
}

/// A `pullbox serve` whose puller and settings the test can swap.
pub struct SwapDaemon {
    pub daemon: cri::Daemon,
    /// Where the daemon stores images.
    pub store: Store,
    files: tempfile::TempDir,
}

impl SwapDaemon {
    /// Starts a daemon on a fresh store of `backend`, running a copy of `puller` with the
    /// settings document `settings`, and the TOML `extra` (top-level keys, then tables such as
    /// `[sandbox]`) in its config.
    pub fn start(backend: Backend, puller: &Path, settings: &str, extra: &str) -> Result<SwapDaemon> {
        let store = Store::new(backend)?;
        let files = tempfile::Builder::new().prefix("pbd-files-").tempdir_in("/tmp")?;
        let p = files.path().join("puller.wasm");
        let s = files.path().join("settings.json");
        std::fs::copy(puller, &p).with_context(|| format!("copy {}", puller.display()))?;
        std::fs::write(&s, settings)?;
        let config = format!(
            "puller = {:?}\nsettings = {:?}\n{}",
            p.display().to_string(),
            s.display().to_string(),
            store.daemon_config(extra)
        );
        let daemon = cri::Daemon::start(&config)?;
        Ok(SwapDaemon { daemon, store, files })
    }

    /// Fails the test when the daemon's store holds anything (see
    /// [`Store::assert_clean`]); `after` says after what.
    #[track_caller]
    pub fn assert_clean(&self, after: &str) {
        self.store.assert_clean(&self.daemon.root(), after);
    }

    /// The puller file the daemon's config names.
    pub fn puller_path(&self) -> PathBuf {
        self.files.path().join("puller.wasm")
    }

    /// The settings file the daemon's config names.
    pub fn settings_path(&self) -> PathBuf {
        self.files.path().join("settings.json")
    }

    /// The daemon's process ID, found by its config file in `/proc` (the harness's
    /// [`cri::Daemon`] does not expose its child).
    pub fn pid(&self) -> Result<u32> {
        daemon_pid(&self.daemon)
    }

    /// Sends SIGHUP: reload the puller and its settings.
    pub fn sighup(&self) -> Result<()> {
        let status = Command::new("kill").args(["-HUP", &self.pid()?.to_string()]).status()?;
        ensure!(status.success(), "kill -HUP failed");
        Ok(())
    }

    /// Replaces the puller file (atomically, by rename) and the settings, then sends SIGHUP.
    pub fn swap(&self, puller: Option<&Path>, settings: &str) -> Result<()> {
        if let Some(src) = puller {
            let tmp = self.files.path().join("puller.wasm.new");
            std::fs::copy(src, &tmp)?;
            std::fs::rename(&tmp, self.puller_path())?;
        }
        let tmp = self.files.path().join("settings.json.new");
        std::fs::write(&tmp, settings)?;
        std::fs::rename(&tmp, self.settings_path())?;
        self.sighup()
    }

    /// Waits until [`whoami`] answers `want` (the hostile puller's settings document), or
    /// `None` (another puller), for at most 15 s.
    pub async fn wait_for(&self, want: Option<&str>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last;
        loop {
            last = whoami(self.daemon.socket()).await;
            if let Ok(got) = &last {
                if got.as_deref() == want {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the daemon did not switch to {want:?} in 15 s (last answer {last:?}): {}", self.daemon.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The process ID of a [`cri::Daemon`]: the `pullbox serve` whose command line names the
/// config file next to its socket.
pub fn daemon_pid(daemon: &cri::Daemon) -> Result<u32> {
    let config = daemon.socket().with_file_name("config.toml");
    let config = config.to_string_lossy();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<_> = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy).collect();
        if args.iter().any(|a| a == "serve") && args.iter().any(|a| a == config.as_ref()) {
            return Ok(pid);
        }
    }
    bail!("no pullbox serve process with config {config}")
}

/// The settings document the daemon's hostile puller runs with; `None` when another puller
/// serves.
pub async fn whoami(socket: &Path) -> Result<Option<String>> {
    let mut c = cri::connect(socket).await?;
    let req = ImageStatusRequest {
        image: Some(ImageSpec { image: WHOAMI.to_owned(), ..ImageSpec::default() }),
        verbose: false,
    };
    let status = c.image_status(req).await.map_err(|e| anyhow::anyhow!("ImageStatus: {e:?}"))?.into_inner();
    Ok(status.image.map(|i| i.repo_tags.get(1).cloned().unwrap_or_default()))
}

/// The peak resident set size of process `pid`, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// `wasm-tools`: `$WASM_TOOLS`, else on `PATH`, else `$CARGO_HOME/bin` (where `make setup`
/// installs it).
pub fn wasm_tools() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WASM_TOOLS") {
        return Ok(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("wasm-tools");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("no CARGO_HOME or HOME")?;
    let p = home.join("bin/wasm-tools");
    ensure!(p.is_file(), "wasm-tools not found (run `make setup`, or set WASM_TOOLS)");
    Ok(p)
}

/// Runs `wasm-tools ARGS`, which must succeed; returns stdout.
pub fn run_wasm_tools(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let out = Command::new(wasm_tools()?).args(args).output().context("cannot run wasm-tools")?;
    ensure!(out.status.success(), "wasm-tools {:?} failed: {}", args, String::from_utf8_lossy(&out.stderr));
    Ok(out.stdout)
}

/// A component for `world` of the WIT package in `wit_dir`, made in `out_dir`: a dummy core
/// module (every export traps) with `edit` applied to its text, wrapped as a component.
/// Returns the component's path.
pub fn build_component(
    wit_dir: &Path,
    world: &str,
    out_dir: &Path,
    edit: impl FnOnce(String) -> String,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir)?;
    let core_wat = out_dir.join(format!("{world}.core.wat"));
    let core = out_dir.join(format!("{world}.core.wasm"));
    let component = out_dir.join(format!("{world}.wasm"));
    let wat = run_wasm_tools(&[
        "component".as_ref(),
        "embed".as_ref(),
        "--dummy".as_ref(),
        "-t".as_ref(),
        "-w".as_ref(),
        world.as_ref(),
        wit_dir.as_os_str(),
    ])?;
    std::fs::write(&core_wat, edit(String::from_utf8(wat)?))?;
    // The text keeps the world's custom section (`@custom "component-type"`).
    run_wasm_tools(&["parse".as_ref(), core_wat.as_os_str(), "-o".as_ref(), core.as_os_str()])?;
    run_wasm_tools(&["component".as_ref(), "new".as_ref(), core.as_os_str(), "-o".as_ref(), component.as_os_str()])?;
    Ok(component)
}

/// A copy of the workspace's `wit/` in `dir`, with `edit` applied to each file's text and
/// the files of `extra` (name, text) added.
pub fn wit_copy(dir: &Path, edit: impl Fn(&str, String) -> String, extra: &[(&str, &str)]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(Pullbox::workspace().join("wit"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && name.ends_with(".wit") {
            let text = std::fs::read_to_string(entry.path())?;
            std::fs::write(dir.join(&name), edit(&name, text))?;
        }
    }
    for (name, text) in extra {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, text)?;
    }
    Ok(dir.to_owned())
}

/// A server on 127.0.0.1 that answers every request `404` after `delay`, to make a host
/// import take long while the guest does nothing; stopped when dropped.
pub fn slow_server(delay: Duration) -> Result<FaultServer> {
    let server = FaultServer::local()?;
    let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    server.inject("", Fault::Delay(millis), usize::MAX);
    Ok(server)
}

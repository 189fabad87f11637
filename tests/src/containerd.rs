//! A real containerd for the tests: Debian's `containerd` (1.6) with its own root, state and
//! gRPC socket in a temporary directory, the CRI plugin on the same socket, `runc` as its
//! runtime.
//!
//! Key type: [`Containerd`]. [`Containerd::start`] writes a config, starts containerd and
//! waits until `ctr version` answers on the socket; dropping the value stops it and removes
//! its files. [`Containerd::ctr`] runs `ctr --address SOCKET -n k8s.io ARGS...`.
//!
//! As the registry does ([`crate::registry`]), containerd runs as a [`Service`]: when the
//! value is dropped, or the test process ends (even killed), containerd is stopped, the shims
//! of this containerd are killed (containerd leaves them running by design; they are found by
//! the socket path on their command line, which no other containerd shares), whatever is
//! still mounted under the directory is unmounted, and the directory is deleted.
//!
//! The directory is under the system's temporary directory (`$TMPDIR`, else `/tmp`), or under
//! `$PULLBOX_TEST_CONTAINERD_DIR` when set. It must be on a filesystem where overlayfs works
//! (ext4, xfs, tmpfs; not overlayfs itself): the `overlayfs` snapshotter keeps its layers
//! there. Its path is short on purpose: unix socket paths are limited to 108 bytes, and
//! overlay mount options (every layer's path) to a page.
//!
//! [`shared`] is one containerd for the whole test process (started on first use, stopped when
//! the process ends), for suites whose tests each work in a namespace of their own
//! ([`fresh_namespace`]): namespaces keep one test's images, leases and garbage collection
//! from another's, and one containerd start (about half a second) serves them all.
//!
//! [`Containerd::start_with_proxy`] also lists a proxy snapshotter (`[proxy_plugins]`, type
//! `snapshot`), such as `pullbox serve`'s snapshotter socket, under a name `--snapshotter`
//! options of `ctr` and pullbox's `containerd.snapshotter` setting can use.
//!
//! Needs root (containerd, mounts, runc), `/usr/bin/containerd`, `/usr/bin/ctr`,
//! `containerd-shim-runc-v2` and `runc` on `PATH`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::process::{run, Captured};
use crate::service::{Service, Spec};

/// Debian's package installs containerd here.
pub const CONTAINERD_BIN: &str = "/usr/bin/containerd";
/// And its client here.
pub const CTR_BIN: &str = "/usr/bin/ctr";

/// The namespace containerd's CRI plugin (hence kubelet) uses, and [`Containerd::ctr`]'s.
pub const NAMESPACE: &str = "k8s.io";

/// How long containerd may take to answer. It starts in well under a second.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stopping containerd (with its shims and mounts) may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one `ctr` command may run: a pull or a run of the test images takes a second or
/// two; a minute means something is stuck.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(120);

/// `PATH` for containerd and its shims: runc is in `/usr/sbin` on Debian.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The socket's name in containerd's directory; [`CLEANUP`] finds it as `$dir/c.sock`.
const SOCKET: &str = "c.sock";

/// What the supervisor does once containerd stopped, before it deletes the directory
/// (`$dir`): it kills this containerd's shims, found by the socket on their command line,
/// and unmounts what is left under the directory.
const CLEANUP: &str = r#"    for p in /proc/[0-9]*; do
        if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-address $dir/c.sock "; then
            kill -9 "${p#/proc/}" 2>/dev/null
        fi
    done
    awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null
    done"#;

/// The containerd of this test process, started on first use. It is never dropped: its
/// supervisor stops it, and deletes its files, when the process ends (see [`crate::service`]).
pub fn shared() -> Result<&'static Containerd> {
    static SHARED: OnceLock<Result<Containerd, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| Containerd::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("starting the shared containerd failed: {e}"))
}

/// A namespace no other caller in this process gets: `pbt-<pid>-<n>`. containerd creates a
/// namespace on its first write, so a fresh one holds nothing.
pub fn fresh_namespace() -> String {
    unique("pbt")
}

/// `<prefix>-<pid>-<n>`, a name no other caller in this process gets.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A running containerd. See the module docs.
#[derive(Debug)]
pub struct Containerd {
    socket: PathBuf,
    service: Service,
}

impl Containerd {
    /// Starts containerd in a fresh directory and waits until it answers.
    pub fn start() -> Result<Self> {
        Self::start_config(None, None)
    }

    /// [`Containerd::start`], with the proxy snapshotter `name` at the unix socket `address`
    /// (containerd connects to it on first use, so it may start later).
    pub fn start_with_proxy(name: &str, address: &Path) -> Result<Self> {
        Self::start_config(Some((name, address)), None)
    }

    /// [`Containerd::start_with_proxy`], with containerd's CRI configured as on a node that
    /// runs its pods from that snapshotter: the CRI plugin's `snapshotter` is `name` and its
    /// `sandbox_image` is `sandbox_image` (which containerd pulls itself, onto `name`).
    pub fn start_cri_on_proxy(name: &str, address: &Path, sandbox_image: &str) -> Result<Self> {
        Self::start_config(Some((name, address)), Some(sandbox_image))
    }

    fn start_config(proxy: Option<(&str, &Path)>, sandbox_image: Option<&str>) -> Result<Self> {
        let parent =
            std::env::var_os("PULLBOX_TEST_CONTAINERD_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&parent)?;
        let dir = tempfile::Builder::new().prefix("pbctd-").tempdir_in(&parent)?.keep();
        let socket = dir.join(SOCKET);
        if socket.as_os_str().len() > 100 {
            let _ = fs::remove_dir_all(&dir);
            bail!(
                "{} is too long for a unix socket: set PULLBOX_TEST_CONTAINERD_DIR to a shorter directory",
                socket.display()
            );
        }
        let config = dir.join("config.toml");
        let mut toml = config_toml(&dir, &socket);
        if let (Some((name, _)), Some(image)) = (proxy, sandbox_image) {
            // Pods: CRI gives sandboxes an `oom_score_adj` below containerd's own, which a
            // machine may forbid (a VM's or container's test runner); containerd's option
            // for that raises it to containerd's.
            let pods =
                format!("disable_tcp_service = true\n  sandbox_image = {image:?}\n  restrict_oom_score_adj = true");
            toml = toml
                .replace("snapshotter = \"overlayfs\"", &format!("snapshotter = {name:?}"))
                .replace("disable_tcp_service = true", &pods);
        }
        if let Some((name, address)) = proxy {
            toml.push_str(&format!(
                "\n[proxy_plugins]\n  [proxy_plugins.{name}]\n    type = \"snapshot\"\n    address = {:?}\n",
                address.display().to_string()
            ));
        }
        fs::write(&config, toml)?;
        fs::create_dir_all(dir.join("certs.d"))?;
        let mut command = Command::new(CONTAINERD_BIN);
        command.arg("--config").arg(&config).env("PATH", PATH);
        let service = Service::start(Spec {
            name: "containerd",
            command,
            dir,
            log: "containerd.log",
            cleanup: CLEANUP,
            stop_timeout: STOP_TIMEOUT,
        })?
        .ready(&socket.display().to_string(), READY_TIMEOUT, || {
            socket.exists() && ctr(&socket, "default", &["version"]).is_ok_and(|c| c.success())
        })?;
        Ok(Containerd { socket, service })
    }

    /// Kills containerd with SIGKILL (a crash: its shims, root and state stay); it stays down
    /// until [`Containerd::restart`].
    pub fn crash(&mut self) -> Result<()> {
        self.service.crash()
    }

    /// Starts containerd again after [`Containerd::crash`], on the same config, root and
    /// sockets; returns once it answers.
    pub fn restart(&mut self) -> Result<()> {
        let socket = self.socket.clone();
        self.service.restart(READY_TIMEOUT, || {
            socket.exists() && ctr(&socket, "default", &["version"]).is_ok_and(|c| c.success())
        })
    }

    /// containerd's gRPC socket (CRI's too).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The lines of a `pullbox serve` config that put its images in this containerd (the
    /// default namespace, `k8s.io`, which containerd's own CRI serves).
    pub fn pullbox_config(&self) -> String {
        format!("backend = \"containerd\"\n[containerd]\naddress = {:?}\n", self.socket.display().to_string())
    }

    /// containerd's directory (config, log, root, state). It is deleted when containerd stops.
    pub fn dir(&self) -> &Path {
        self.service.dir()
    }

    /// containerd's root directory (content, snapshots, metadata).
    pub fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    /// What containerd logged so far.
    pub fn log(&self) -> String {
        self.service.log()
    }

    /// Lets containerd's CRI plugin pull from `addr` (`127.0.0.1:PORT`) over plain HTTP: a
    /// `hosts.toml` in the plugin's `config_path`, read at each pull.
    pub fn allow_plain_http(&self, addr: &str) -> Result<()> {
        let dir = self.dir().join("certs.d").join(addr);
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{addr}\"\n\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
        Ok(())
    }

    /// Runs `ctr --address SOCKET -n k8s.io ARGS...` (with [`CTR_TIMEOUT`]).
    pub fn ctr(&self, args: &[&str]) -> Result<Captured> {
        self.ctr_in(NAMESPACE, args)
    }

    /// Runs `ctr --address SOCKET -n NAMESPACE ARGS...` (with [`CTR_TIMEOUT`]).
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Result<Captured> {
        ctr(&self.socket, namespace, args)
    }

    /// Like [`Containerd::ctr_in`], but the command must succeed; returns its stdout.
    pub fn ctr_ok(&self, namespace: &str, args: &[&str]) -> Result<String> {
        let out = self.ctr_in(namespace, args)?;
        if !out.success() {
            bail!("ctr failed:\n{out}");
        }
        Ok(out.stdout)
    }

    /// The first column of `ctr -n NAMESPACE <what> ls` (image names, blob digests, snapshot
    /// keys, lease ids), without the header.
    pub fn list(&self, namespace: &str, what: &str) -> Result<Vec<String>> {
        let out = self.ctr_ok(namespace, &[what, "ls"])?;
        Ok(out.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect())
    }

    /// Runs containerd's garbage collector now and waits for it: containerd's API has no
    /// "collect" call, but deleting a lease with `--sync` runs the collector before it
    /// answers. The collector sweeps every namespace; `namespace` only holds the short-lived
    /// lease.
    pub fn collect(&self, namespace: &str) -> Result<()> {
        let id = unique("pbt-gc");
        self.ctr_ok(namespace, &["leases", "create", "--id", &id, "--expires", "1m"])?;
        self.ctr_ok(namespace, &["leases", "delete", "--sync", &id])?;
        Ok(())
    }
}

/// Runs `ctr --address SOCKET -n NAMESPACE ARGS...` (with [`CTR_TIMEOUT`]).
fn ctr(socket: &Path, namespace: &str, args: &[&str]) -> Result<Captured> {
    let mut cmd = Command::new(CTR_BIN);
    cmd.arg("--address").arg(socket).args(["-n", namespace]).args(args).env("PATH", PATH);
    run(cmd, CTR_TIMEOUT)
}

/// containerd's configuration: everything under `dir`, the gRPC (and CRI) socket at `socket`,
/// no TCP listener (the CRI streaming server on an ephemeral loopback port), snapshotters
/// that cannot work here disabled, CRI with `overlayfs` and runc.
fn config_toml(dir: &Path, socket: &Path) -> String {
    let d = dir.display();
    let s = socket.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{s}"

[ttrpc]
  address = "{s}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#
    )
}

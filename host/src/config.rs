//! The daemon's configuration file (`pullbox serve --config FILE`, TOML).
//!
//! Every key is optional; [`DaemonConfig::default`] documents the defaults, and the README
//! lists them. Unknown keys are refused, so a typo is an error at start rather than a
//! setting silently ignored.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The largest `registry.max_concurrent_downloads` accepted: each download in flight holds a
/// connection and an ingest; more than this many saturate any link without speeding it up.
pub const MAX_CONCURRENT_DOWNLOADS: usize = 256;

/// Which backend stores images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Everything under `root` (the default; nothing else to run).
    #[default]
    Embedded,
    /// containerd's content, snapshot, diff, image and lease services.
    Containerd,
}

/// The daemon's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// The CRI socket kubelet's `--image-service-endpoint` points at.
    pub socket: PathBuf,
    /// Permission bits of the socket, as an octal string ("0660": owner and group only).
    pub socket_mode: String,
    /// The embedded store's root (also holds the compiled-puller cache for both backends).
    pub root: PathBuf,
    /// `embedded` or `containerd`.
    pub backend: BackendKind,
    /// Flush each unpacked layer to disk before it is committed (embedded: see
    /// [`crate::backend::embedded::Options::sync_fs`]; containerd: `ApplyRequest.sync_fs`,
    /// see [`crate::backend::containerd::Config::sync_fs`]).
    pub sync_fs: bool,
    /// Embedded store: the largest uncompressed size of one layer, in bytes (see
    /// [`crate::backend::embedded::Options::max_layer_bytes`]; default 64 GiB).
    pub max_layer_bytes: u64,
    /// The puller component: a file, or `oci://REGISTRY/REPOSITORY@sha256:DIGEST` (see
    /// [`crate::artifact`]); empty: the default puller installed with pullbox.
    pub puller: Option<PathBuf>,
    /// The puller's settings document; empty: none (the puller's defaults).
    pub settings: Option<PathBuf>,
    /// Whether an `oci://` puller may name a tag instead of a digest (off: a tag can move).
    pub allow_puller_tags: bool,
    /// A candidate puller (file or `oci://`) that judges every pull on the side, read-only,
    /// on a replay of what the pull read; disagreements are logged and counted
    /// (`pullbox_shadow_disagreements_total`). Empty: none.
    pub shadow_puller: Option<PathBuf>,
    /// The shadow puller's settings document.
    pub shadow_settings: Option<PathBuf>,
    /// Where Prometheus metrics are served (`/metrics`); must be a loopback address. Empty:
    /// no metrics endpoint.
    pub metrics_address: Option<SocketAddr>,
    /// How long SIGTERM waits for in-flight requests before cancelling them, in seconds.
    pub shutdown_grace_seconds: u64,
    /// How often the disk use `ImageFsInfo` reports is measured, in seconds (containerd's
    /// `stats_collect_period`, default 10): the CRI call answers the last measurement instead
    /// of walking the store each time.
    pub image_fs_stats_period_seconds: f64,
    /// The containerd backend's settings.
    pub containerd: ContainerdSection,
    /// The puller's sandbox.
    pub sandbox: crate::engine::Limits,
    /// The registry transport.
    pub registry: RegistrySection,
    /// containerd's proxy snapshotter.
    pub snapshotter: SnapshotterSection,
}

/// `[snapshotter]`: pullbox as containerd's proxy snapshotter (see [`crate::snapshotter`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterSection {
    /// The unix socket containerd's `[proxy_plugins]` entry names; absent: not served. The
    /// socket is root's alone (mode 0600) and its directory is made `0700`, so give it a
    /// directory of its own (not the CRI socket's, whose group may need to reach it).
    pub address: Option<PathBuf>,
    /// The name containerd's `[proxy_plugins]` entry gives this snapshotter (default
    /// `pullbox`). When the containerd backend's `containerd.snapshotter` is this name, pullbox
    /// unpacks the layers of its pulls itself, into its own store (see
    /// [`crate::snapshotter::ProxyDiffer`]).
    pub name: String,
}

impl Default for SnapshotterSection {
    fn default() -> Self {
        SnapshotterSection { address: None, name: "pullbox".into() }
    }
}

impl DaemonConfig {
    /// Whether the containerd backend's snapshots are this daemon's proxy snapshotter's, so
    /// that layers are unpacked into pullbox's store by pullbox.
    pub fn unpacks_for_containerd(&self) -> bool {
        self.backend == BackendKind::Containerd
            && self.snapshotter.address.is_some()
            && self.containerd.snapshotter == self.snapshotter.name
    }
}

/// `[registry]`: how registries are reached.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// containerd's `hosts.toml` directory (mirrors, CAs, client certificates).
    pub hosts_dir: PathBuf,
    /// Seconds without a byte before a download is given up.
    pub stall_timeout_seconds: f64,
    /// Seconds a TCP connection may take.
    pub connect_timeout_seconds: f64,
    /// Attempts per host before the next host is tried.
    pub attempts: u32,
    /// Blobs downloading at the same time across all pulls of the daemon (containerd's key;
    /// default 3, as containerd's).
    pub max_concurrent_downloads: usize,
}

impl Default for RegistrySection {
    fn default() -> Self {
        let d = crate::registry::Config::default();
        RegistrySection {
            hosts_dir: PathBuf::from(crate::registry::DEFAULT_HOSTS_DIR),
            stall_timeout_seconds: d.stall_timeout.as_secs_f64(),
            connect_timeout_seconds: d.connect_timeout.as_secs_f64(),
            attempts: d.attempts,
            max_concurrent_downloads: d.max_concurrent_downloads,
        }
    }
}

impl RegistrySection {
    /// The transport settings.
    pub fn transport(&self) -> crate::registry::Config {
        crate::registry::Config {
            hosts_dir: Some(self.hosts_dir.clone()),
            stall_timeout: std::time::Duration::from_secs_f64(self.stall_timeout_seconds),
            connect_timeout: std::time::Duration::from_secs_f64(self.connect_timeout_seconds),
            attempts: self.attempts,
            max_concurrent_downloads: self.max_concurrent_downloads,
            ..crate::registry::Config::default()
        }
    }
}

/// `[containerd]`: where containerd is and what of it pullbox uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdSection {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// The namespace images are written in (`k8s.io` is the one containerd's CRI uses).
    pub namespace: String,
    /// The snapshotter layers are unpacked with.
    pub snapshotter: String,
    /// Other snapshotters a puller may choose (`snapshots.select`), for example by runtime
    /// class (the default puller's `runtimePlatforms`); each must exist in containerd.
    pub snapshotters: Vec<String>,
    /// containerd's root directory: `ImageFsInfo` reports the snapshotter's directory in it.
    pub root: PathBuf,
}

impl Default for ContainerdSection {
    fn default() -> Self {
        let backend = crate::backend::containerd::Config::default();
        ContainerdSection {
            address: backend.address,
            namespace: backend.namespace,
            snapshotter: backend.snapshotter,
            snapshotters: backend.snapshotters,
            root: PathBuf::from("/var/lib/containerd"),
        }
    }
}

impl ContainerdSection {
    /// The containerd backend's settings this section gives (with the daemon's `sync_fs`).
    pub fn backend(&self, sync_fs: bool) -> crate::backend::containerd::Config {
        crate::backend::containerd::Config {
            address: self.address.clone(),
            namespace: self.namespace.clone(),
            snapshotter: self.snapshotter.clone(),
            snapshotters: self.snapshotters.clone(),
            sync_fs,
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from("/run/pullbox/pullbox.sock"),
            socket_mode: "0660".into(),
            root: PathBuf::from("/var/lib/pullbox"),
            backend: BackendKind::Embedded,
            sync_fs: false,
            max_layer_bytes: crate::backend::embedded::DEFAULT_MAX_LAYER_BYTES,
            puller: None,
            settings: None,
            allow_puller_tags: false,
            shadow_puller: None,
            shadow_settings: None,
            metrics_address: None,
            shutdown_grace_seconds: 10,
            image_fs_stats_period_seconds: 10.0,
            containerd: ContainerdSection::default(),
            sandbox: crate::engine::Limits::default(),
            registry: RegistrySection::default(),
            snapshotter: SnapshotterSection::default(),
        }
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration in {path}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid configuration in {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl DaemonConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config: DaemonConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        config.validate().map_err(|reason| ConfigError::Invalid { path: path.into(), reason })?;
        Ok(config)
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.mode()?;
        self.sandbox.validate()?;
        if self.shadow_settings.is_some() && self.shadow_puller.is_none() {
            return Err("shadow_settings is set but shadow_puller is not".into());
        }
        if self.max_layer_bytes == 0 {
            return Err("max_layer_bytes must be positive".into());
        }
        let r = &self.registry;
        let ok = |v: f64| v.is_finite() && v > 0.0 && v <= 86_400.0;
        if !ok(r.stall_timeout_seconds) || !ok(r.connect_timeout_seconds) || r.attempts == 0 {
            return Err("registry timeouts must be between 0 and 86400 seconds and attempts positive".into());
        }
        if r.max_concurrent_downloads == 0 || r.max_concurrent_downloads > MAX_CONCURRENT_DOWNLOADS {
            return Err(format!("registry.max_concurrent_downloads must be between 1 and {MAX_CONCURRENT_DOWNLOADS}"));
        }
        if !ok(self.image_fs_stats_period_seconds) {
            return Err("image_fs_stats_period_seconds must be between 0 and 86400".into());
        }
        if let Some(addr) = self.metrics_address {
            if !addr.ip().is_loopback() {
                return Err(format!("metrics_address {addr} is not a loopback address"));
            }
        }
        if self.containerd.namespace.is_empty() || self.containerd.snapshotter.is_empty() {
            return Err("containerd.namespace and containerd.snapshotter must not be empty".into());
        }
        Ok(())
    }

    /// The socket's permission bits.
    pub fn mode(&self) -> Result<u32, String> {
        let m = u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .map_err(|_| format!("socket_mode {:?} is not an octal mode", self.socket_mode))?;
        if m > 0o777 {
            return Err(format!("socket_mode {:?} is not a permission mode", self.socket_mode));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c: DaemonConfig = toml::from_str("").unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/pullbox/pullbox.sock"));
        assert_eq!(c.mode().unwrap(), 0o660);
        assert_eq!(c.backend, BackendKind::Embedded);
        let c: DaemonConfig = toml::from_str("backend = \"containerd\"\n[containerd]\nnamespace = \"x\"\n").unwrap();
        assert_eq!(c.backend, BackendKind::Containerd);
        assert_eq!(c.containerd.namespace, "x");
        assert_eq!(c.containerd.snapshotter, "overlayfs");
        assert_eq!(c.snapshotter.address, None);
        let c: DaemonConfig = toml::from_str("[snapshotter]\naddress = \"/run/pullbox/snapshotter/s.sock\"\n").unwrap();
        assert_eq!(c.snapshotter.address, Some(PathBuf::from("/run/pullbox/snapshotter/s.sock")));
        assert!(toml::from_str::<DaemonConfig>("[snapshotter]\nadress = \"/x\"").is_err());
        assert!(!c.unpacks_for_containerd());
        let c: DaemonConfig = toml::from_str(
            "backend = \"containerd\"\n[containerd]\nsnapshotter = \"pullbox\"\n[snapshotter]\naddress = \"/s\"\n",
        )
        .unwrap();
        assert!(c.unpacks_for_containerd());
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(toml::from_str::<DaemonConfig>("sokcet = \"/x\"").is_err());
        assert!(toml::from_str::<DaemonConfig>("backend = \"zfs\"").is_err());
        let c: DaemonConfig = toml::from_str("socket_mode = \"999\"").unwrap();
        assert!(c.validate().is_err());
        let c: DaemonConfig = toml::from_str("metrics_address = \"0.0.0.0:9000\"").unwrap();
        assert!(c.validate().is_err());
        let c: DaemonConfig = toml::from_str("max_layer_bytes = 0").unwrap();
        assert!(c.validate().is_err());
        let c: DaemonConfig = toml::from_str("[registry]\nmax_concurrent_downloads = 0").unwrap();
        assert!(c.validate().is_err());
        let c: DaemonConfig = toml::from_str("[registry]\nmax_concurrent_downloads = 5").unwrap();
        assert_eq!(c.registry.transport().max_concurrent_downloads, 5);
        assert_eq!(DaemonConfig::default().registry.transport().max_concurrent_downloads, 3);
        let c: DaemonConfig = toml::from_str("image_fs_stats_period_seconds = 0").unwrap();
        assert!(c.validate().is_err());
        assert_eq!(DaemonConfig::default().image_fs_stats_period_seconds, 10.0);
        let c: DaemonConfig = toml::from_str("max_layer_bytes = 1048576").unwrap();
        assert_eq!(c.max_layer_bytes, 1 << 20);
        assert_eq!(DaemonConfig::default().max_layer_bytes, 64 << 30);
    }
}

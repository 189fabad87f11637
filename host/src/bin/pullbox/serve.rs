//! `serve`: the daemon. Serves the CRI `ImageService` on a unix socket until SIGTERM or
//! SIGINT, then stops accepting, cancels the pulls in flight and waits (up to the configured
//! grace period) until they have cleaned up, and removes the socket. Every connection goes
//! through the CRI's HTTP/2 shim (`pullbox::cri::authority`), so grpc C-core clients, which
//! send the socket path as `:authority`, are served.
//!
//! At start it collects what killed pulls left behind (leases whose process is gone), loads
//! the puller and checks its settings, so a broken module or settings file fails the start
//! instead of the first pull.
//!
//! Live swap: on SIGHUP, and when the puller or settings file changes (checked every
//! [`RELOAD_POLL`]), the module is loaded, linked against the world and configured with the
//! settings before it replaces the current one; calls in flight finish on the old one. A
//! module or settings that fail leave the last good puller serving; the failure is logged and
//! counted (`pullbox_puller_reloads_total{result="error"}`).

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use k8s_cri::v1::image_service_server::ImageServiceServer;
use pullbox::{
    backend::{embedded, Backend},
    config::{BackendKind, DaemonConfig},
    cri::{authority::NormalizeAuthority, Cri},
    engine::Runtime,
    metrics::Metrics,
    registry::Client,
    service::ImageService,
};
use tokio::signal::unix::{signal, SignalKind};

/// What the command line may override in the configuration file.
pub struct Overrides {
    pub root: Option<PathBuf>,
    pub puller: Option<PathBuf>,
    pub settings: Option<PathBuf>,
    /// `--sync-fs`: on when given (the file's `sync_fs` otherwise).
    pub sync_fs: bool,
    /// `--max-layer-bytes`, when given.
    pub max_layer_bytes: Option<u64>,
    /// `--snapshotter-address`, when given.
    pub snapshotter_address: Option<PathBuf>,
}

/// `pullbox serve [--config FILE]`.
pub async fn serve(config: Option<&Path>, overrides: Overrides) -> anyhow::Result<()> {
    let mut config = match config {
        Some(p) => DaemonConfig::load(p)?,
        None => DaemonConfig::default(),
    };
    if let Some(r) = overrides.root {
        config.root = r;
    }
    config.puller = overrides.puller.or(config.puller);
    config.settings = overrides.settings.or(config.settings);
    config.sync_fs |= overrides.sync_fs;
    config.max_layer_bytes = overrides.max_layer_bytes.unwrap_or(config.max_layer_bytes);
    config.snapshotter.address = overrides.snapshotter_address.or(config.snapshotter.address);

    // Signals are taken before the sockets exist: a client that sees the socket may send
    // SIGHUP at once, and SIGHUP's default action would end the daemon.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let snapshotter = match &config.snapshotter.address {
        Some(path) => Some(serve_snapshotter(&config, path).await?),
        None => None,
    };
    let (backend, fs_root) = open_backend(&config).await?;
    match backend.leases.collect().await {
        Ok(r) => tracing::info!(
            blobs = r.blobs,
            snapshots = r.snapshots,
            ingests = r.ingests,
            leases = r.leases,
            bytes = r.bytes,
            "collected what earlier runs left behind"
        ),
        Err(e) => tracing::warn!("start-up garbage collection failed: {}", e.chain()),
    }

    let puller_path = match &config.puller {
        Some(p) => p.clone(),
        None => crate::default_puller()?,
    };
    let settings = match &config.settings {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read settings {}", p.display()))?,
        None => String::new(),
    };
    let runtime = Runtime::new(Some(config.root.join("cache")), config.sandbox.clone())?;
    let mut watched = Watched::new(&puller_path, config.settings.as_deref());
    let puller = runtime.load(&puller_path, settings).await?;
    let service = Arc::new(ImageService::new(backend, Arc::new(Client::with_config(config.registry.transport())?), puller));
    service.check().await.with_context(|| format!("puller {} refuses its settings", puller_path.display()))?;

    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = config.metrics_address {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = m.serve(addr).await {
                tracing::error!("metrics endpoint on {addr} failed: {e}");
            }
        });
    }

    let listener = bind(&config.socket, config.mode().map_err(anyhow::Error::msg)?)?;
    tracing::info!(socket = %config.socket.display(), puller = %puller_path.display(), "serving the CRI image service");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stats_period = std::time::Duration::from_secs_f64(config.image_fs_stats_period_seconds);
    let cri = Cri::new(service.clone(), metrics.clone(), fs_root, stats_period, shutdown.clone());
    let pulls = cri.pulls();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ImageServiceServer::new(cri))
            .serve_with_incoming_shutdown(
                tokio_stream::StreamExt::map(tokio_stream::wrappers::UnixListenerStream::new(listener), |conn| {
                    conn.map(NormalizeAuthority::new)
                }),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    let mut poll = tokio::time::interval(RELOAD_POLL);
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the puller");
                watched.refresh();
                reload(&runtime, &service, &metrics, &puller_path, config.settings.as_deref()).await;
            }
            _ = poll.tick() => {
                if watched.changed() {
                    tracing::info!("puller or settings file changed: reloading");
                    reload(&runtime, &service, &metrics, &puller_path, config.settings.as_deref()).await;
                }
            }
        }
    }
    let _ = stop_tx.send(());
    // In-flight pulls are cancelled: each stops its downloads and deletes its lease.
    shutdown.cancel();
    pulls.close();
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    if tokio::time::timeout(grace, pulls.wait()).await.is_err() {
        tracing::warn!("pulls still cleaning up after {grace:?}; their leases are collected at the next start");
    }
    let result = match tokio::time::timeout(grace, server).await {
        Ok(joined) => joined.context("server task failed")?.context("CRI server failed"),
        Err(_) => {
            tracing::warn!("requests still in flight after {grace:?}; stopping them");
            Ok(())
        }
    };
    remove_socket(&config.socket);
    if let Some((path, stop)) = snapshotter {
        let _ = stop.send(());
        remove_socket(&path);
    }
    result
}

/// Serves containerd's snapshots API on `path` (root's alone: the socket `0600` in a `0700`
/// directory), backed by the embedded store at the root, until the returned sender fires.
/// Started before the backend is opened (and the CRI socket), so that containerd finds its
/// proxy snapshotter as early as possible.
async fn serve_snapshotter(
    config: &DaemonConfig,
    path: &Path,
) -> anyhow::Result<(PathBuf, tokio::sync::oneshot::Sender<()>)> {
    let options = embedded::Options { sync_fs: config.sync_fs, max_layer_bytes: config.max_layer_bytes };
    let store = pullbox::snapshotter::ProxyStore::open(&config.root, options)
        .await
        .with_context(|| format!("cannot open the store at {} for the snapshotter", config.root.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    }
    let listener = bind(path, 0o600)?;
    tracing::info!(socket = %path.display(), "serving containerd's snapshots API (proxy snapshotter)");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(pullbox::snapshotter::Server::new(store).into_service())
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("snapshotter server failed: {e}");
        }
    });
    Ok((path.to_owned(), stop_tx))
}

/// How often the puller and settings files are checked for changes.
const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Loads the puller and settings anew and swaps them in if they work.
async fn reload(runtime: &Runtime, service: &ImageService, metrics: &Metrics, puller: &Path, settings: Option<&Path>) {
    let result = async {
        let text = match settings {
            Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read settings {}", p.display()))?,
            None => String::new(),
        };
        let new = runtime.load(puller, text).await?;
        service.swap_puller(new).await.with_context(|| format!("puller {} refuses its settings", puller.display()))?;
        anyhow::Ok(())
    }
    .await;
    metrics.reload_done(result.is_ok());
    match result {
        Ok(()) => tracing::info!(puller = %puller.display(), "puller reloaded"),
        Err(e) => tracing::error!("reload failed, the previous puller keeps serving: {e:#}"),
    }
}

/// Change detection for the puller and settings files: size and modification time.
struct Watched {
    files: Vec<PathBuf>,
    seen: Vec<Option<(u64, std::time::SystemTime)>>,
}

impl Watched {
    fn new(puller: &Path, settings: Option<&Path>) -> Watched {
        let files: Vec<PathBuf> = std::iter::once(puller).chain(settings).map(Path::to_owned).collect();
        let mut w = Watched { seen: vec![None; files.len()], files };
        w.refresh();
        w
    }

    fn stamps(&self) -> Vec<Option<(u64, std::time::SystemTime)>> {
        self.files
            .iter()
            .map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.len(), m.modified().ok()?))))
            .collect()
    }

    /// Records the files' current state.
    fn refresh(&mut self) {
        self.seen = self.stamps();
    }

    /// Whether a file changed since the last call (or refresh).
    fn changed(&mut self) -> bool {
        let now = self.stamps();
        let changed = now != self.seen;
        self.seen = now;
        changed
    }
}

/// Opens the configured backend and names the directory `ImageFsInfo` reports.
async fn open_backend(config: &DaemonConfig) -> anyhow::Result<(Backend, PathBuf)> {
    Ok(match config.backend {
        BackendKind::Embedded => {
            let options = embedded::Options { sync_fs: config.sync_fs, max_layer_bytes: config.max_layer_bytes };
            let backend = embedded::open_with(&config.root, options)
                .with_context(|| format!("cannot open the store at {}", config.root.display()))?;
            (backend, config.root.join("snapshots"))
        }
        BackendKind::Containerd => {
            let c = &config.containerd;
            let backend = pullbox::backend::containerd::connect(&pullbox::backend::containerd::Config {
                address: c.address.clone(),
                namespace: c.namespace.clone(),
                snapshotter: c.snapshotter.clone(),
                sync_fs: config.sync_fs,
            })
            .await
            .with_context(|| format!("cannot use containerd at {}", c.address.display()))?;
            if config.unpacks_for_containerd() {
                // Snapshots are this daemon's proxy snapshotter's: pullbox unpacks into them.
                let options = embedded::Options { sync_fs: config.sync_fs, max_layer_bytes: config.max_layer_bytes };
                let local = embedded::open_with(&config.root, options)
                    .with_context(|| format!("cannot open the store at {}", config.root.display()))?;
                let differ = pullbox::snapshotter::ProxyDiffer::new(backend.differ.clone(), local.differ);
                tracing::info!(
                    snapshotter = c.snapshotter,
                    root = %config.root.display(),
                    "layers are unpacked by pullbox into its store while they download"
                );
                (Backend { differ: Arc::new(differ), ..backend }, config.root.join("snapshots"))
            } else {
                (backend, c.root.join(format!("io.containerd.snapshotter.v1.{}", c.snapshotter)))
            }
        }
    })
}

/// Binds the CRI socket with `mode`, replacing a stale socket but nothing else.
fn bind(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{} is in use by another server", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
}

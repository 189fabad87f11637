//! `serve`: the daemon. Serves the CRI `ImageService` on a unix socket until SIGTERM or
//! SIGINT, then stops accepting, lets requests in flight finish for the configured grace
//! period, and removes the socket.
//!
//! At start it collects what killed pulls left behind (leases whose process is gone), loads
//! the puller and checks its settings, so a broken module or settings file fails the start
//! instead of the first pull.

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
    cri::Cri,
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
    let puller = runtime.load(&puller_path, settings).await?;
    let service = Arc::new(ImageService::new(backend, Arc::new(Client::new()?), puller));
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
    let cri = Cri::new(service, metrics, fs_root);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ImageServiceServer::new(cri))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = stop_tx.send(());
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let result = match tokio::time::timeout(grace, server).await {
        Ok(joined) => joined.context("server task failed")?.context("CRI server failed"),
        Err(_) => {
            tracing::warn!("requests still in flight after {grace:?}; stopping them");
            Ok(())
        }
    };
    remove_socket(&config.socket);
    result
}

/// Opens the configured backend and names the directory `ImageFsInfo` reports.
async fn open_backend(config: &DaemonConfig) -> anyhow::Result<(Backend, PathBuf)> {
    Ok(match config.backend {
        BackendKind::Embedded => {
            let backend = embedded::open(&config.root)
                .with_context(|| format!("cannot open the store at {}", config.root.display()))?;
            (backend, config.root.join("snapshots"))
        }
        BackendKind::Containerd => {
            let c = &config.containerd;
            let backend = pullbox::backend::containerd::connect(&pullbox::backend::containerd::Config {
                address: c.address.clone(),
                namespace: c.namespace.clone(),
                snapshotter: c.snapshotter.clone(),
            })
            .await
            .with_context(|| format!("cannot use containerd at {}", c.address.display()))?;
            (backend, c.root.join(format!("io.containerd.snapshotter.v1.{}", c.snapshotter)))
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

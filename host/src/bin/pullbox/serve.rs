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
//! Live swap: on SIGHUP, and when the configuration file, a puller file or a settings file
//! changes (checked every [`RELOAD_POLL`]), the configuration's live keys ([`Live`]: puller,
//! settings, shadow puller) are read again; the module is loaded, linked against the world and
//! configured with the settings before it replaces the current one; calls in flight finish on
//! the old one. A puller from a registry (`oci://…@sha256:…`, see `pullbox::artifact`) is
//! fetched once per digest; a reload that finds the same digest and settings keeps the loaded
//! puller. A module or settings that fail leave the last good puller serving; the failure is
//! logged and counted (`pullbox_puller_reloads_total{result="error"}`). A shadow puller
//! (`shadow_puller`) judges each pull on the side (`pullbox::verdict::Shadow`).

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use k8s_cri::v1::image_service_server::ImageServiceServer;
use pullbox::{
    artifact::{self, Source},
    backend::{embedded, Backend},
    config::{BackendKind, DaemonConfig},
    cri::{authority::NormalizeAuthority, Cri},
    engine::{Puller, Runtime},
    metrics::Metrics,
    registry::{Client, Credentials, DockerConfig},
    service::ImageService,
    verdict::Shadow,
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
    let config_file = config;
    let mut config = match config {
        Some(p) => DaemonConfig::load(p)?,
        None => DaemonConfig::default(),
    };
    if let Some(r) = &overrides.root {
        config.root = r.clone();
    }
    config.sync_fs |= overrides.sync_fs;
    config.max_layer_bytes = overrides.max_layer_bytes.unwrap_or(config.max_layer_bytes);
    config.snapshotter.address = overrides.snapshotter_address.clone().or(config.snapshotter.address);

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
    if config.unpacks_for_containerd() {
        await_containerd_reconnect(&backend).await;
    }
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

    let metrics = Arc::new(Metrics::new());
    let client = Arc::new(Client::with_config(config.registry.transport())?);
    let loader = Loader {
        runtime: Runtime::new(Some(config.root.join("cache")), config.sandbox.clone())?,
        client: client.clone(),
        credentials: docker_credentials(),
        cache: config.root.join("cache/pullers"),
    };
    let mut live = Live::from(&config, &overrides);
    let loaded = loader.load(live.puller.as_deref(), live.settings.as_deref(), live.allow_puller_tags).await?;
    let mut current = loaded.key;
    let service = Arc::new(ImageService::new(backend, client, loaded.puller));
    service.check().await.with_context(|| format!("puller {} refuses its settings", current.source))?;
    let mut shadow_current = None;
    if live.shadow_puller.is_some() {
        shadow_current = Some(set_shadow(&loader, &service, &metrics, &live).await?);
    }
    let mut watched = Watched::new(live.files(config_file, &current, shadow_current.as_ref()));
    if let Some(addr) = config.metrics_address {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = m.serve(addr).await {
                tracing::error!("metrics endpoint on {addr} failed: {e}");
            }
        });
    }

    let listener = bind(&config.socket, config.mode().map_err(anyhow::Error::msg)?)?;
    tracing::info!(socket = %config.socket.display(), puller = %current.source, "serving the CRI image service");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stats_period = std::time::Duration::from_secs_f64(config.image_fs_stats_period_seconds);
    let cri = Cri::new(service.clone(), metrics.clone(), fs_root, stats_period, shutdown.clone());
    let pulls = cri.pulls();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(ImageServiceServer::new(cri)).serve_with_incoming_shutdown(
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
                reload(&loader, &service, &metrics, (config_file, &overrides), (&mut live, &mut current, &mut shadow_current)).await;
                watched = Watched::new(live.files(config_file, &current, shadow_current.as_ref()));
            }
            _ = poll.tick() => {
                if watched.changed() {
                    tracing::info!("configuration, puller or settings file changed: reloading");
                    reload(&loader, &service, &metrics, (config_file, &overrides), (&mut live, &mut current, &mut shadow_current)).await;
                    watched = Watched::new(live.files(config_file, &current, shadow_current.as_ref()));
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

/// The part of the configuration a reload applies: the puller, the shadow puller and their
/// settings. The configuration file is read again at each reload; `--puller` and
/// `--settings` on the command line keep precedence.
#[derive(Debug, Clone, PartialEq)]
struct Live {
    puller: Option<PathBuf>,
    settings: Option<PathBuf>,
    allow_puller_tags: bool,
    shadow_puller: Option<PathBuf>,
    shadow_settings: Option<PathBuf>,
}

impl Live {
    fn from(config: &DaemonConfig, overrides: &Overrides) -> Live {
        Live {
            puller: overrides.puller.clone().or_else(|| config.puller.clone()),
            settings: overrides.settings.clone().or_else(|| config.settings.clone()),
            allow_puller_tags: config.allow_puller_tags,
            shadow_puller: config.shadow_puller.clone(),
            shadow_settings: config.shadow_settings.clone(),
        }
    }

    /// The files whose change triggers a reload: the configuration file, the settings files,
    /// and the pullers that are files (a puller from a registry changes only with its
    /// reference, which is in the configuration).
    fn files(&self, config: Option<&Path>, puller: &Key, shadow: Option<&Key>) -> Vec<PathBuf> {
        let pullers = std::iter::once(puller).chain(shadow).filter(|k| k.is_file).map(|k| k.file.clone());
        config
            .map(Path::to_owned)
            .into_iter()
            .chain(pullers)
            .chain(self.settings.clone())
            .chain(self.shadow_settings.clone())
            .collect()
    }
}

/// What a loaded puller was loaded from: its source as configured, its component file and
/// its settings. A reload that finds the same key for a puller from a registry (same digest,
/// same settings) keeps the loaded one.
#[derive(Debug, Clone, PartialEq)]
struct Key {
    source: String,
    file: PathBuf,
    is_file: bool,
    settings: String,
}

/// A puller loaded with the key it was loaded from.
struct Loaded {
    puller: Puller,
    key: Key,
}

/// Loads pullers from files or registries.
struct Loader {
    runtime: Runtime,
    client: Arc<Client>,
    /// Credentials for pullers from registries: Docker's `config.json`, when there is one.
    credentials: Credentials,
    /// Where pullers fetched from registries are kept, by manifest digest.
    cache: PathBuf,
}

impl Loader {
    /// The component file and settings of `source` (the default puller when `None`).
    async fn key(&self, source: Option<&Path>, settings: Option<&Path>, allow_tags: bool) -> anyhow::Result<Key> {
        let source = match source {
            Some(p) => Source::parse(p)?,
            None => Source::File(crate::default_puller()?),
        };
        let (file, _) = artifact::fetch(&self.client, &source, &self.credentials, &self.cache, allow_tags).await?;
        let settings = match settings {
            Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read settings {}", p.display()))?,
            None => String::new(),
        };
        Ok(Key { source: source.to_string(), file, is_file: matches!(source, Source::File(_)), settings })
    }

    /// Loads the puller of `source` with `settings`.
    async fn load(&self, source: Option<&Path>, settings: Option<&Path>, allow_tags: bool) -> anyhow::Result<Loaded> {
        let key = self.key(source, settings, allow_tags).await?;
        let puller = self.runtime.load(&key.file, key.settings.clone()).await?;
        Ok(Loaded { puller, key })
    }
}

/// Credentials from Docker's `config.json` (`$DOCKER_CONFIG`, `~/.docker`), anonymous without.
fn docker_credentials() -> Credentials {
    match DockerConfig::default_path().filter(|p| p.is_file()).map(|p| DockerConfig::load(&p)) {
        Some(Ok(config)) => Credentials::from_provider(Arc::new(config)),
        Some(Err(e)) => {
            tracing::warn!("cannot read Docker's config.json; fetching pullers anonymously: {}", e.chain());
            Credentials::anonymous()
        }
        None => Credentials::anonymous(),
    }
}

/// Loads the shadow puller `live` names and makes it judge the service's pulls.
async fn set_shadow(
    loader: &Loader,
    service: &ImageService,
    metrics: &Arc<Metrics>,
    live: &Live,
) -> anyhow::Result<Key> {
    let loaded =
        loader.load(live.shadow_puller.as_deref(), live.shadow_settings.as_deref(), live.allow_puller_tags).await?;
    let scratch = Arc::new(pullbox::session::Session::new(service.backend().clone(), loader.client.clone()));
    loaded
        .puller
        .check(scratch)
        .await
        .with_context(|| format!("shadow puller {} refuses its settings", loaded.key.source))?;
    let m = metrics.clone();
    service.set_shadow(Some(Shadow::new(loaded.puller, Arc::new(move |c| m.shadow_done(c)))));
    tracing::info!(shadow_puller = loaded.key.source, "shadow puller judging every pull");
    Ok(loaded.key)
}

/// Reads the configuration again and swaps in the puller and shadow puller it names if they
/// changed and work. A puller or settings that fail leave the last good one serving; the
/// failure is logged and counted.
async fn reload(
    loader: &Loader,
    service: &ImageService,
    metrics: &Arc<Metrics>,
    (config_file, overrides): (Option<&Path>, &Overrides),
    (live, current, shadow): (&mut Live, &mut Key, &mut Option<Key>),
) {
    let result = async {
        if let Some(path) = config_file {
            *live = Live::from(&DaemonConfig::load(path)?, overrides);
        }
        let key = loader.key(live.puller.as_deref(), live.settings.as_deref(), live.allow_puller_tags).await?;
        if !key.is_file && key == *current {
            tracing::info!(puller = key.source, "puller and settings unchanged; not reloaded");
        } else {
            let new = loader.runtime.load(&key.file, key.settings.clone()).await?;
            service.swap_puller(new).await.with_context(|| format!("puller {} refuses its settings", key.source))?;
            tracing::info!(puller = key.source, "puller reloaded");
            *current = key;
        }
        match &live.shadow_puller {
            Some(_) => *shadow = Some(set_shadow(loader, service, metrics, live).await?),
            None if shadow.is_some() => {
                service.set_shadow(None);
                *shadow = None;
                tracing::info!("shadow puller removed");
            }
            None => {}
        }
        anyhow::Ok(())
    }
    .await;
    metrics.reload_done(result.is_ok());
    if let Err(e) = result {
        tracing::error!("reload failed, the previous puller keeps serving: {e:#}");
    }
}

/// Change detection for the puller and settings files: size and modification time.
struct Watched {
    files: Vec<PathBuf>,
    seen: Vec<Option<(u64, std::time::SystemTime)>>,
}

impl Watched {
    fn new(files: Vec<PathBuf>) -> Watched {
        let mut w = Watched { seen: vec![None; files.len()], files };
        w.refresh();
        w
    }

    fn stamps(&self) -> Vec<Option<(u64, std::time::SystemTime)>> {
        self.files.iter().map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.len(), m.modified().ok()?)))).collect()
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
            let backend = pullbox::backend::containerd::connect(&c.backend(config.sync_fs))
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

/// How long a restarted daemon waits for containerd to reach its proxy snapshotter again.
const PROXY_RECONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits until containerd reaches this daemon's proxy snapshotter. After a restart of pullbox,
/// containerd's connection to the old socket is broken and its gRPC client redials only after
/// a backoff (up to a few seconds); until then every call containerd forwards to the
/// snapshotter fails at once with `unavailable`, and so would the start-up collection and the
/// first pulls. The probe is what a pull does first: prepare a snapshot (under a lease of its
/// own, which is deleted at once, so containerd's collector removes the probe). After
/// [`PROXY_RECONNECT_TIMEOUT`] the daemon serves anyway, and says so.
async fn await_containerd_reconnect(backend: &Backend) {
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        let answer = match backend.leases.create().await {
            Ok(lease) => {
                let key = format!("pullbox-reconnect-probe-{}", lease.0);
                let prepared = backend.snapshots.prepare(&key, "", &lease).await;
                let _ = backend.leases.delete(&lease).await;
                prepared.map(drop)
            }
            Err(e) => Err(e),
        };
        match answer {
            Err(pullbox::error::Error::Unavailable { what, .. }) if started.elapsed() < PROXY_RECONNECT_TIMEOUT => {
                if !said {
                    tracing::info!("waiting for containerd to reconnect to the proxy snapshotter: {what}");
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::warn!("containerd cannot use the proxy snapshotter (serving anyway): {e}");
                return;
            }
            Ok(()) => {
                if said {
                    tracing::info!(after = ?started.elapsed(), "containerd reaches the proxy snapshotter again");
                }
                return;
            }
        }
    }
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

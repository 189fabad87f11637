//! The `pullbox` command line: `pull`, `images`, `inspect`, `rmi` and `gc` on a store root,
//! `policy check` and `policy test` on a puller component. One module per command family.
//!
//! `--puller` may also be `oci://REGISTRY/REPOSITORY@sha256:DIGEST`: a puller published as an
//! OCI artifact, fetched with the same transport and credentials as images and kept under
//! the root (`pullbox::artifact`); a tag instead of a digest needs `--allow-puller-tags`.
//!
//! Every store command takes `--root DIR` (or `PULLBOX_ROOT`); the default is
//! `/var/lib/pullbox` for root and `$XDG_DATA_HOME/pullbox` (or `~/.local/share/pullbox`)
//! otherwise. The puller is `--puller FILE` (or `PULLBOX_PULLER`), else the default puller
//! installed beside the binary. Errors go to stderr with a non-zero exit.
//!
//! The store is the embedded one under the root, or with `--backend containerd` containerd's
//! services at `--containerd-address`, in `--containerd-namespace` (the daemon's
//! `[containerd]` defaults); the root then holds only the compiled-puller cache.
//!
//! Registry access: `--hosts-dir` is containerd's hosts directory (mirrors, CAs, client
//! certificates; default `/etc/containerd/certs.d`), `--docker-config` Docker's
//! `config.json` with credentials (default `$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`), `--stall-timeout` the seconds without data after which a
//! download is cancelled. Ctrl-C during `pull` cancels it: downloads stop and what the pull
//! wrote is collected.

mod images;
mod mount;
mod policy;
mod progress;
mod pull;
mod serve;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use pullbox::{
    backend::{self, embedded, Backend},
    config::{BackendKind, ContainerdSection},
    engine::Runtime,
    registry::{self, Client},
    service::{ImageService, PodContext, PullContext},
};

/// Pulls container images through a sandboxed WebAssembly puller.
#[derive(Parser)]
#[command(name = "pullbox", version, about)]
struct Cli {
    /// Store root directory.
    #[arg(long, global = true, env = "PULLBOX_ROOT")]
    root: Option<PathBuf>,

    /// Where images are stored: `embedded` (under the root) or `containerd`.
    #[arg(long, global = true, env = "PULLBOX_BACKEND", default_value = "embedded", value_parser = parse_backend)]
    backend: BackendKind,

    /// containerd's socket (`--backend containerd`).
    #[arg(long, global = true, env = "PULLBOX_CONTAINERD_ADDRESS", default_value_os_t = ContainerdSection::default().address)]
    containerd_address: PathBuf,

    /// The containerd namespace images are written in (`--backend containerd`).
    #[arg(long, global = true, env = "PULLBOX_CONTAINERD_NAMESPACE", default_value_t = ContainerdSection::default().namespace)]
    containerd_namespace: String,

    /// Puller component (.wasm) making the decisions; default: the one installed with pullbox.
    #[arg(long, global = true, env = "PULLBOX_PULLER")]
    puller: Option<PathBuf>,

    /// Settings document (JSON for the default puller) handed to the puller's `configure`.
    #[arg(long, global = true, env = "PULLBOX_SETTINGS")]
    settings: Option<PathBuf>,

    /// Let `--puller oci://…` name a tag instead of a digest (a tag can move).
    #[arg(long, global = true, env = "PULLBOX_ALLOW_PULLER_TAGS")]
    allow_puller_tags: bool,

    /// Guest CPU time one puller call may use, in milliseconds (default 5000).
    #[arg(long, global = true, env = "PULLBOX_GUEST_CPU_MS")]
    guest_cpu_ms: Option<u64>,

    /// Log filter, for example `info` or `pullbox=debug,puller=debug`.
    #[arg(long, global = true, env = "PULLBOX_LOG", default_value = "warn")]
    log: String,

    /// containerd's registry hosts directory (`<registry>/hosts.toml`: mirrors, CAs, client
    /// certificates, skip_verify, headers).
    #[arg(long, global = true, env = "PULLBOX_HOSTS_DIR", default_value = registry::DEFAULT_HOSTS_DIR)]
    hosts_dir: PathBuf,

    /// Docker's config.json with registry credentials (`auths`, `credHelpers`, `credsStore`);
    /// default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json.
    #[arg(long, global = true, env = "PULLBOX_DOCKER_CONFIG")]
    docker_config: Option<PathBuf>,

    /// Seconds without data from a registry after which a download is cancelled (fractions
    /// allowed, for example 2.5).
    #[arg(long, global = true, env = "PULLBOX_STALL_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    stall_timeout: Duration,

    /// Flush each snapshot to disk (one syncfs) before committing it, so that pulled images
    /// survive a power loss (containerd CRI's image_pull_with_sync_fs).
    #[arg(long, global = true, env = "PULLBOX_SYNC_FS")]
    sync_fs: bool,

    /// The largest uncompressed size of one layer, in bytes (default 64 GiB); a larger layer
    /// fails the pull as resource-exhausted.
    #[arg(long, global = true, env = "PULLBOX_MAX_LAYER_BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    max_layer_bytes: Option<u64>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull an image; prints its ID (sha256:…) as the last line.
    Pull {
        /// Platform to pick from a multi-platform image, os/arch[/variant].
        #[arg(long)]
        platform: Option<String>,
        /// The runtime handler (runtime class) to pull for, as the CRI's
        /// `ImageSpec.runtime_handler`; the puller's policy may depend on it.
        #[arg(long, default_value = "")]
        runtime_handler: String,
        /// Pull as for a pod in this Kubernetes namespace (the puller's per-namespace
        /// policy applies); without it the pull is for no pod.
        #[arg(long)]
        pod_namespace: Option<String>,
        /// Also write what the pull resolved and read (indexes, manifests, configs; no layers)
        /// into DIR, for `pullbox policy test` to replay.
        #[arg(long, value_name = "DIR")]
        record: Option<PathBuf>,
        /// Image reference, for example `busybox` or `127.0.0.1:5000/team/app:1.0`.
        reference: String,
    },
    /// List images.
    Images {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one image as JSON: ID, names, chain ID, size and config.
    Inspect {
        /// A reference, an image ID, or an unambiguous ID prefix.
        image: String,
    },
    /// Remove an image: all its tags, digests and ID.
    Rmi {
        /// A reference, an image ID, or an unambiguous ID prefix.
        image: String,
    },
    /// Remove content and snapshots that no image and no live pull refers to.
    Gc,
    /// Mount an image's root filesystem read-only at DIR (needs root), like `ctr images mount`.
    Mount {
        /// A reference, an image ID, or an unambiguous ID prefix.
        image: String,
        /// An existing directory.
        dir: PathBuf,
    },
    /// Unmount what `pullbox mount` mounted at DIR and release its snapshot (needs root).
    Unmount {
        /// The mount point.
        dir: PathBuf,
    },
    /// Serve the CRI ImageService (runtime.v1) on a unix socket.
    Serve {
        /// Configuration file (TOML); default: every default (see the README).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also serve containerd's snapshots API on this unix socket (containerd's proxy
        /// snapshotter; overrides `[snapshotter] address`).
        #[arg(long, env = "PULLBOX_SNAPSHOTTER_ADDRESS")]
        snapshotter_address: Option<PathBuf>,
    },
    /// Work with puller components.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check that a component implements pullbox's puller world and accepts the settings
    /// (`--settings FILE`, default none).
    Check {
        /// The component (.wasm).
        component: PathBuf,
    },
    /// Replay recorded pulls (`pullbox pull --record DIR`) against the puller (`--puller`,
    /// `--settings`), offline: prints `REFERENCE allow` or `REFERENCE deny: RULE...` for each,
    /// and exits non-zero on a denial or error, or, with `--expect`, on any difference from
    /// the expected results.
    Test {
        /// Expected results: lines of `REFERENCE allow|deny` (`#` starts a comment).
        #[arg(long, value_name = "FILE")]
        expect: Option<PathBuf>,
        /// Recording directories.
        #[arg(required = true, value_name = "DIR")]
        recordings: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    // Poll for I/O after every task: a looping puller yields every epoch tick (10 ms), and
    // with the default interval (61 polls) a socket would wait ~0.6 s behind such yields.
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().event_interval(1).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pullbox: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pullbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = match &cli.settings {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read settings {}", p.display()))?,
        None => String::new(),
    };
    if let Command::Policy(PolicyCommand::Check { component }) = &cli.command {
        return policy::check(component, settings, limits(&cli)).await;
    }
    if let Command::Policy(PolicyCommand::Test { expect, recordings }) = &cli.command {
        // A puller from a registry is fetched into a scratch cache, kept until the test ends.
        let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
        let client = Client::with_config(transport(&cli))?;
        let puller = puller_file(&cli, &client, scratch.path()).await?;
        return policy::test(&puller, settings, limits(&cli), recordings, expect.as_deref()).await;
    }
    if let Command::Serve { config, snapshotter_address } = &cli.command {
        let overrides = serve::Overrides {
            root: cli.root.clone(),
            puller: cli.puller.clone(),
            settings: cli.settings.clone(),
            sync_fs: cli.sync_fs,
            max_layer_bytes: cli.max_layer_bytes,
            snapshotter_address: snapshotter_address.clone(),
        };
        return serve::serve(config.as_deref(), overrides).await;
    }
    let root = cli.root.clone().map(Ok).unwrap_or_else(default_root)?;
    let backend = open_backend(&cli, &root).await?;
    if let Command::Gc = cli.command {
        return images::gc(&backend).await;
    }
    if let Command::Unmount { dir } = &cli.command {
        return mount::unmount(&backend, &root, dir).await;
    }
    if let Command::Mount { .. } = &cli.command {
        mount::require_root("mount")?;
    }
    let client = Arc::new(Client::with_config(transport(&cli))?);
    let puller_path = puller_file(&cli, &client, &root.join("cache/pullers")).await?;
    let runtime = Runtime::new(Some(root.join("cache")), limits(&cli))?;
    let puller = runtime.load(&puller_path, settings).await?;
    let mut service = ImageService::new(backend, client, puller);
    if let Command::Pull { record: Some(_), .. } = &cli.command {
        service = service.recording();
    }

    match &cli.command {
        Command::Pull { platform, runtime_handler, pod_namespace, record, reference } => {
            let context = PullContext {
                runtime_handler: runtime_handler.clone(),
                pod: pod_namespace.as_ref().map(|ns| PodContext { namespace: ns.clone(), ..PodContext::default() }),
                ..PullContext::default()
            };
            let docker_config = cli.docker_config.as_deref();
            pull::pull(&service, platform.as_deref(), &context, reference, docker_config, record.as_deref()).await
        }
        Command::Images { json } => images::images(&service, *json).await,
        Command::Inspect { image } => images::inspect(&service, image).await,
        Command::Rmi { image } => images::rmi(&service, image).await,
        Command::Mount { image, dir } => mount::mount(&service, &root, image, dir).await,
        Command::Gc | Command::Unmount { .. } | Command::Policy(_) | Command::Serve { .. } => {
            unreachable!("handled above")
        }
    }
}

/// The registry transport the options configure.
fn transport(cli: &Cli) -> registry::Config {
    registry::Config {
        hosts_dir: Some(cli.hosts_dir.clone()),
        stall_timeout: cli.stall_timeout,
        ..registry::Config::default()
    }
}

/// The component file of `--puller`: a file, or an `oci://` puller fetched into (or found in)
/// `cache`; without `--puller`, the default puller.
async fn puller_file(cli: &Cli, client: &Client, cache: &Path) -> anyhow::Result<PathBuf> {
    let Some(p) = &cli.puller else {
        return default_puller();
    };
    let credentials = pull::credentials(cli.docker_config.as_deref())?;
    let source = pullbox::artifact::Source::parse(p)?;
    Ok(pullbox::artifact::fetch(client, &source, &credentials, cache, cli.allow_puller_tags).await?.0)
}

/// The store `--backend` names.
async fn open_backend(cli: &Cli, root: &Path) -> anyhow::Result<Backend> {
    match cli.backend {
        BackendKind::Embedded => {
            let options = embedded::Options {
                sync_fs: cli.sync_fs,
                max_layer_bytes: cli.max_layer_bytes.unwrap_or(embedded::DEFAULT_MAX_LAYER_BYTES),
            };
            embedded::open_with(root, options).with_context(|| format!("cannot open the store at {}", root.display()))
        }
        BackendKind::Containerd => backend::containerd::connect(&backend::containerd::Config {
            address: cli.containerd_address.clone(),
            namespace: cli.containerd_namespace.clone(),
            sync_fs: cli.sync_fs,
            ..backend::containerd::Config::default()
        })
        .await
        .with_context(|| format!("cannot use containerd at {}", cli.containerd_address.display())),
    }
}

/// `embedded` or `containerd`.
fn parse_backend(s: &str) -> Result<BackendKind, String> {
    match s {
        "embedded" => Ok(BackendKind::Embedded),
        "containerd" => Ok(BackendKind::Containerd),
        _ => Err(format!("{s:?} is not a backend (embedded or containerd)")),
    }
}

/// A positive number of seconds, fractions allowed.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?} must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// The sandbox limits of CLI commands: the defaults, with `--guest-cpu-ms`.
fn limits(cli: &Cli) -> pullbox::engine::Limits {
    let mut limits = pullbox::engine::Limits::default();
    if let Some(ms) = cli.guest_cpu_ms {
        limits.cpu_limit_ms = ms;
    }
    limits
}

/// The default store root.
fn default_root() -> anyhow::Result<PathBuf> {
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/pullbox"));
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(Path::new(&d).join("pullbox"));
    }
    let home = std::env::var_os("HOME").context("neither --root, XDG_DATA_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".local/share/pullbox"))
}

/// The default puller: installed beside the binary (`make build` puts it there), or under
/// a `share/pullbox` directory of the installation prefix.
pub(crate) fn default_puller() -> anyhow::Result<PathBuf> {
    const NAME: &str = "pullbox-puller.wasm";
    let exe = std::env::current_exe().context("cannot find the pullbox binary")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join(NAME),
        dir.join("../share/pullbox").join(NAME),
        PathBuf::from("/usr/local/share/pullbox").join(NAME),
        PathBuf::from("/usr/share/pullbox").join(NAME),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "no default puller found (looked for {}); build it with `make build` or pass --puller",
            candidates[0].display()
        )
    })
}

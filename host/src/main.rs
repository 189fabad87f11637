//! The `pullbox` command line: `pull`, `images`, `inspect`, `rmi` and `gc` on a store root.
//!
//! Every store command takes `--root DIR` (or `PULLBOX_ROOT`); the default is
//! `/var/lib/pullbox` for root and `$XDG_DATA_HOME/pullbox` (or `~/.local/share/pullbox`)
//! otherwise. The puller is `--puller FILE` (or `PULLBOX_PULLER`), else the default puller
//! installed beside the binary. Errors go to stderr with a non-zero exit.

mod progress;

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use pullbox::{
    backend::embedded,
    engine::{ImageInfo, Runtime},
    oci::Platform,
    registry::Client,
    service::ImageService,
};

/// Pulls container images through a sandboxed WebAssembly puller.
#[derive(Parser)]
#[command(name = "pullbox", version, about)]
struct Cli {
    /// Store root directory.
    #[arg(long, global = true, env = "PULLBOX_ROOT")]
    root: Option<PathBuf>,

    /// Puller component (.wasm) making the decisions; default: the one installed with pullbox.
    #[arg(long, global = true, env = "PULLBOX_PULLER")]
    puller: Option<PathBuf>,

    /// Settings document (JSON for the default puller) handed to the puller's `configure`.
    #[arg(long, global = true, env = "PULLBOX_SETTINGS")]
    settings: Option<PathBuf>,

    /// Log filter, for example `info` or `pullbox=debug,puller=debug`.
    #[arg(long, global = true, env = "PULLBOX_LOG", default_value = "warn")]
    log: String,

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
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
    let root = cli.root.clone().map(Ok).unwrap_or_else(default_root)?;
    let backend = embedded::open(&root).with_context(|| format!("cannot open the store at {}", root.display()))?;
    if let Command::Gc = cli.command {
        let r = backend.leases.collect().await?;
        println!(
            "removed {} blobs, {} snapshots, {} ingests, {} leases; freed {}",
            r.blobs,
            r.snapshots,
            r.ingests,
            r.leases,
            progress::human_bytes(r.bytes)
        );
        return Ok(());
    }
    let puller_path = match &cli.puller {
        Some(p) => p.clone(),
        None => default_puller()?,
    };
    let settings = match &cli.settings {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read settings {}", p.display()))?,
        None => String::new(),
    };
    let runtime = Runtime::new(Some(root.join("cache")))?;
    let puller = runtime.load(&puller_path, settings).await?;
    let service = ImageService::new(backend, Arc::new(Client::new()?), puller);

    match cli.command {
        Command::Pull { platform, reference } => {
            let platform = match platform {
                Some(p) => p.parse()?,
                None => Platform::host(),
            };
            let bars = Arc::new(progress::Bars::new(std::io::stderr().is_terminal()));
            let image = service.pull(&reference, platform, bars.clone()).await;
            bars.finish();
            let image = image.with_context(|| format!("pull {reference}"))?;
            println!("{}", image.id);
        }
        Command::Images { json } => {
            let images = service.list().await?;
            if json {
                let list: Vec<_> = images.iter().map(image_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&images);
            }
        }
        Command::Inspect { image } => {
            let Some(info) = service.status(&image).await? else {
                bail!("image {image:?} not found");
            };
            let mut v = image_json(&info);
            v["config"] = service.config(&info.id).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Rmi { image } => {
            let (removed, gc) = service.remove(&image).await?;
            if removed == 0 {
                bail!("image {image:?} not found");
            }
            println!(
                "removed {image} ({removed} records); freed {} blobs, {} snapshots, {}",
                gc.blobs,
                gc.snapshots,
                progress::human_bytes(gc.bytes)
            );
        }
        Command::Gc => unreachable!("handled above"),
    }
    Ok(())
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
fn default_puller() -> anyhow::Result<PathBuf> {
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
        format!("no default puller found (looked for {}); build it with `make build` or pass --puller", candidates[0].display())
    })
}

/// The JSON shape of an image, as `images --json` and `inspect` print it.
fn image_json(i: &ImageInfo) -> serde_json::Value {
    serde_json::json!({
        "id": i.id,
        "repoTags": i.repo_tags,
        "repoDigests": i.repo_digests,
        "chainId": i.chain_id,
        "manifestDigest": i.manifest_digest,
        "size": i.size,
        "user": i.user,
        "pinned": i.pinned,
    })
}

/// Prints images as a table: one row per repo tag (or per repo digest for untagged images).
fn print_table(images: &[ImageInfo]) {
    let mut rows = vec![["IMAGE".to_owned(), "DIGEST".to_owned(), "IMAGE ID".to_owned(), "SIZE".to_owned()]];
    for i in images {
        let short = |d: &str| d.split(':').nth(1).map(|h| h[..h.len().min(12)].to_owned()).unwrap_or_default();
        let names: Vec<&String> = if i.repo_tags.is_empty() { i.repo_digests.iter().collect() } else { i.repo_tags.iter().collect() };
        let names = if names.is_empty() { vec![&i.id] } else { names };
        for n in names {
            rows.push([n.clone(), short(&i.manifest_digest), short(&i.id), progress::human_bytes(i.size)]);
        }
    }
    let widths: Vec<usize> = (0..4).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for r in rows {
        println!("{:<w0$}  {:<w1$}  {:<w2$}  {}", r[0], r[1], r[2], r[3], w0 = widths[0], w1 = widths[1], w2 = widths[2]);
    }
}

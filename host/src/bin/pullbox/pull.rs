//! `pull`: one pull with progress bars on stderr (when it is a terminal) and the image ID as
//! the last line of stdout. Registry credentials come from Docker's `config.json`; Ctrl-C
//! cancels the pull (downloads stop, the pull's lease and what it wrote are removed), a
//! second Ctrl-C quits at once.
//!
//! `--record DIR` also writes what the pull resolved and read (indexes, manifests, configs;
//! no layers) into DIR, whether the pull succeeded or not, for `pullbox policy test` to replay
//! (format: `pullbox::backend::replay::recording`).

use std::{io::IsTerminal, path::Path, sync::Arc};

use anyhow::Context;
use pullbox::{
    oci::Platform,
    registry::{Credentials, DockerConfig},
    service::{ImageService, PullContext},
};
use tokio_util::sync::CancellationToken;

use crate::progress::Bars;

/// The credentials in Docker's `config.json` (`docker_config`, else the default path).
pub fn credentials(docker_config: Option<&Path>) -> anyhow::Result<Credentials> {
    Ok(match docker_config.map(Path::to_owned).or_else(DockerConfig::default_path) {
        Some(path) => Credentials::from_provider(Arc::new(DockerConfig::load(&path)?)),
        None => Credentials::anonymous(),
    })
}

/// `pullbox pull [--platform P] [--runtime-handler H] [--pod-namespace NS] [--record DIR] REF`.
/// With `record`, `service` must record its pulls ([`ImageService::recording`]).
pub async fn pull(
    service: &ImageService,
    platform: Option<&str>,
    context: &PullContext,
    reference: &str,
    docker_config: Option<&Path>,
    record: Option<&Path>,
) -> anyhow::Result<()> {
    let platform = match platform {
        Some(p) => p.parse()?,
        None => Platform::host(),
    };
    let credentials = credentials(docker_config)?;
    let cancel = CancellationToken::new();
    let on_ctrl_c = cancel.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("pullbox: cancelling the pull (press Ctrl-C again to quit at once)");
            on_ctrl_c.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    let bars = Arc::new(Bars::new(std::io::stderr().is_terminal()));
    let image = service.pull_for(reference, platform, context, bars.clone(), credentials, cancel.clone()).await;
    watcher.abort();
    bars.finish();
    if let Some(dir) = record {
        for recording in service.take_recordings() {
            recording.save(dir).with_context(|| format!("cannot record the pull into {}", dir.display()))?;
            eprintln!(
                "pullbox: recorded {} resolve answers and {} blobs into {}",
                recording.resolved.len(),
                recording.blobs.len(),
                dir.display()
            );
        }
    }
    let image = image.with_context(|| {
        if cancel.is_cancelled() {
            format!("pull {reference} cancelled")
        } else {
            format!("pull {reference}")
        }
    })?;
    println!("{}", image.id);
    Ok(())
}

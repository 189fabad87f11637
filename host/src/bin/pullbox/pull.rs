//! `pull`: one pull with progress bars on stderr (when it is a terminal) and the image ID as
//! the last line of stdout. Registry credentials come from Docker's `config.json`; Ctrl-C
//! cancels the pull (downloads stop, the pull's lease and what it wrote are removed), a
//! second Ctrl-C quits at once.

use std::{io::IsTerminal, path::Path, sync::Arc};

use anyhow::Context;
use pullbox::{
    oci::Platform,
    registry::{Credentials, DockerConfig},
    service::{ImageService, PullContext},
};
use tokio_util::sync::CancellationToken;

use crate::progress::Bars;

/// `pullbox pull [--platform P] [--runtime-handler H] [--pod-namespace NS] REF`.
pub async fn pull(
    service: &ImageService,
    platform: Option<&str>,
    context: &PullContext,
    reference: &str,
    docker_config: Option<&Path>,
) -> anyhow::Result<()> {
    let platform = match platform {
        Some(p) => p.parse()?,
        None => Platform::host(),
    };
    let credentials = match docker_config.map(Path::to_owned).or_else(DockerConfig::default_path) {
        Some(path) => Credentials::from_provider(Arc::new(DockerConfig::load(&path)?)),
        None => Credentials::anonymous(),
    };
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

//! `pull`: one pull with progress bars on stderr (when it is a terminal) and the image ID as
//! the last line of stdout.

use std::{io::IsTerminal, sync::Arc};

use anyhow::Context;
use pullbox::{oci::Platform, service::ImageService};

use crate::progress::Bars;

/// `pullbox pull [--platform P] REF`.
pub async fn pull(service: &ImageService, platform: Option<&str>, reference: &str) -> anyhow::Result<()> {
    let platform = match platform {
        Some(p) => p.parse()?,
        None => Platform::host(),
    };
    let bars = Arc::new(Bars::new(std::io::stderr().is_terminal()));
    let image = service.pull(reference, platform, bars.clone()).await;
    bars.finish();
    let image = image.with_context(|| format!("pull {reference}"))?;
    println!("{}", image.id);
    Ok(())
}

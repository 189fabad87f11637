//! `policy check FILE [--settings FILE]`: whether a component is a pullbox puller and accepts
//! the settings, with the reason when not. Uses a throwaway store, so it touches nothing.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use pullbox::{backend::embedded, engine::Runtime, registry::Client, service::ImageService};

/// `pullbox policy check`.
pub async fn check(component: &Path, settings: String, limits: pullbox::engine::Limits) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let backend = embedded::open(scratch.path())?;
    let puller = Runtime::new(None, limits)?.load(component, settings).await?;
    let service = ImageService::new(backend, Arc::new(Client::new()?), puller);
    service.check().await.with_context(|| format!("{} refuses the settings", component.display()))?;
    println!("ok: {} implements pullbox:image/puller-world@0.2.0 and accepts the settings", component.display());
    Ok(())
}

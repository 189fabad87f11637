//! `policy check FILE [--settings FILE]`: whether a component is a pullbox puller and accepts
//! the settings, with the reason when not. Uses a throwaway store, so it touches nothing.
//!
//! `policy test [--expect FILE] DIR...`: replays recorded pulls (`pull --record DIR`) against
//! the puller, offline (see `pullbox::verdict`), prints each verdict and exits non-zero on a
//! denial or failure, or with `--expect`, on any difference from the expected verdicts.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use anyhow::{bail, Context};
use pullbox::{
    backend::{embedded, replay::Recording},
    engine::Runtime,
    registry::Client,
    service::ImageService,
    verdict::{judge, Verdict},
};

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

/// `pullbox policy test`.
pub async fn test(
    component: &Path,
    settings: String,
    limits: pullbox::engine::Limits,
    recordings: &[std::path::PathBuf],
    expect: Option<&Path>,
) -> anyhow::Result<()> {
    let expected = match expect {
        Some(path) => Some(read_expected(path)?),
        None => None,
    };
    let puller = Runtime::new(None, limits)?.load(component, settings).await?;
    let mut got: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut refused = 0;
    for dir in recordings {
        let recording = Recording::load(dir)?;
        let reference = recording.request.reference.clone();
        let verdict = judge(&puller, &recording).await;
        match &verdict {
            Verdict::Allow => println!("{reference} allow"),
            Verdict::Deny(message) => println!("{reference} deny: {message}"),
            Verdict::Failed { code, message } => println!("{reference} error: {code}: {message}"),
        }
        if verdict != Verdict::Allow {
            refused += 1;
        }
        got.insert(reference, verdict.word());
    }
    let Some(expected) = expected else {
        if refused > 0 {
            bail!("{refused} of {} recorded pulls were not allowed", recordings.len());
        }
        return Ok(());
    };
    let mut differences = Vec::new();
    for (reference, want) in &expected {
        match got.get(reference) {
            Some(have) if have == want => {}
            Some(have) => differences.push(format!("{reference}: expected {want}, got {have}")),
            None => differences.push(format!("{reference}: expected {want}, but no recording of it was replayed")),
        }
    }
    for (reference, have) in &got {
        if !expected.contains_key(reference) {
            differences.push(format!("{reference}: got {have}, but the expected results do not list it"));
        }
    }
    if !differences.is_empty() {
        for d in &differences {
            eprintln!("pullbox: difference: {d}");
        }
        bail!(
            "{} differences from {}",
            differences.len(),
            expect.map(Path::display).map(|d| d.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

/// Reads an expected-results file: `REFERENCE allow|deny` lines, `#` comments, blank lines.
fn read_expected(path: &Path) -> anyhow::Result<BTreeMap<String, &'static str>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let verdict = match words.as_slice() {
            [_, "allow"] => "allow",
            [_, "deny"] => "deny",
            _ => bail!("{}:{}: expected `REFERENCE allow` or `REFERENCE deny`, got {line:?}", path.display(), n + 1),
        };
        if out.insert(words[0].to_owned(), verdict).is_some() {
            bail!("{}:{}: {} is listed twice", path.display(), n + 1, words[0]);
        }
    }
    Ok(out)
}

//! `make bench-engine`: what the sandbox costs, in printed figures (issue 6).
//!
//! 1. Instantiate-plus-call overhead per request: `ListImages` and `ImageStatus` on an empty
//!    embedded store, each a fresh store and instance from the pre-instantiated component,
//!    `configure` with the settings, and the export call (which itself makes one host call).
//! 2. The share of a pull's wall time spent executing guest code: pulls of the 3-layer test
//!    image from a local registry into fresh stores; guest time is what the engine's call
//!    hooks account (host imports excluded).
//!
//! 3. The cosign puller's guest time per pull (issue 13: at most 5 ms): pulls of the same
//!    image, signed under its `.sig` tag with a key made here, through
//!    `pullbox-cosign.wasm` into fresh stores; the guest time includes looking up, reading
//!    and verifying the signature (ECDSA P-256 in wasm).
//!
//! Runs against the real `docker-registry` fixture and the pullers from `make build`.

use std::{sync::Arc, time::Instant};

use anyhow::Result;
use pullbox::{
    backend::embedded,
    engine::{guest_time, Limits, Runtime},
    oci::Platform,
    registry::{Client, Credentials, NoProgress},
    service::ImageService,
};
use pullbox_tests::{
    cosign::{self, payload, push_sig_tag, Layer, TestKey},
    policy::private_copy,
    Fixture, Pullbox,
};
use tokio_util::sync::CancellationToken;

const CALLS: u32 = 2000;
const PULLS: u32 = 5;

#[tokio::main]
async fn main() -> Result<()> {
    let fixture = Fixture::build()?;
    let puller_path = Pullbox::bin()?.with_file_name("pullbox-puller.wasm");
    let runtime = Runtime::new(None, Limits::default())?;

    let scratch = tempfile::tempdir()?;
    let service = ImageService::new(
        embedded::open(scratch.path())?,
        Arc::new(Client::new()?),
        runtime.load(&puller_path, String::new()).await?,
    );
    for _ in 0..50 {
        service.list().await?; // warm up
    }
    let t = Instant::now();
    for _ in 0..CALLS {
        service.list().await?;
    }
    let list_us = t.elapsed().as_secs_f64() * 1e6 / CALLS as f64;
    let t = Instant::now();
    for _ in 0..CALLS {
        service.status("sha256:0000000000000000000000000000000000000000000000000000000000000000").await?;
    }
    let status_us = t.elapsed().as_secs_f64() * 1e6 / CALLS as f64;

    let reference = fixture.reference("team/app:1.0");
    let rows = pulls(&runtime, &puller_path, String::new(), &reference).await?;

    // The same image, signed, through the cosign puller.
    let key = TestKey::generate()?;
    let signed = private_copy(fixture.registry.addr(), &reference, "bench/signed:1.0")?;
    let layer = Layer::signed(&key, payload(&signed.repo, &signed.manifest_digest));
    push_sig_tag(&fixture.registry, "bench/signed", &signed.manifest_digest, &[layer])?;
    let settings = cosign::settings(&[("bench", &key)], "bench", &format!("{}/bench/**", fixture.registry.addr()))?;
    let cosign_path = Pullbox::bin()?.with_file_name("pullbox-cosign.wasm");
    let cosign_rows = pulls(&runtime, &cosign_path, settings, &signed.reference).await?;

    println!("pullbox sandbox overhead ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!("{:<44} {:>12}", "measure", "value");
    println!("{:<44} {:>9.1} µs", "ListImages: instantiate+configure+call", list_us);
    println!("{:<44} {:>9.1} µs", "ImageStatus (miss): instantiate+configure+call", status_us);
    for (i, (wall, guest)) in rows.iter().enumerate() {
        println!(
            "{:<44} {:>9.1} ms wall, {:>7.2} ms guest = {:>5.2} %",
            format!("pull {} of {reference}", i + 1),
            wall.as_secs_f64() * 1e3,
            guest.as_secs_f64() * 1e3,
            guest.as_secs_f64() / wall.as_secs_f64() * 100.0
        );
    }
    let (wall, guest): (f64, f64) =
        rows.iter().fold((0.0, 0.0), |(w, g), (a, b)| (w + a.as_secs_f64(), g + b.as_secs_f64()));
    println!("{:<44} {:>9.2} %", "guest share of pull wall time (all pulls)", guest / wall * 100.0);
    for (i, (wall, guest)) in cosign_rows.iter().enumerate() {
        println!(
            "{:<44} {:>9.1} ms wall, {:>7.2} ms guest",
            format!("cosign pull {} (signed, verified)", i + 1),
            wall.as_secs_f64() * 1e3,
            guest.as_secs_f64() * 1e3,
        );
    }
    let per_pull = cosign_rows.iter().map(|(_, g)| g.as_secs_f64()).sum::<f64>() / cosign_rows.len() as f64 * 1e3;
    println!("{:<44} {:>9.2} ms (budget 5 ms)", "cosign puller: guest time per pull (mean)", per_pull);
    Ok(())
}

/// [`PULLS`] pulls of `reference` through the puller at `path` with `settings`, each into a
/// fresh embedded store; (wall time, guest time) of each.
async fn pulls(
    runtime: &Runtime,
    path: &std::path::Path,
    settings: String,
    reference: &str,
) -> Result<Vec<(std::time::Duration, std::time::Duration)>> {
    let mut rows = Vec::new();
    for _ in 0..PULLS {
        let root = tempfile::tempdir()?;
        let service = ImageService::new(
            embedded::open(root.path())?,
            Arc::new(Client::new()?),
            runtime.load(path, settings.clone()).await?,
        );
        let guest_before = guest_time();
        let t = Instant::now();
        service
            .pull(reference, Platform::host(), Arc::new(NoProgress), Credentials::anonymous(), CancellationToken::new())
            .await?;
        let wall = t.elapsed();
        rows.push((wall, guest_time() - guest_before));
    }
    Ok(rows)
}

//! `images`, `inspect`, `rmi` and `gc`: reading and pruning the store.

use anyhow::bail;
use pullbox::{backend::Backend, image::ImageInfo, service::ImageService};

use indicatif::DecimalBytes;

/// `pullbox images [--json]`.
pub async fn images(service: &ImageService, json: bool) -> anyhow::Result<()> {
    let images = service.list().await?;
    if json {
        let list: Vec<_> = images.iter().map(image_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print_table(&images);
    }
    Ok(())
}

/// `pullbox inspect REF|ID`.
pub async fn inspect(service: &ImageService, image: &str) -> anyhow::Result<()> {
    let Some(info) = service.status(image).await? else {
        bail!("image {image:?} not found");
    };
    let mut v = image_json(&info);
    v["config"] = service.config(&info.id).await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// `pullbox rmi REF|ID`.
pub async fn rmi(service: &ImageService, image: &str) -> anyhow::Result<()> {
    let (removed, gc) = service.remove(image).await?;
    if removed == 0 {
        bail!("image {image:?} not found");
    }
    println!(
        "removed {image} ({removed} records); freed {} blobs, {} snapshots, {}",
        gc.blobs,
        gc.snapshots,
        DecimalBytes(gc.bytes)
    );
    Ok(())
}

/// `pullbox gc`.
pub async fn gc(backend: &Backend) -> anyhow::Result<()> {
    let r = backend.leases.collect().await?;
    println!(
        "removed {} blobs, {} snapshots, {} ingests, {} leases; freed {}",
        r.blobs,
        r.snapshots,
        r.ingests,
        r.leases,
        DecimalBytes(r.bytes)
    );
    Ok(())
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
        let names: Vec<&String> =
            if i.repo_tags.is_empty() { i.repo_digests.iter().collect() } else { i.repo_tags.iter().collect() };
        let names = if names.is_empty() { vec![&i.id] } else { names };
        for n in names {
            rows.push([n.clone(), short(&i.manifest_digest), short(&i.id), DecimalBytes(i.size).to_string()]);
        }
    }
    let widths: Vec<usize> = (0..4).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for r in rows {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
}

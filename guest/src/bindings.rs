//! The component boundary (wasm32 only): the generated WIT bindings, the [`Host`] that
//! calls the imports ([`WitHost`]), and the glue from interface `puller`'s exports to a
//! [`Puller`].
//!
//! This is the only module that sees generated types. It converts them field by field to
//! and from the plain types in [`crate::types`] and [`crate::error::Error`], one case to
//! the same case, and forwards each export to the [`Puller`] method of the same name, so
//! everything else compiles and is tested natively.
//!
//! It is public (but hidden from the docs) for one reason: [`crate::export_puller!`], used
//! by the default puller and by pullers built on this crate, expands in the exporting crate
//! and names the generated export macro and the glue functions here. The bindings are
//! generated with `pub_export_macro`, so the custom section describing the world is emitted
//! where the export happens, once per component.

use crate::error::{same_case, Error};
use crate::host::Host;
use crate::types as t;

wit_bindgen::generate!({
    path: "../wit",
    world: "puller-world",
    pub_export_macro: true,
});

use crate::Puller;
use exports::pullbox::image::puller as exp;
use pullbox::image::{clock, content, diff, images, log, registry, snapshots, types as wit};

/// `configure`, for [`crate::export_puller!`].
pub fn configure<P: Puller>(settings: String) -> Result<(), wit::Error> {
    P::configure(&settings).map_err(to_wit)
}

/// `pull-image`, for [`crate::export_puller!`].
pub fn pull_image<P: Puller>(request: exp::PullRequest) -> Result<exp::ImageInfo, wit::Error> {
    let request = t::PullRequest {
        reference: request.reference,
        platform: platform_from(request.platform),
        runtime_handler: request.runtime_handler,
        annotations: request.annotations,
        pod: request.pod.map(|p| t::Pod {
            namespace: p.namespace,
            name: p.name,
            uid: p.uid,
            labels: p.labels,
            annotations: p.annotations,
        }),
    };
    P::pull_image(&WitHost, &request).map(info_to).map_err(to_wit)
}

/// `image-status`, for [`crate::export_puller!`].
pub fn image_status<P: Puller>(reference: String) -> Result<Option<exp::ImageInfo>, wit::Error> {
    P::image_status(&WitHost, &reference).map(|o| o.map(info_to)).map_err(to_wit)
}

/// `list-images`, for [`crate::export_puller!`].
pub fn list_images<P: Puller>() -> Result<Vec<exp::ImageInfo>, wit::Error> {
    P::list_images(&WitHost).map(|v| v.into_iter().map(info_to).collect()).map_err(to_wit)
}

/// `remove-image`, for [`crate::export_puller!`].
pub fn remove_image<P: Puller>(reference: String) -> Result<(), wit::Error> {
    P::remove_image(&WitHost, &reference).map_err(to_wit)
}

/// [`Host`] over the component's imports.
pub struct WitHost;

impl Host for WitHost {
    fn resolve(&self, name: &str, reference: &str) -> crate::error::Result<t::Descriptor> {
        registry::resolve(name, reference).map(descriptor_from).map_err(from_wit)
    }

    fn fetch(&self, name: &str, blobs: &[t::Descriptor]) -> crate::error::Result<()> {
        let blobs: Vec<wit::Descriptor> = blobs.iter().map(descriptor_to).collect();
        registry::fetch(name, &blobs).map_err(from_wit)
    }

    fn referrers(&self, name: &str, digest: &str, artifact_type: &str) -> crate::error::Result<Vec<t::Referrer>> {
        registry::referrers(name, digest, artifact_type)
            .map(|v| {
                v.into_iter()
                    .map(|r| t::Referrer {
                        media_type: r.media_type,
                        digest: r.digest,
                        size: r.size,
                        artifact_type: r.artifact_type,
                        annotations: r.annotations,
                    })
                    .collect()
            })
            .map_err(from_wit)
    }

    fn now(&self) -> t::Instant {
        let now = clock::now();
        t::Instant { seconds: now.seconds, nanoseconds: now.nanoseconds }
    }

    fn content_info(&self, digest: &str) -> crate::error::Result<t::ContentInfo> {
        content::info(digest)
            .map(|i| t::ContentInfo { digest: i.digest, size: i.size, labels: i.labels })
            .map_err(from_wit)
    }

    fn content_sizes(&self, digests: &[String]) -> crate::error::Result<Vec<crate::error::Result<u64>>> {
        content::sizes(digests).map(|v| v.into_iter().map(|r| r.map_err(from_wit)).collect()).map_err(from_wit)
    }

    fn content_read(&self, digest: &str, offset: u64, length: u32) -> crate::error::Result<Vec<u8>> {
        content::read(digest, offset, length).map_err(from_wit)
    }

    fn content_max_read(&self) -> u32 {
        content::max_read()
    }

    fn content_set_labels(&self, digest: &str, labels: &[(String, String)]) -> crate::error::Result<()> {
        content::set_labels(digest, labels).map_err(from_wit)
    }

    fn snapshotter(&self) -> String {
        snapshots::name()
    }

    fn snapshot_select(&self, snapshotter: &str) -> crate::error::Result<()> {
        snapshots::select(snapshotter).map_err(from_wit)
    }

    fn snapshot_prepare(&self, key: &str, parent: &str) -> crate::error::Result<()> {
        snapshots::prepare(key, parent).map_err(from_wit)
    }

    fn snapshot_commit(&self, name: &str, key: &str) -> crate::error::Result<()> {
        snapshots::commit(name, key).map_err(from_wit)
    }

    fn snapshot_stat(&self, key: &str) -> crate::error::Result<t::SnapshotInfo> {
        snapshots::stat(key).map(snapshot_from).map_err(from_wit)
    }

    fn snapshot_stats(&self, keys: &[String]) -> crate::error::Result<Vec<crate::error::Result<t::SnapshotInfo>>> {
        snapshots::stats(keys)
            .map(|v| v.into_iter().map(|r| r.map(snapshot_from).map_err(from_wit)).collect())
            .map_err(from_wit)
    }

    fn snapshot_remove(&self, key: &str) -> crate::error::Result<()> {
        snapshots::remove(key).map_err(from_wit)
    }

    fn diff_apply(&self, layer: &t::Descriptor, key: &str) -> crate::error::Result<String> {
        diff::apply(&descriptor_to(layer), key).map_err(from_wit)
    }

    fn image_get(&self, name: &str) -> crate::error::Result<t::ImageRecord> {
        images::get(name).map(image_from).map_err(from_wit)
    }

    fn image_list(&self) -> crate::error::Result<Vec<t::ImageRecord>> {
        images::list().map(|v| v.into_iter().map(image_from).collect()).map_err(from_wit)
    }

    fn image_list_labels(&self, keys: &[String]) -> crate::error::Result<Vec<t::Labelled>> {
        images::list_labels(keys)
            .map(|v| v.into_iter().map(|l| t::Labelled { name: l.name, values: l.values }).collect())
            .map_err(from_wit)
    }

    fn image_create(&self, image: &t::ImageRecord) -> crate::error::Result<t::ImageRecord> {
        images::create(&image_to(image)).map(image_from).map_err(from_wit)
    }

    fn image_update(&self, image: &t::ImageRecord) -> crate::error::Result<t::ImageRecord> {
        images::update(&image_to(image)).map(image_from).map_err(from_wit)
    }

    fn image_delete(&self, name: &str) -> crate::error::Result<()> {
        images::delete(name).map_err(from_wit)
    }

    fn log(&self, level: t::Level, message: &str) {
        let level = match level {
            t::Level::Trace => log::Level::Trace,
            t::Level::Debug => log::Level::Debug,
            t::Level::Info => log::Level::Info,
            t::Level::Warn => log::Level::Warn,
            t::Level::Error => log::Level::Error,
        };
        log::log(level, message);
    }

    fn progress(&self, stage: &str, detail: &str) {
        log::progress(stage, detail);
    }
}

fn to_wit(e: Error) -> wit::Error {
    use wit::Error as WitError;
    same_case!(e, Error => WitError, |m| m)
}

fn from_wit(e: wit::Error) -> Error {
    use wit::Error as WitError;
    same_case!(e, WitError => Error, |m| m)
}

fn snapshot_from(i: snapshots::SnapshotInfo) -> t::SnapshotInfo {
    t::SnapshotInfo {
        name: i.name,
        parent: i.parent,
        kind: match i.kind {
            snapshots::Kind::View => t::SnapshotKind::View,
            snapshots::Kind::Active => t::SnapshotKind::Active,
            snapshots::Kind::Committed => t::SnapshotKind::Committed,
        },
        labels: i.labels,
    }
}

fn platform_from(p: wit::Platform) -> t::Platform {
    t::Platform {
        os: p.os,
        architecture: p.architecture,
        variant: p.variant,
        os_version: p.os_version,
        os_features: p.os_features,
    }
}

fn platform_to(p: &t::Platform) -> wit::Platform {
    wit::Platform {
        os: p.os.clone(),
        architecture: p.architecture.clone(),
        variant: p.variant.clone(),
        os_version: p.os_version.clone(),
        os_features: p.os_features.clone(),
    }
}

fn descriptor_from(d: wit::Descriptor) -> t::Descriptor {
    t::Descriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations,
        platform: d.platform.map(platform_from),
        urls: d.urls,
    }
}

fn descriptor_to(d: &t::Descriptor) -> wit::Descriptor {
    wit::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: d.annotations.clone(),
        platform: d.platform.as_ref().map(platform_to),
        urls: d.urls.clone(),
    }
}

fn image_from(i: wit::Image) -> t::ImageRecord {
    t::ImageRecord {
        name: i.name,
        target: descriptor_from(i.target),
        labels: i.labels,
        created_at: i.created_at,
        updated_at: i.updated_at,
    }
}

fn image_to(i: &t::ImageRecord) -> wit::Image {
    wit::Image {
        name: i.name.clone(),
        target: descriptor_to(&i.target),
        labels: i.labels.clone(),
        created_at: i.created_at,
        updated_at: i.updated_at,
    }
}

fn info_to(i: t::ImageInfo) -> exp::ImageInfo {
    exp::ImageInfo {
        id: i.id,
        repo_tags: i.repo_tags,
        repo_digests: i.repo_digests,
        size: i.size,
        chain_id: i.chain_id,
        manifest_digest: i.manifest_digest,
        user: i.user,
        pinned: i.pinned,
    }
}

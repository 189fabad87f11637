//! Label keys: containerd's garbage-collection and CRI labels, and pullbox's own.
//!
//! The GC labels are exactly containerd's (`images.ChildGCLabels` with
//! `SetChildrenMappedLabels`): on an index, `containerd.io/gc.ref.content.m.<i>` for the
//! i-th manifest kept; on a manifest, `containerd.io/gc.ref.content.config` and
//! `containerd.io/gc.ref.content.l.<i>` for the i-th layer; on a config,
//! `containerd.io/gc.ref.snapshot.<snapshotter>` with the top chain ID, as containerd's
//! unpacker sets. Image records carry `io.cri-containerd.image=managed`, so containerd's own
//! CRI plugin lists them, and `pullbox.io/image.*` labels that let status and list answer
//! without reading manifests or knowing the platform the image was pulled for.

/// containerd CRI's label on the records it manages.
pub const CRI_IMAGE: &str = "io.cri-containerd.image";
/// Value of [`CRI_IMAGE`].
pub const CRI_IMAGE_MANAGED: &str = "managed";
/// containerd CRI's label on the records of images kubelet must never garbage-collect (its
/// `pinned_images`, such as the sandbox image).
pub const CRI_PINNED: &str = "io.cri-containerd.pinned";
/// Value of [`CRI_PINNED`].
pub const CRI_PINNED_PINNED: &str = "pinned";

/// Image ID (config digest).
pub const IMAGE_ID: &str = "pullbox.io/image.id";
/// Digest of the manifest the image was unpacked from.
pub const IMAGE_MANIFEST: &str = "pullbox.io/image.manifest";
/// Chain ID of the top layer: the image's top snapshot.
pub const IMAGE_CHAIN_ID: &str = "pullbox.io/image.chain-id";
/// Size in bytes, as containerd's CRI counts it (decimal).
pub const IMAGE_SIZE: &str = "pullbox.io/image.size";
/// The config's `User`.
pub const IMAGE_USER: &str = "pullbox.io/image.user";
/// The snapshotter the top snapshot is in, when the pull chose one (`runtimePlatforms`);
/// absent: the host's default snapshotter.
pub const IMAGE_SNAPSHOTTER: &str = "pullbox.io/image.snapshotter";

/// GC reference from a manifest to its config.
pub const GC_CONFIG: &str = "containerd.io/gc.ref.content.config";

/// GC reference from an index to its `i`-th kept manifest.
pub fn gc_manifest(i: usize) -> String {
    format!("containerd.io/gc.ref.content.m.{i}")
}

/// GC reference from a manifest to its `i`-th layer.
pub fn gc_layer(i: usize) -> String {
    format!("containerd.io/gc.ref.content.l.{i}")
}

/// GC reference from a config to a snapshot of snapshotter `snapshotter`.
pub fn gc_snapshot(snapshotter: &str) -> String {
    format!("containerd.io/gc.ref.snapshot.{snapshotter}")
}

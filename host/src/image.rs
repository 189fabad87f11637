//! What a puller call takes and answers, as host types: [`PullContext`] and [`PodContext`]
//! (what a pull is for), [`PullRequest`] (what `pull-image` is asked) and [`ImageInfo`] (an
//! image as the CRI describes it). The engine converts them to and from the generated WIT
//! types (`crate::bindings`), so nothing else in the host sees those.

use std::collections::BTreeMap;

use crate::oci::Platform;

/// What a pull is for, as the caller (kubelet over the CRI, or the CLI) says: handed to the
/// puller in its `pull-request`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PullContext {
    /// The runtime handler (runtime class); empty for the default one.
    pub runtime_handler: String,
    /// The CRI `ImageSpec.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// The pod the image is for; `None` without a sandbox config.
    pub pod: Option<PodContext>,
}

/// The pod a pull is for, from the CRI `PodSandboxConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PodContext {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
}

impl PullContext {
    /// The `pull-request` of `reference` for `platform` in this context.
    pub fn request(&self, reference: &str, platform: Platform) -> PullRequest {
        PullRequest { reference: reference.to_owned(), platform, context: self.clone() }
    }
}

/// What `pull-image` is asked: a reference as the caller wrote it, the platform to pick and
/// what the pull is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    /// The reference, not normalized (the puller does that).
    pub reference: String,
    /// The platform to pick from an index.
    pub platform: Platform,
    /// What the pull is for.
    pub context: PullContext,
}

/// An image as the puller answers it (the WIT `image-info`, the CRI `Image`): `id` is the
/// config digest, `size` counts compressed layers plus config, `chain_id` names the top
/// snapshot, `manifest_digest` the manifest it was unpacked from, `user` is the config's
/// `User` (empty when none), and `pinned` says kubelet must not garbage collect it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: String,
    pub size: u64,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub user: String,
    pub pinned: bool,
    // What pullbox adds to the CRI's fields.
    pub chain_id: String,
    pub manifest_digest: String,
}

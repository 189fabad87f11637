//! Plain Rust mirrors of the WIT records the puller logic works with.
//!
//! The generated bindings exist only in the wasm32 build (`bindings`), so the logic in this
//! crate, and its unit tests, use these types instead; `bindings` converts field by field.
//! Names follow the WIT: [`Descriptor`], [`Platform`], [`ImageRecord`]
//! (`types.image`), [`ContentInfo`] (`content.info`), [`SnapshotInfo`] (`snapshots.info`),
//! [`PullRequest`] and [`ImageInfo`] (`puller`), [`Referrer`] (`registry.referrer`) and
//! [`Instant`] (`clock.instant`). Label and annotation maps stay lists of
//! pairs, as in the WIT; [`label`] looks one up.

/// A platform, as in the OCI image index (`types.platform`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    /// Operating system, for example `linux`.
    pub os: String,
    /// CPU architecture in GOARCH spelling.
    pub architecture: String,
    /// Architecture variant (`v8`); empty when none.
    pub variant: String,
    /// Operating system version; empty when none.
    pub os_version: String,
    /// Required operating system features.
    pub os_features: Vec<String>,
}

/// An OCI content descriptor (`types.descriptor`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// The blob's media type.
    pub media_type: String,
    /// The blob's digest, `algorithm:hex`.
    pub digest: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// Annotations, sorted by key.
    pub annotations: Vec<(String, String)>,
    /// The platform of an index entry.
    pub platform: Option<Platform>,
    /// Alternative locations of a non-distributable blob.
    pub urls: Vec<String>,
}

/// A manifest that refers to another through its `subject` (`registry.referrer`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Referrer {
    /// The referrer manifest's media type.
    pub media_type: String,
    /// Its digest, `algorithm:hex`.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its artifact type; empty when the registry names none.
    pub artifact_type: String,
    /// Its annotations, sorted by key.
    pub annotations: Vec<(String, String)>,
}

impl Referrer {
    /// The descriptor to `fetch` the referrer manifest with.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: self.annotations.clone(),
            ..Descriptor::default()
        }
    }
}

/// A wall-clock time (`clock.instant`): since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instant {
    /// Whole seconds.
    pub seconds: u64,
    /// Nanoseconds past `seconds`.
    pub nanoseconds: u32,
}

/// A named image record (`types.image`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageRecord {
    /// Repo tag, repo digest or image ID.
    pub name: String,
    /// The root descriptor the name points at.
    pub target: Descriptor,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Creation time (ns since the epoch), set by the host.
    pub created_at: u64,
    /// Last update time (ns since the epoch), set by the host.
    pub updated_at: u64,
}

/// A record's name with the values of some of its labels (`images.labelled`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labelled {
    /// The record's name.
    pub name: String,
    /// The values of the labels asked for, in the order asked; `None` where absent.
    pub values: Vec<Option<String>>,
}

/// What the content store knows of a blob (`content.info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentInfo {
    /// The blob's digest.
    pub digest: String,
    /// The blob's size.
    pub size: u64,
    /// The blob's labels.
    pub labels: Vec<(String, String)>,
}

/// The state of a snapshot (`snapshots.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// A read-only view.
    View,
    /// A writable snapshot that can be committed.
    Active,
    /// A read-only snapshot that can be a parent.
    Committed,
}

/// What the snapshotter knows of a snapshot (`snapshots.info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Key or name.
    pub name: String,
    /// Parent name; empty when none.
    pub parent: String,
    /// State.
    pub kind: SnapshotKind,
    /// Labels.
    pub labels: Vec<(String, String)>,
}

/// Log severity (`log.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Very detailed.
    Trace,
    /// Details of decisions.
    Debug,
    /// Start and end of requests.
    Info,
    /// Something odd that does not fail the request.
    Warn,
    /// A failure.
    Error,
}

/// A pull request (`puller.pull-request`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullRequest {
    /// The reference as written by the user or kubelet.
    pub reference: String,
    /// The platform to pick from an index.
    pub platform: Platform,
    /// The runtime handler (runtime class) pulled for; empty for the default one.
    pub runtime_handler: String,
    /// The CRI `ImageSpec.annotations`, sorted by key.
    pub annotations: Vec<(String, String)>,
    /// The pod pulled for; `None` when the caller gave no sandbox config.
    pub pod: Option<Pod>,
}

/// The pod an image is pulled for (`puller.pod`): the CRI `PodSandboxConfig`'s view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// Pod labels, sorted by key.
    pub labels: Vec<(String, String)>,
    /// Pod annotations, sorted by key.
    pub annotations: Vec<(String, String)>,
}

/// An image as the CRI `Image` message describes it (`puller.image-info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// Image ID: the config digest.
    pub id: String,
    /// Repository tags, sorted.
    pub repo_tags: Vec<String>,
    /// Repository digests, sorted.
    pub repo_digests: Vec<String>,
    /// Size in bytes, as containerd's CRI counts it (see `pull::image_size`).
    pub size: u64,
    /// Chain ID of the top layer.
    pub chain_id: String,
    /// Digest of the manifest the image was unpacked from.
    pub manifest_digest: String,
    /// The config's `User`.
    pub user: String,
    /// Whether kubelet must not garbage-collect the image.
    pub pinned: bool,
}

/// The value of label `key` in a list of pairs.
pub fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Sets `key` to `value` in a list of pairs, replacing an earlier value.
pub fn set_label(labels: &mut Vec<(String, String)>, key: &str, value: &str) {
    match labels.iter_mut().find(|(k, _)| k == key) {
        Some(pair) => pair.1 = value.to_string(),
        None => labels.push((key.to_string(), value.to_string())),
    }
}

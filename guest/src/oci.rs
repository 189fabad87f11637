//! The OCI and Docker schema 2 documents the puller reads: image index / manifest list,
//! image manifest, image config; their media types; and how a root blob is classified.
//!
//! These are small serde structs with only the fields the puller uses, not the `oci-spec`
//! crate: `oci-spec` 0.8 (features `image` only) builds for wasm32 with Debian's toolchain,
//! but brings regex, derive_builder, getset, strum and const_format along and, measured on
//! the same three parses, makes the core module 149 KB instead of 86 KB; its builder and
//! getter types would then still need converting into the WIT mirror types. Unknown fields
//! are ignored, as Go's `encoding/json` does in containerd.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::types::{Descriptor, Platform};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker schema 1 manifest (unsigned).
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Docker schema 1 manifest (signed).
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Media types of layers that `diff.apply` unpacks.
pub const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// What a root (or index entry) blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An OCI image index or a Docker manifest list.
    Index,
    /// An OCI image manifest or a Docker schema 2 manifest.
    Manifest,
    /// A Docker schema 1 manifest: deprecated, refused.
    Schema1,
    /// Anything else.
    Unknown,
}

/// Classifies a media type.
pub fn kind_of(media_type: &str) -> Kind {
    match media_type {
        OCI_INDEX | DOCKER_MANIFEST_LIST => Kind::Index,
        OCI_MANIFEST | DOCKER_MANIFEST => Kind::Manifest,
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => Kind::Schema1,
        _ => Kind::Unknown,
    }
}

/// Whether a media type names a generic JSON document whose kind must be read from the
/// document itself (registries that answer `application/json`, or nothing).
pub fn is_generic_json(media_type: &str) -> bool {
    matches!(media_type, "" | "application/json" | "application/octet-stream" | "text/plain")
}

/// Classifies a document by its content, for roots with a generic media type: its own
/// `mediaType`, else `schemaVersion` 1, else a `manifests` array (index) or a `config`
/// object (manifest).
pub fn sniff(bytes: &[u8]) -> Kind {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        schema_version: Option<i64>,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    let Ok(probe) = serde_json::from_slice::<Probe>(bytes) else {
        return Kind::Unknown;
    };
    if let Some(mt) = probe.media_type.as_deref() {
        let k = kind_of(mt);
        if k != Kind::Unknown {
            return k;
        }
    }
    if probe.schema_version == Some(1) {
        return Kind::Schema1;
    }
    match (probe.manifests, probe.config) {
        (Some(_), None) => Kind::Index,
        (None, Some(_)) => Kind::Manifest,
        _ => Kind::Unknown,
    }
}

/// Whether a layer media type is one `diff.apply` understands.
pub fn is_layer(media_type: &str) -> bool {
    LAYER_TYPES.contains(&media_type)
}

/// Whether a config media type is an image config.
pub fn is_image_config(media_type: &str) -> bool {
    matches!(media_type, OCI_CONFIG | DOCKER_CONFIG)
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonPlatform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: String,
    #[serde(default, rename = "os.version")]
    os_version: String,
    #[serde(default, rename = "os.features")]
    os_features: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    platform: Option<JsonPlatform>,
    #[serde(default)]
    urls: Option<Vec<String>>,
}

impl JsonDescriptor {
    fn into_descriptor(self, within: &str) -> Result<Descriptor> {
        crate::digest::parse(&self.digest)
            .map_err(|e| Error::FailedPrecondition(format!("{within}: {}", e.message())))?;
        let size = u64::try_from(self.size).map_err(|_| {
            Error::FailedPrecondition(format!("{within}: descriptor {} has negative size {}", self.digest, self.size))
        })?;
        Ok(Descriptor {
            media_type: self.media_type,
            digest: self.digest,
            size,
            annotations: self.annotations.unwrap_or_default().into_iter().collect(),
            platform: self.platform.map(|p| Platform {
                os: p.os,
                architecture: p.architecture,
                variant: p.variant,
                os_version: p.os_version,
                os_features: p.os_features,
            }),
            urls: self.urls.unwrap_or_default(),
        })
    }
}

/// An image index or manifest list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The entries, in document order.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The config descriptor.
    pub config: Descriptor,
    /// The layer descriptors, bottom first.
    pub layers: Vec<Descriptor>,
    /// `artifactType` (OCI 1.1 artifacts); empty when none.
    pub artifact_type: String,
}

/// The parts of an image config the puller uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `rootfs.diff_ids`, bottom first.
    pub diff_ids: Vec<String>,
    /// `config.User`; empty when none.
    pub user: String,
    /// `os`; empty when none.
    pub os: String,
    /// `architecture`; empty when none.
    pub architecture: String,
    /// `variant`; empty when none.
    pub variant: String,
}

impl Config {
    /// The platform the config declares (`os`, `architecture`, `variant`).
    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
            ..Platform::default()
        }
    }
}

fn malformed(what: &str, digest: &str, e: impl std::fmt::Display) -> Error {
    Error::FailedPrecondition(format!("malformed {what} {digest}: {e}"))
}

/// Checks that a document's own `mediaType`, when present, agrees with its descriptor's,
/// as containerd's `validateMediaType` does.
fn check_media_type(what: &str, desc: &Descriptor, own: Option<&str>) -> Result<()> {
    match own {
        Some(own) if !own.is_empty() && !is_generic_json(&desc.media_type) && own != desc.media_type => {
            Err(Error::FailedPrecondition(format!(
                "{what} {}: mediaType {own:?} in the document does not match {:?} in its descriptor",
                desc.digest, desc.media_type
            )))
        }
        _ => Ok(()),
    }
}

/// Parses the index `desc` points at.
///
/// Errors: `failed-precondition` for a malformed document.
pub fn parse_index(desc: &Descriptor, bytes: &[u8]) -> Result<Index> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc {
        schema_version: i64,
        #[serde(default)]
        media_type: Option<String>,
        manifests: Vec<JsonDescriptor>,
    }
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| malformed("index", &desc.digest, e))?;
    if doc.schema_version != 2 {
        return Err(malformed("index", &desc.digest, format!("schemaVersion {}", doc.schema_version)));
    }
    check_media_type("index", desc, doc.media_type.as_deref())?;
    let within = format!("index {}", desc.digest);
    let manifests = doc.manifests.into_iter().map(|d| d.into_descriptor(&within)).collect::<Result<Vec<_>>>()?;
    Ok(Index { manifests })
}

/// Parses the manifest `desc` points at.
///
/// Errors: `failed-precondition` for a malformed document.
pub fn parse_manifest(desc: &Descriptor, bytes: &[u8]) -> Result<Manifest> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc {
        schema_version: i64,
        #[serde(default)]
        media_type: Option<String>,
        config: JsonDescriptor,
        #[serde(default)]
        layers: Vec<JsonDescriptor>,
        #[serde(default)]
        artifact_type: Option<String>,
    }
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| malformed("manifest", &desc.digest, e))?;
    if doc.schema_version != 2 {
        return Err(malformed("manifest", &desc.digest, format!("schemaVersion {}", doc.schema_version)));
    }
    check_media_type("manifest", desc, doc.media_type.as_deref())?;
    let within = format!("manifest {}", desc.digest);
    Ok(Manifest {
        config: doc.config.into_descriptor(&within)?,
        layers: doc.layers.into_iter().map(|d| d.into_descriptor(&within)).collect::<Result<Vec<_>>>()?,
        artifact_type: doc.artifact_type.unwrap_or_default(),
    })
}

/// Parses the image config `desc` points at.
///
/// Errors: `failed-precondition` for a malformed document or diff ID.
pub fn parse_config(desc: &Descriptor, bytes: &[u8]) -> Result<Config> {
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(rename = "type", default)]
        kind: String,
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Exec {
        #[serde(rename = "User", default)]
        user: Option<String>,
    }
    #[derive(Deserialize)]
    struct Doc {
        rootfs: RootFs,
        #[serde(default)]
        config: Option<Exec>,
        #[serde(default)]
        os: Option<String>,
        #[serde(default)]
        architecture: Option<String>,
        #[serde(default)]
        variant: Option<String>,
    }
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| malformed("config", &desc.digest, e))?;
    if doc.rootfs.kind != "layers" {
        return Err(malformed(
            "config",
            &desc.digest,
            format!("rootfs type {:?}, expected \"layers\"", doc.rootfs.kind),
        ));
    }
    for d in &doc.rootfs.diff_ids {
        crate::digest::parse(d).map_err(|e| malformed("config", &desc.digest, e.message()))?;
    }
    Ok(Config {
        diff_ids: doc.rootfs.diff_ids,
        user: doc.config.and_then(|c| c.user).unwrap_or_default(),
        os: doc.os.unwrap_or_default(),
        architecture: doc.architecture.unwrap_or_default(),
        variant: doc.variant.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn desc(mt: &str) -> Descriptor {
        Descriptor { media_type: mt.into(), digest: D1.into(), ..Descriptor::default() }
    }

    #[test]
    fn classifies() {
        assert_eq!(kind_of(OCI_INDEX), Kind::Index);
        assert_eq!(kind_of(DOCKER_MANIFEST_LIST), Kind::Index);
        assert_eq!(kind_of(OCI_MANIFEST), Kind::Manifest);
        assert_eq!(kind_of(DOCKER_MANIFEST), Kind::Manifest);
        assert_eq!(kind_of(DOCKER_SCHEMA1_SIGNED), Kind::Schema1);
        assert_eq!(kind_of("application/vnd.cncf.helm.config.v1+json"), Kind::Unknown);
        assert_eq!(sniff(br#"{"schemaVersion":1,"name":"x"}"#), Kind::Schema1);
        assert_eq!(sniff(br#"{"schemaVersion":2,"manifests":[]}"#), Kind::Index);
        assert_eq!(sniff(br#"{"schemaVersion":2,"config":{}}"#), Kind::Manifest);
        assert_eq!(sniff(format!(r#"{{"mediaType":"{DOCKER_MANIFEST}"}}"#).as_bytes()), Kind::Manifest);
        assert_eq!(sniff(b"not json"), Kind::Unknown);
    }

    #[test]
    fn parses_index_with_platforms() {
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
                {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":10,
                  "platform":{{"architecture":"arm64","os":"linux","variant":"v8","os.features":["x"]}},
                  "annotations":{{"b":"2","a":"1"}}}},
                {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":20}}]}}"#
        );
        let idx = parse_index(&desc(OCI_INDEX), doc.as_bytes()).unwrap();
        assert_eq!(idx.manifests.len(), 2);
        let p = idx.manifests[0].platform.as_ref().unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str(), p.variant.as_str()), ("linux", "arm64", "v8"));
        assert_eq!(p.os_features, vec!["x".to_string()]);
        assert_eq!(idx.manifests[0].annotations, vec![("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert_eq!(idx.manifests[1].platform, None);
        assert_eq!(idx.manifests[1].size, 20);
    }

    #[test]
    fn refuses_bad_documents() {
        let mismatch = format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[]}}"#);
        assert!(
            matches!(parse_index(&desc(OCI_INDEX), mismatch.as_bytes()), Err(Error::FailedPrecondition(m)) if m.contains("does not match"))
        );
        let negative = format!(r#"{{"schemaVersion":2,"config":{{"digest":"{D1}","size":-1}},"layers":[]}}"#);
        assert!(
            matches!(parse_manifest(&desc(OCI_MANIFEST), negative.as_bytes()), Err(Error::FailedPrecondition(m)) if m.contains("negative size"))
        );
        let bad_digest = r#"{"schemaVersion":2,"config":{"digest":"sha256:abc","size":1},"layers":[]}"#;
        assert!(
            matches!(parse_manifest(&desc(OCI_MANIFEST), bad_digest.as_bytes()), Err(Error::FailedPrecondition(m)) if m.contains("manifest ") && m.contains("sha256:abc"))
        );
        assert!(
            matches!(parse_manifest(&desc(OCI_MANIFEST), b"{"), Err(Error::FailedPrecondition(m)) if m.contains("malformed manifest"))
        );
        let v1 = format!(r#"{{"schemaVersion":1,"config":{{"digest":"{D1}","size":1}}}}"#);
        assert!(parse_manifest(&desc(OCI_MANIFEST), v1.as_bytes()).is_err());
    }

    #[test]
    fn parses_config() {
        let doc = format!(
            r#"{{"architecture":"amd64","config":{{"User":"1000:1000","Env":["A=B"]}},"rootfs":{{"type":"layers","diff_ids":["{D1}","{D2}"]}}}}"#
        );
        let c = parse_config(&desc(OCI_CONFIG), doc.as_bytes()).unwrap();
        assert_eq!(c.diff_ids, vec![D1.to_string(), D2.to_string()]);
        assert_eq!(c.user, "1000:1000");
        assert_eq!((c.os.as_str(), c.architecture.as_str(), c.variant.as_str()), ("", "amd64", ""));
        let arm = r#"{"os":"linux","architecture":"arm","variant":"v6","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = parse_config(&desc(OCI_CONFIG), arm.as_bytes()).unwrap();
        assert_eq!(crate::platform::display(&c.platform()), "linux/arm/v6");
        let no_user = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{D1}"]}}}}"#);
        assert_eq!(parse_config(&desc(OCI_CONFIG), no_user.as_bytes()).unwrap().user, "");
        let bad = r#"{"rootfs":{"type":"layers","diff_ids":["nope"]}}"#;
        assert!(matches!(parse_config(&desc(OCI_CONFIG), bad.as_bytes()), Err(Error::FailedPrecondition(_))));
    }
}

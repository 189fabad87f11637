//! Cosign signatures made and pushed by the tests themselves (`tests/all/cosign.rs`, the
//! engine bench): keys, simple-signing payloads, signature manifests under the `.sig` tag,
//! and OCI 1.1 referrers with the referrers tag schema.
//!
//! Key items: [`TestKey`] (a fresh ECDSA P-256 key, its SPKI PEM public key as
//! `cosign generate-key-pair` writes `cosign.pub`, and signatures as cosign stores them:
//! base64 of the DER encoding), [`payload`] (the simple-signing document `cosign sign`
//! signs), [`push_sig_tag`] (a signature manifest under `sha256-<hex>.sig`, where
//! `cosign sign` puts it) and [`push_referrer`] (a signature manifest with a `subject`, as
//! cosign's OCI 1.1 mode pushes it, plus the `sha256-<hex>` index on registries without the
//! referrers API).

use std::io::Read;

use anyhow::{Context, Result};
use base64::Engine as _;
use p256::ecdsa::{signature::Signer as _, Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey as _, LineEnding};
use serde_json::{json, Value};

use crate::oci::digest_hex;
use crate::registry::Registry;

/// Media type of the simple-signing payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The artifact type of cosign signatures stored as referrers.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// A signing key made for one test.
pub struct TestKey(SigningKey);

impl TestKey {
    /// A fresh key from the system's random source.
    pub fn generate() -> Result<TestKey> {
        let mut random = std::fs::File::open("/dev/urandom")?;
        loop {
            let mut bytes = [0u8; 32];
            random.read_exact(&mut bytes)?;
            // A scalar of zero or over the group order is refused; draw again.
            if let Ok(k) = SigningKey::from_slice(&bytes) {
                return Ok(TestKey(k));
            }
        }
    }

    /// The public key as SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_pem(&self) -> String {
        self.0.verifying_key().to_public_key_pem(LineEnding::LF).expect("PEM encoding")
    }

    /// The signature of `payload` as cosign stores it: base64 of the DER ECDSA signature
    /// over SHA-256 of the bytes.
    pub fn sign(&self, payload: &[u8]) -> String {
        let sig: Signature = self.0.sign(payload);
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
    }
}

/// The simple-signing payload `cosign sign` signs for `digest` of `repository`
/// (`registry/path`).
pub fn payload(repository: &str, digest: &str) -> Vec<u8> {
    json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": null,
    })
    .to_string()
    .into_bytes()
}

/// One signature layer: the payload and its base64 signature.
pub struct Layer {
    pub payload: Vec<u8>,
    pub signature: String,
}

impl Layer {
    /// `payload` signed by `key`.
    pub fn signed(key: &TestKey, payload: Vec<u8>) -> Layer {
        let signature = key.sign(&payload);
        Layer { payload, signature }
    }
}

/// The tag `cosign sign` pushes the signatures of `digest` under.
pub fn sig_tag(digest: &str) -> String {
    format!("sha256-{}.sig", digest_hex(digest))
}

/// Uploads the config and payloads and returns the signature manifest's bytes (not pushed):
/// an OCI manifest whose layers are the payloads with their signature annotations; with
/// `subject` (digest, size, media type) and the OCI 1.1 `artifactType`.
fn signature_manifest(
    registry: &Registry,
    repo: &str,
    layers: &[Layer],
    subject: Option<(&str, u64, &str)>,
) -> Result<Vec<u8>> {
    let config = b"{}";
    registry.upload(repo, config)?;
    let mut descs = Vec::new();
    for l in layers {
        let digest = registry.upload(repo, &l.payload)?;
        descs.push(json!({
            "mediaType": SIMPLE_SIGNING, "digest": digest, "size": l.payload.len(),
            "annotations": {SIGNATURE_ANNOTATION: l.signature},
        }));
    }
    let mut m = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": crate::oci::sha256_digest(config), "size": config.len()},
        "layers": descs,
    });
    if let Some((digest, size, media_type)) = subject {
        m["artifactType"] = SIGNATURE_ARTIFACT_TYPE.into();
        m["subject"] = json!({"mediaType": media_type, "digest": digest, "size": size});
    }
    Ok(serde_json::to_vec(&m)?)
}

/// Pushes a signature manifest of `layers` to `repo` under the `.sig` tag of `subject` (a
/// manifest digest), replacing what was there; returns its digest.
pub fn push_sig_tag(registry: &Registry, repo: &str, subject: &str, layers: &[Layer]) -> Result<String> {
    let m = signature_manifest(registry, repo, layers, None)?;
    registry.put_manifest(repo, &sig_tag(subject), OCI_MANIFEST, &m)?;
    Ok(crate::oci::sha256_digest(&m))
}

/// Whether the registry serves the OCI 1.1 referrers API (`GET /v2/<repo>/referrers/<digest>`
/// answers something other than 404).
pub fn has_referrers_api(registry: &Registry, repo: &str, digest: &str) -> Result<bool> {
    let (status, _) = registry.get(&format!("/v2/{repo}/referrers/{digest}"))?;
    Ok(status != 404)
}

/// Pushes a signature manifest of `layers` whose `subject` is the manifest `subject`
/// (digest, size, media type) by its digest, as cosign's OCI 1.1 mode does. On a registry
/// without the referrers API, also pushes the referrers tag schema's index
/// (`sha256-<hex>`) listing it, as clients do there. Returns its digest and whether the
/// registry has the API.
pub fn push_referrer(
    registry: &Registry,
    repo: &str,
    subject: (&str, u64, &str),
    layers: &[Layer],
) -> Result<(String, bool)> {
    let m = signature_manifest(registry, repo, layers, Some(subject))?;
    let digest = crate::oci::sha256_digest(&m);
    registry.put_manifest(repo, &digest, OCI_MANIFEST, &m)?;
    let api = has_referrers_api(registry, repo, subject.0)?;
    if !api {
        let index = json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{
                "mediaType": OCI_MANIFEST, "digest": digest, "size": m.len(),
                "artifactType": SIGNATURE_ARTIFACT_TYPE,
            }],
        });
        let tag = format!("sha256-{}", digest_hex(subject.0));
        registry.put_manifest(repo, &tag, OCI_INDEX, &serde_json::to_vec(&index)?)?;
    }
    Ok((digest, api))
}

/// A settings document of the cosign puller: `keys` (name → key) and one rule named `name`
/// for the repository pattern `repositories`, needing one of `keys`.
pub fn settings(keys: &[(&str, &TestKey)], name: &str, repositories: &str) -> Result<String> {
    let keys: serde_json::Map<String, Value> =
        keys.iter().map(|(n, k)| (n.to_string(), Value::String(k.public_pem()))).collect();
    let names: Vec<&String> = keys.keys().collect();
    let doc = json!({
        "keys": keys,
        "rules": [{"name": name, "repositories": [repositories], "keys": names}],
    });
    serde_json::to_string(&doc).context("settings")
}

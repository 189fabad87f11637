//! Cosign key-based signatures, checked without the network: what one signature proves.
//!
//! A cosign signature of an image is a layer of a signature manifest (found by the
//! `sha256-<hex>.sig` tag or as an OCI 1.1 referrer): the layer's blob is the
//! *simple-signing payload*, a JSON document whose `critical.image.docker-manifest-digest`
//! names the signed manifest, and the layer's annotation [`SIGNATURE_ANNOTATION`] holds the
//! base64 of an ASN.1 DER ECDSA P-256 signature of SHA-256 over exactly those payload bytes.
//!
//! [`check`] judges one [`Signature`] against the trusted keys and the digest being pulled,
//! giving an [`Outcome`]: valid (by which key), a valid signature of another digest, a
//! signature no trusted key made over these bytes, or something that is not a signature.
//! ECDSA cannot tell a signature by another key from a signature by a trusted key over bytes
//! changed since: both are [`Outcome::BadSignature`], reported as "wrong key or tampered
//! payload". Key items: [`Key`] (a named, parsed SPKI PEM public key), [`payload`] (the
//! payload cosign writes, for tests and for people who sign by hand).

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature as EcdsaSignature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;

/// Media type of the simple-signing payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";

/// The layer annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// The artifact type of cosign signatures stored as OCI 1.1 referrers.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// The `critical.type` of a cosign image signature payload.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";

/// The longest base64 signature accepted (a DER P-256 signature is at most 72 bytes).
const MAX_SIGNATURE_B64: usize = 256;

/// A trusted public key and the name the settings give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The settings' name of the key, for messages.
    pub name: String,
    key: VerifyingKey,
    /// Not valid at or after this time (seconds since the epoch), when set.
    pub expires: Option<u64>,
}

impl Key {
    /// Parses an SPKI PEM public key (`-----BEGIN PUBLIC KEY-----`, as
    /// `cosign generate-key-pair` writes `cosign.pub`) on the P-256 curve.
    ///
    /// Errors (a message): not PEM, not SPKI, another curve or algorithm.
    pub fn from_pem(name: &str, pem: &str, expires: Option<u64>) -> Result<Key, String> {
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|e| format!("not an ECDSA P-256 public key in SPKI PEM (-----BEGIN PUBLIC KEY-----): {e}"))?;
        Ok(Key { name: name.to_string(), key, expires })
    }

    /// Whether `signature` (DER) is this key's over `payload`.
    fn verifies(&self, payload: &[u8], signature: &EcdsaSignature) -> bool {
        self.key.verify(payload, signature).is_ok()
    }
}

/// One signature as found in a signature manifest: the payload bytes (digest verified
/// against the manifest's layer descriptor) and the annotation's base64 text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The digest of the manifest the signature was found in, for messages.
    pub manifest: String,
    /// The payload layer's bytes.
    pub payload: Vec<u8>,
    /// The [`SIGNATURE_ANNOTATION`] value.
    pub signature: String,
}

/// What one signature proves about the digest being pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A trusted key signed a payload naming the digest.
    Valid { key: String },
    /// A trusted key signed a payload, but it names another manifest.
    OtherDigest { key: String, signed: String },
    /// No trusted key made this signature over these bytes.
    BadSignature,
    /// Not a cosign signature: unreadable signature encoding, or a trusted key signed
    /// something that is not an image signature payload.
    Malformed(String),
}

/// Judges `sig` against `keys` for the manifest `digest`.
pub fn check(sig: &Signature, keys: &[&Key], digest: &str) -> Outcome {
    let text = sig.signature.trim();
    if text.len() > MAX_SIGNATURE_B64 {
        return Outcome::Malformed(format!("the signature is over {MAX_SIGNATURE_B64} bytes of base64"));
    }
    let der = match base64::engine::general_purpose::STANDARD.decode(text) {
        Ok(der) => der,
        Err(e) => return Outcome::Malformed(format!("the signature is not base64: {e}")),
    };
    let ecdsa = match EcdsaSignature::from_der(&der) {
        Ok(s) => s,
        Err(_) => return Outcome::Malformed("the signature is not a DER ECDSA signature".into()),
    };
    let Some(key) = keys.iter().find(|k| k.verifies(&sig.payload, &ecdsa)) else {
        return Outcome::BadSignature;
    };
    match signed_digest(&sig.payload) {
        Ok(signed) if signed == digest => Outcome::Valid { key: key.name.clone() },
        Ok(signed) => Outcome::OtherDigest { key: key.name.clone(), signed },
        Err(why) => Outcome::Malformed(format!("key {} signed {why}", key.name)),
    }
}

/// The manifest digest a simple-signing payload names.
///
/// Errors (a message): not JSON, another `critical.type`, no digest.
pub fn signed_digest(payload: &[u8]) -> Result<String, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("a payload that is not JSON ({e})"))?;
    let critical = &doc["critical"];
    let kind = critical["type"].as_str().unwrap_or_default();
    if !kind.eq_ignore_ascii_case(PAYLOAD_TYPE) {
        return Err(format!("a payload of type {kind:?}, not {PAYLOAD_TYPE:?}"));
    }
    critical["image"]["docker-manifest-digest"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "a payload without critical.image.docker-manifest-digest".to_string())
}

/// The simple-signing payload cosign signs for the manifest `digest` of the repository
/// `repository` (`registry/path`), with no optional claims.
pub fn payload(repository: &str, digest: &str) -> Vec<u8> {
    serde_json::json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": null,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::{EncodePublicKey as _, LineEnding};

    pub(crate) fn signing_key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    pub(crate) fn pem_of(k: &SigningKey) -> String {
        k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap()
    }

    pub(crate) fn sign(k: &SigningKey, payload: &[u8]) -> String {
        let sig: EcdsaSignature = k.sign(payload);
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
    }

    fn key(name: &str, seed: u8) -> Key {
        Key::from_pem(name, &pem_of(&signing_key(seed)), None).unwrap()
    }

    fn signature(payload: Vec<u8>, signature: String) -> Signature {
        Signature { manifest: "sha256:sig".into(), payload, signature }
    }

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const OTHER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn a_trusted_signature_of_the_digest_is_valid() {
        let (release, ci) = (key("release", 1), key("ci", 2));
        let p = payload("quay.io/team/app", DIGEST);
        let sig = signature(p.clone(), sign(&signing_key(2), &p));
        assert_eq!(check(&sig, &[&release, &ci], DIGEST), Outcome::Valid { key: "ci".into() });
    }

    #[test]
    fn wrong_key_other_digest_and_tampered_payloads_are_told_apart() {
        let release = key("release", 1);
        let p = payload("quay.io/team/app", DIGEST);
        // Signed by a key the settings do not name.
        let by_stranger = signature(p.clone(), sign(&signing_key(9), &p));
        assert_eq!(check(&by_stranger, &[&release], DIGEST), Outcome::BadSignature);
        // A trusted signature of another image, presented for this one.
        let other = payload("quay.io/team/app", OTHER);
        let of_other = signature(other.clone(), sign(&signing_key(1), &other));
        assert_eq!(
            check(&of_other, &[&release], DIGEST),
            Outcome::OtherDigest { key: "release".into(), signed: OTHER.into() }
        );
        // That signature with its payload edited to name this image.
        let tampered = signature(payload("quay.io/team/app", DIGEST), of_other.signature.clone());
        assert_eq!(check(&tampered, &[&release], DIGEST), Outcome::BadSignature);
        // One byte of whitespace is tampering too: the signature covers the exact bytes.
        let mut spaced = p.clone();
        spaced.push(b' ');
        let valid = sign(&signing_key(1), &p);
        assert_eq!(check(&signature(spaced, valid), &[&release], DIGEST), Outcome::BadSignature);
    }

    #[test]
    fn garbage_is_malformed_not_valid() {
        let release = key("release", 1);
        let p = payload("quay.io/team/app", DIGEST);
        for bad in ["", "!!!", "aGVsbG8=", &"A".repeat(400)] {
            assert!(
                matches!(check(&signature(p.clone(), bad.into()), &[&release], DIGEST), Outcome::Malformed(_)),
                "{bad:?}"
            );
        }
        // A trusted key that signed something else than an image signature payload.
        let junk = br#"{"critical":{"type":"something else"}}"#.to_vec();
        let sig = signature(junk.clone(), sign(&signing_key(1), &junk));
        assert!(matches!(check(&sig, &[&release], DIGEST), Outcome::Malformed(m) if m.contains("something else")));
        assert_eq!(
            check(&signature(p.clone(), sign(&signing_key(1), &p)), &[], DIGEST),
            Outcome::BadSignature,
            "no keys"
        );
    }

    #[test]
    fn keys_parse_from_spki_pem_only() {
        let pem = pem_of(&signing_key(3));
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        Key::from_pem("k", &pem, None).unwrap();
        Key::from_pem("k", &format!("\n  {pem}\n"), None).unwrap();
        for bad in [
            "",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            &pem.replace("PUBLIC KEY", "EC PRIVATE KEY"),
        ] {
            assert!(Key::from_pem("k", bad, None).is_err(), "{bad}");
        }
    }
}

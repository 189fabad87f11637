//! Digests (`algorithm:hex`) and chain IDs.
//!
//! The algorithms are the two that registries and containerd use for content: `sha256`
//! (64 hex digits) and `sha512` (128). The hex must be lowercase, as go-digest requires, so a
//! digest has exactly one spelling and can be compared as a string. [`chain_ids`] computes
//! the OCI chain IDs that name committed snapshots:
//! `chain[0] = diff[0]`, `chain[i] = sha256(chain[i-1] + " " + diff[i])`.

use sha2::{Digest as _, Sha256, Sha512};

use crate::error::{Error, Result};

/// A digest algorithm the puller accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// SHA-256, 64 hex digits.
    Sha256,
    /// SHA-512, 128 hex digits.
    Sha512,
}

impl Algorithm {
    /// Number of hex digits of an encoded digest.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Whether `s` is non-empty and only lowercase hex digits.
pub fn is_lower_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks `s` is a well-formed digest and returns its algorithm and hex part.
///
/// Errors: `invalid-argument` naming `s`.
pub fn parse(s: &str) -> Result<(Algorithm, &str)> {
    let bad = |why: &str| Error::InvalidArgument(format!("invalid digest {s:?}: {why}"));
    let (alg, hex) = s.split_once(':').ok_or_else(|| bad("expected algorithm:hex"))?;
    let alg = match alg {
        "sha256" => Algorithm::Sha256,
        "sha512" => Algorithm::Sha512,
        "" => return Err(bad("empty algorithm")),
        other => return Err(bad(&format!("unsupported algorithm {other:?} (sha256 or sha512)"))),
    };
    if hex.len() != alg.hex_len() {
        return Err(bad(&format!("expected {} hex digits, got {}", alg.hex_len(), hex.len())));
    }
    if !is_lower_hex(hex) {
        return Err(bad("hex part must be lowercase hexadecimal"));
    }
    Ok((alg, hex))
}

/// The hex part of a digest (everything after the first `:`), or the whole string.
pub fn hex_part(digest: &str) -> &str {
    digest.split_once(':').map_or(digest, |(_, hex)| hex)
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Checks that `data` has digest `expected`.
///
/// Errors: `invalid-argument` for a malformed `expected`; `failed-precondition` when the
/// data does not match.
pub fn verify(expected: &str, data: &[u8]) -> Result<()> {
    let (alg, hex) = parse(expected)?;
    let actual = match alg {
        Algorithm::Sha256 => hex::encode(Sha256::digest(data)),
        Algorithm::Sha512 => hex::encode(Sha512::digest(data)),
    };
    if actual != hex {
        return Err(Error::FailedPrecondition(format!(
            "content of {expected} does not match its digest ({} bytes read)",
            data.len()
        )));
    }
    Ok(())
}

/// The chain IDs of a stack of layers with the given diff IDs (bottom first).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match chain.last() {
            None => diff.clone(),
            Some(parent) => sha256(format!("{parent} {diff}").as_bytes()),
        };
        chain.push(next);
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";
    const B: &str = "sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d";
    const C: &str = "sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6";

    #[test]
    fn sha256_of_bytes() {
        assert_eq!(sha256(b"a"), A);
    }

    #[test]
    fn chain_ids_match_sha256sum() {
        // Golden values from `printf '%s %s' $A $B | sha256sum`.
        let chain = chain_ids(&[A.into(), B.into(), C.into()]);
        assert_eq!(
            chain,
            vec![
                A.to_string(),
                "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676".into(),
                "sha256:2fce7f8ce91bcf0a1428b36e1024639fdbd9469eea762dba98aa749631885106".into(),
            ]
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn parse_table() {
        let sha512 = format!("sha512:{}", "a".repeat(128));
        let ok: &[&str] = &[A, &sha512];
        for d in ok {
            assert!(parse(d).is_ok(), "{d}");
        }
        let upper = A.to_uppercase().replacen("SHA256", "sha256", 1);
        let bad: &[&str] = &[
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            &upper,
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            ":abc",
            &format!("sha512:{}", "a".repeat(64)),
            &format!("sha256:{}", "g".repeat(64)),
        ];
        for d in bad {
            assert!(matches!(parse(d), Err(Error::InvalidArgument(_))), "{d:?}");
        }
    }

    #[test]
    fn verify_data() {
        assert!(verify(A, b"a").is_ok());
        assert!(matches!(verify(A, b"b"), Err(Error::FailedPrecondition(_))));
        let sha512_of_a = format!("sha512:{}", hex::encode(Sha512::digest(b"a")));
        assert!(verify(&sha512_of_a, b"a").is_ok());
    }
}

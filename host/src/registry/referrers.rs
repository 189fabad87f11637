//! The OCI 1.1 referrers of a manifest: which signatures, SBOMs and attestations point at it
//! through their `subject`. Key item: [`Client::referrers`], with [`Referrer`] its answer.
//!
//! The registry is asked `GET /v2/<name>/referrers/<digest>?artifactType=<type>`. A registry
//! that predates OCI 1.1 answers 404 there; then the index tagged `sha256-<hex>` (the
//! distribution spec's referrers tag schema, which clients that push to such registries keep
//! up to date) is read instead. A host with neither moves on to the next host (mirrors first,
//! as for `resolve`); when the last one has neither, there are no referrers. The filter is
//! applied here as well, whatever the registry says it applied (`OCI-Filters-Applied` is
//! optional).
//!
//! Bounds: the answer is read up to [`MAX_REFERRERS_BYTES`] (4 MiB, the manifest limit) and
//! may list at most [`MAX_REFERRERS`] entries after filtering; every entry's digest, media
//! type, artifact type and annotations are validated as a guest-supplied descriptor would be,
//! since the registry is no more trusted than the guest.

use std::collections::BTreeMap;

use reqwest::header;
use serde::Deserialize;

use super::{read_capped, Client, Credentials, Failure, Host, Repository, Route, MAX_MANIFEST};
use crate::{
    error::{Code, Error, Result},
    oci::Digest,
};

/// The largest referrers answer (an image index) the host reads.
pub const MAX_REFERRERS_BYTES: u64 = MAX_MANIFEST;

/// The most referrers one answer may list (after filtering by artifact type). A manifest
/// with more signatures and attestations than this is not one a node should pull.
pub const MAX_REFERRERS: usize = 1024;

/// The longest media type or artifact type accepted (RFC 6838 caps each half at 127).
const MAX_MEDIA_TYPE: usize = 255;

/// What the `Accept` header asks for: the referrers answer and the tag schema's index.
const INDEX_ACCEPT: &str = "application/vnd.oci.image.index.v1+json";

/// One manifest that refers to the one asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// The entry's `artifactType`; empty when the registry names none.
    pub artifact_type: String,
    pub annotations: BTreeMap<String, String>,
}

/// The image index a referrers answer is, as far as it is read.
#[derive(Deserialize)]
struct Index {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(rename = "artifactType", default)]
    artifact_type: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// `InvalidArgument` unless `s` is a media type (`type/subtype`, RFC 6838 characters), or,
/// with `empty_ok`, empty.
pub fn check_media_type(what: &str, s: &str, empty_ok: bool) -> Result<()> {
    if s.is_empty() && empty_ok {
        return Ok(());
    }
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b);
    let valid = s.len() <= MAX_MEDIA_TYPE
        && s.split_once('/').is_some_and(|(t, sub)| {
            !t.is_empty() && !sub.is_empty() && t.bytes().all(ok_char) && sub.bytes().all(ok_char)
        });
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "{what} {:?} is not a media type (type/subtype)",
            s.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// Parses a referrers answer (or a tag schema index) and keeps the entries of
/// `artifact_type` (all when empty). See the module docs for the bounds.
pub fn parse_referrers(body: &[u8], artifact_type: &str, what: &str) -> Result<Vec<Referrer>> {
    let bad = |why: String| Error::FailedPrecondition(format!("{what}: {why}"));
    let index: Index = serde_json::from_slice(body).map_err(|e| bad(format!("not an image index: {e}")))?;
    if !index.media_type.is_empty() && index.media_type != INDEX_ACCEPT {
        return Err(bad(format!(
            "an index was expected, not {:?}",
            index.media_type.chars().take(64).collect::<String>()
        )));
    }
    let mut out = Vec::new();
    for e in index.manifests {
        if !artifact_type.is_empty() && e.artifact_type != artifact_type {
            continue;
        }
        if out.len() == MAX_REFERRERS {
            return Err(Error::ResourceExhausted(format!("{what} lists more than {MAX_REFERRERS} referrers")));
        }
        let digest: Digest = e.digest.parse().map_err(|e: Error| bad(e.to_string()))?;
        check_media_type("media type", &e.media_type, false).map_err(|e| bad(e.to_string()))?;
        check_media_type("artifact type", &e.artifact_type, true).map_err(|e| bad(e.to_string()))?;
        if e.size > MAX_MANIFEST {
            return Err(bad(format!("referrer {digest} is larger than a manifest may be ({MAX_MANIFEST} bytes)")));
        }
        let annotations = crate::interfaces::labels(e.annotations.into_iter().collect())
            .map_err(|e| bad(format!("referrer {digest}: {e}")))?;
        out.push(Referrer {
            media_type: e.media_type,
            digest,
            size: e.size,
            artifact_type: e.artifact_type,
            annotations,
        });
    }
    Ok(out)
}

impl Client {
    /// The referrers of `digest` in `repo` of `artifact_type` (every type when empty): from
    /// the referrers API, or the `sha256-<hex>` tag where the registry has no such API (see
    /// the module docs). Hosts are tried as for `resolve` (those with the `resolve`
    /// capability, in order).
    pub async fn referrers(
        &self,
        repo: &Repository,
        digest: &Digest,
        artifact_type: &str,
        credentials: &Credentials,
    ) -> Result<Vec<Referrer>> {
        check_media_type("artifact type", artifact_type, true)?;
        let what = format!("referrers of {repo}@{digest}");
        let hosts: Vec<Host> = self.hosts(repo.registry())?.into_iter().filter(|h| h.capabilities.resolve).collect();
        let body = self
            .on_hosts(repo.registry(), hosts, &what, |host, http| {
                let what = &what;
                async move {
                    let route = Route { host: &host, http: &http, repo, credentials };
                    let mut api = reqwest::Url::parse(&route.url(&format!("referrers/{digest}")))
                        .map_err(|_| Failure::Fatal(Error::InvalidArgument(format!("{what}: no valid URL"))))?;
                    if !artifact_type.is_empty() {
                        api.query_pairs_mut().append_pair("artifactType", artifact_type);
                    }
                    match self.retrying(&host, what, || self.index_once(&route, api.as_str(), what)).await {
                        Err(Failure::NextHost(Error::NotFound(_))) => {}
                        other => return other,
                    }
                    tracing::debug!(host = %host.authority, "{what}: no referrers API, reading the tag schema");
                    let tag = route.url(&format!("manifests/{}-{}", digest.algorithm_name(), digest.hex()));
                    self.retrying(&host, what, || self.index_once(&route, &tag, what)).await
                }
            })
            .await;
        match body {
            Ok(body) => parse_referrers(&body, artifact_type, &what),
            // Neither the API nor the tag on the last host tried: no referrers.
            Err(Error::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// One `GET` of an index (`url`) on one host, its body read up to [`MAX_REFERRERS_BYTES`].
    async fn index_once(&self, route: &Route<'_>, url: &str, what: &str) -> Result<Vec<u8>, Failure> {
        let accept = [(header::ACCEPT, INDEX_ACCEPT.to_owned())];
        let resp = self.request(reqwest::Method::GET, route, url, &accept, what).await?;
        if resp.content_length().is_some_and(|n| n > MAX_REFERRERS_BYTES) {
            return Err(Failure::Fatal(Error::ResourceExhausted(format!(
                "{what} is larger than {MAX_REFERRERS_BYTES} bytes"
            ))));
        }
        read_capped(resp, MAX_REFERRERS_BYTES, what, self.config.stall_timeout).await.map_err(|e| match e.code() {
            Code::Unavailable => Failure::Retry(e),
            _ => Failure::Fatal(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &str) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{entries}]}}"#
        )
        .into_bytes()
    }

    fn entry(artifact_type: &str, hex: char) -> String {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":10,"artifactType":"{artifact_type}","annotations":{{"k":"v"}}}}"#,
            hex.to_string().repeat(64)
        )
    }

    #[test]
    fn filters_by_artifact_type_and_validates_entries() {
        let body = index(&format!(
            "{},{}",
            entry("application/vnd.dev.cosign.artifact.sig.v1+json", 'a'),
            entry("application/spdx+json", 'b')
        ));
        let all = parse_referrers(&body, "", "r").unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].annotations.get("k").map(String::as_str), Some("v"));
        let sigs = parse_referrers(&body, "application/vnd.dev.cosign.artifact.sig.v1+json", "r").unwrap();
        assert_eq!(sigs.len(), 1);
        assert_eq!(sigs[0].digest.hex(), "a".repeat(64));

        let bad_digest =
            index(r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:../x","size":1}"#);
        assert!(matches!(parse_referrers(&bad_digest, "", "r"), Err(Error::FailedPrecondition(_))));
        let huge = index(&entry("a/b", 'c').replace("\"size\":10", "\"size\":99999999999"));
        assert!(matches!(parse_referrers(&huge, "", "r"), Err(Error::FailedPrecondition(_))));
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        assert!(matches!(parse_referrers(manifest, "", "r"), Err(Error::FailedPrecondition(_))));
        assert!(matches!(parse_referrers(b"<html>", "", "r"), Err(Error::FailedPrecondition(_))));
    }

    #[test]
    fn more_than_the_cap_is_refused_after_filtering() {
        let many: Vec<String> = (0..=MAX_REFERRERS).map(|_| entry("a/b", 'd')).collect();
        let body = index(&many.join(","));
        assert!(matches!(parse_referrers(&body, "", "r"), Err(Error::ResourceExhausted(_))));
        assert!(parse_referrers(&body, "c/d", "r").unwrap().is_empty(), "filtered out before counting");
    }

    #[test]
    fn media_types_are_checked() {
        check_media_type("t", "application/vnd.dev.cosign.artifact.sig.v1+json", false).unwrap();
        check_media_type("t", "", true).unwrap();
        for bad in ["", "application", "a/b&c=d e", "a/b/c", "/b", "a/"] {
            assert!(check_media_type("t", bad, false).is_err(), "{bad}");
        }
    }
}

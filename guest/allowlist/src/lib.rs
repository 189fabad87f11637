//! `pullbox-allowlist`: an example puller with a policy of its own. Only images whose digest
//! is on an allowlist may be pulled.
//!
//! It is also the worked example of `docs/policy-authors.md`: everything but the policy —
//! reference normalization, platform choice, fetching, unpacking, image records, status,
//! list and remove — is the default puller's, used as a library (`pullbox-puller` with
//! `default-features = false`, so that its own exports stay out of this component). This
//! crate adds three things:
//!
//! - [`Allowlist`], the settings: `{"digests": ["sha256:…", …]}`. An empty document or an
//!   empty list allows nothing (the puller still answers status, list and remove). Unknown
//!   keys, malformed digests and repeated entries are refused with `invalid-argument`
//!   naming the key and the entry.
//! - its [`Policy`]: a pull is allowed when the digest of what the reference resolves to
//!   (a manifest, or an index) or, for an index, the digest of the manifest chosen for the
//!   platform, is on the list. Decided as early as it can be: a digest reference whose
//!   digest is listed passes before the registry is asked, a manifest root is judged as soon
//!   as it is resolved, an index root once its entry for the platform is chosen, always
//!   before config or layers are fetched. A refusal is `permission-denied` naming the rule
//!   (`digests`) and the digests that were not listed.
//! - [`AllowlistPuller`], the [`Puller`] exported with [`pullbox_puller::export_puller!`].
//!
//! Tags still work: the registry says which digest a tag names, the host verifies the
//! bytes against it, and only listed digests get through.

use std::collections::BTreeSet;
use std::sync::Mutex;

use pullbox_puller::digest;
use pullbox_puller::error::{Error, Result};
use pullbox_puller::host::Host;
use pullbox_puller::oci::{self, Kind};
use pullbox_puller::policy::{Image, Policy, Verdict};
use pullbox_puller::pull::{pull_with, Options};
use pullbox_puller::reference::Reference;
use pullbox_puller::types::{Descriptor, ImageInfo, Level, PullRequest};
use pullbox_puller::Puller;

/// The rule name in verdicts and denials.
pub const RULE: &str = "digests";

/// The allowed digests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    digests: BTreeSet<String>,
}

impl Allowlist {
    /// An allowlist of `digests` (not validated; see [`Allowlist::parse`]).
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(digests: I) -> Allowlist {
        Allowlist { digests: digests.into_iter().map(Into::into).collect() }
    }

    /// Parses the settings document `{"digests": [...]}`; empty means an empty list.
    ///
    /// Errors: `invalid-argument` for anything but a JSON object with at most the key
    /// `digests`, a list of distinct, well-formed digests.
    pub fn parse(doc: &str) -> Result<Allowlist> {
        if doc.trim().is_empty() {
            return Ok(Allowlist::default());
        }
        let value: serde_json::Value = serde_json::from_str(doc)
            .map_err(|e| Error::InvalidArgument(format!("settings are not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(Error::InvalidArgument(
                "settings must be a JSON object, for example {\"digests\": [\"sha256:…\"]}".into(),
            ));
        };
        let mut list = Allowlist::default();
        for (key, value) in &map {
            if key != "digests" {
                return Err(Error::InvalidArgument(format!("unknown setting {key:?} (known: digests)")));
            }
            let serde_json::Value::Array(items) = value else {
                return Err(Error::InvalidArgument(format!(
                    "setting \"digests\" must be a list of digests, not {value}"
                )));
            };
            for (i, item) in items.iter().enumerate() {
                let d = item.as_str().ok_or_else(|| {
                    Error::InvalidArgument(format!("setting \"digests\" entry {i} must be a string, not {item}"))
                })?;
                digest::parse(d)
                    .map_err(|e| Error::InvalidArgument(format!("setting \"digests\" entry {i}: {}", e.message())))?;
                if !list.digests.insert(d.to_string()) {
                    return Err(Error::InvalidArgument(format!("setting \"digests\" entry {i}: {d} is listed twice")));
                }
            }
        }
        Ok(list)
    }

    /// Whether `digest` is on the list.
    pub fn contains(&self, digest: &str) -> bool {
        self.digests.contains(digest)
    }

    /// How many digests are listed.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether the list is empty (nothing may be pulled).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

impl Policy for Allowlist {
    fn check_reference(&self, reference: &Reference) -> Verdict {
        let mut v = Verdict::new();
        if self.is_empty() {
            v.rule(RULE, Err("the allowlist is empty: no image may be pulled".into()));
        } else if reference.digest().is_some_and(|d| self.contains(d)) {
            v.rule(RULE, Ok(()));
        }
        v
    }

    fn check_root(&self, _reference: &Reference, root: &Descriptor) -> Verdict {
        let mut v = Verdict::new();
        if self.contains(&root.digest) {
            v.rule(RULE, Ok(()));
        } else if oci::kind_of(&root.media_type) != Kind::Index {
            // Not an index (or something the pull refuses anyway): nothing below it can
            // be listed instead.
            v.rule(RULE, Err(format!("manifest {} is not on the allowlist", root.digest)));
        }
        // An index not listed: its manifest for the platform may be; decided next stage.
        v
    }

    fn check_manifest(&self, _reference: &Reference, image: &Image<'_>) -> Verdict {
        let mut v = Verdict::new();
        let outcome = if self.contains(&image.root.digest) || self.contains(&image.manifest_desc.digest) {
            Ok(())
        } else if let Some(entry) = image.index_entry {
            Err(format!(
                "neither index {} nor its manifest {entry} for the platform is on the allowlist",
                image.root.digest,
                entry = entry.digest
            ))
        } else {
            Err(format!("manifest {} is not on the allowlist", image.manifest_desc.digest))
        };
        v.rule(RULE, outcome);
        v
    }
}

static CURRENT: Mutex<Allowlist> = Mutex::new(Allowlist { digests: BTreeSet::new() });

/// The allowlist puller: the default puller's machinery with [`Allowlist`] as its policy.
pub struct AllowlistPuller;

impl AllowlistPuller {
    /// The instance's allowlist.
    pub fn current() -> Allowlist {
        CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Puller for AllowlistPuller {
    fn configure(settings: &str) -> Result<()> {
        let list = Allowlist::parse(settings)?;
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = list;
        Ok(())
    }

    fn pull_image(host: &dyn Host, request: &PullRequest) -> Result<ImageInfo> {
        let list = Self::current();
        host.log(Level::Debug, &format!("allowlist: {} digests allowed", list.len()));
        pull_with(host, &Options::default(), &list, request)
            .inspect_err(|e| host.log(Level::Info, &format!("pull of {:?} failed: {e}", request.reference)))
    }
}

#[cfg(target_arch = "wasm32")]
pullbox_puller::export_puller!(AllowlistPuller);

#[cfg(test)]
mod tests {
    use super::*;
    use pullbox_puller::fake::{platform, FakeHost};

    fn req(reference: &str, p: &str) -> PullRequest {
        PullRequest { reference: reference.into(), platform: platform(p), ..PullRequest::default() }
    }

    fn pull(host: &FakeHost, list: &Allowlist, reference: &str, p: &str) -> Result<ImageInfo> {
        pull_with(host, &Options::default(), list, &req(reference, p))
    }

    #[test]
    fn parses_settings() {
        let d1 = digest::sha256(b"1");
        let d2 = format!("sha512:{}", "a".repeat(128));
        assert!(Allowlist::parse("").unwrap().is_empty());
        assert!(Allowlist::parse("{}").unwrap().is_empty());
        assert!(Allowlist::parse(r#"{"digests": []}"#).unwrap().is_empty());
        let list = Allowlist::parse(&format!(r#"{{"digests": ["{d1}", "{d2}"]}}"#)).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list.contains(&d1) && list.contains(&d2));

        for (doc, want) in [
            ("[]".to_string(), "must be a JSON object"),
            ("{".into(), "not valid JSON"),
            (r#"{"digest": []}"#.into(), "unknown setting \"digest\""),
            (r#"{"digests": "sha256:x"}"#.into(), "\"digests\" must be a list"),
            (r#"{"digests": [1]}"#.into(), "entry 0 must be a string"),
            (r#"{"digests": ["sha256:abc"]}"#.into(), "entry 0: invalid digest"),
            (format!(r#"{{"digests": ["{d1}", "{d1}"]}}"#), "entry 1"),
            (format!(r#"{{"digests": ["{}"]}}"#, d1.to_uppercase()), "entry 0: invalid digest"),
        ] {
            match Allowlist::parse(&doc) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(want), "{doc}: {m}"),
                other => panic!("{doc}: {other:?}"),
            }
        }
    }

    #[test]
    fn pulls_only_listed_manifests() {
        let host = FakeHost::new();
        let img = host.push_image(&[b"layer"], "");
        host.tag("quay.io/team/app", "1.0", &img.manifest);

        let empty = Allowlist::default();
        match pull(&host, &empty, "quay.io/team/app:1.0", "linux/amd64") {
            Err(Error::PermissionDenied(m)) => {
                assert!(m.contains("rule digests: the allowlist is empty"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert!(host.calls().is_empty(), "refused before resolving");

        let other = Allowlist::new([digest::sha256(b"something else")]);
        match pull(&host, &other, "quay.io/team/app:1.0", "linux/amd64") {
            Err(Error::PermissionDenied(m)) => {
                assert!(m.contains(&format!("manifest {} is not on the allowlist", img.manifest.digest)), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(host.calls().is_empty(), "refused before fetching anything");

        let listed = Allowlist::new([img.manifest.digest.clone()]);
        let info = pull(&host, &listed, "quay.io/team/app:1.0", "linux/amd64").unwrap();
        assert_eq!(info.id, img.config.digest);
        let by_digest = format!("quay.io/team/app@{}", img.manifest.digest);
        assert_eq!(pull(&host, &listed, &by_digest, "linux/amd64").unwrap().id, img.config.digest);
    }

    #[test]
    fn an_index_passes_by_its_own_digest_or_its_platform_manifest() {
        let host = FakeHost::new();
        let amd = host.push_image_for(&[b"amd"], "", "linux/amd64");
        let arm = host.push_image_for(&[b"arm"], "", "linux/arm64");
        let index = host.push_index(&[(&amd.manifest, "linux/amd64"), (&arm.manifest, "linux/arm64")]);
        host.tag("quay.io/team/multi", "1", &index);

        let by_index = Allowlist::new([index.digest.clone()]);
        assert_eq!(pull(&host, &by_index, "quay.io/team/multi:1", "linux/arm64").unwrap().id, arm.config.digest);

        let only_amd = Allowlist::new([amd.manifest.digest.clone()]);
        assert_eq!(pull(&host, &only_amd, "quay.io/team/multi:1", "linux/amd64").unwrap().id, amd.config.digest);
        // A fresh store over the same registry: nothing fetched yet.
        let remote = host.s.borrow().remote.clone();
        let host = FakeHost::new();
        host.s.borrow_mut().remote = remote;
        host.tag("quay.io/team/multi", "1", &index);
        match pull(&host, &only_amd, "quay.io/team/multi:1", "linux/arm64") {
            Err(Error::PermissionDenied(m)) => {
                assert!(m.contains(&index.digest) && m.contains(&arm.manifest.digest), "{m}")
            }
            other => panic!("{other:?}"),
        }
        // Only the chosen manifest was fetched: no config, no layer.
        assert_eq!(host.calls(), vec![format!("fetch {}", arm.manifest.digest)]);
    }

    /// The only test that touches the instance's list (tests run in parallel).
    #[test]
    fn the_puller_uses_the_configured_list() {
        let d = digest::sha256(b"x");
        AllowlistPuller::configure(&format!(r#"{{"digests": ["{d}"]}}"#)).unwrap();
        assert!(AllowlistPuller::configure(r#"{"digests": ["nope"]}"#).is_err());
        assert!(AllowlistPuller::current().contains(&d), "a refused document keeps the old list");

        let host = FakeHost::new();
        let img = host.push_image(&[b"layer"], "");
        host.tag("quay.io/team/app", "1.0", &img.manifest);
        AllowlistPuller::configure(&format!(r#"{{"digests": ["{}"]}}"#, img.manifest.digest)).unwrap();
        let info = AllowlistPuller::pull_image(&host, &req("quay.io/team/app:1.0", "linux/amd64")).unwrap();
        assert_eq!(AllowlistPuller::image_status(&host, "quay.io/team/app:1.0").unwrap(), Some(info.clone()));
        assert_eq!(AllowlistPuller::list_images(&host).unwrap(), vec![info]);
        AllowlistPuller::remove_image(&host, "quay.io/team/app:1.0").unwrap();
        assert!(AllowlistPuller::list_images(&host).unwrap().is_empty());
        AllowlistPuller::configure("").unwrap();
        assert!(AllowlistPuller::pull_image(&host, &req("quay.io/team/app:1.0", "linux/amd64")).is_err());
    }
}

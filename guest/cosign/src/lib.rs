//! `pullbox-cosign`: an example puller that pulls only images signed with cosign by a key
//! its settings trust, per registry or repository.
//!
//! Like `pullbox-allowlist`, everything but the policy is the default puller's, used as a
//! library (`pullbox-puller` with `default-features = false`). This crate adds:
//!
//! - [`settings`]: trusted keys (SPKI PEM, as `cosign generate-key-pair` writes them) and
//!   rules naming which keys each registry or repository pattern needs;
//! - [`verify`]: what one cosign signature proves (ECDSA P-256 over the simple-signing
//!   payload, whose `critical.image.docker-manifest-digest` must be the pulled digest);
//! - [`Cosign`], the [`Policy`]: right after the reference resolves, before anything else is
//!   fetched, it looks for signatures of the root digest — the manifest tagged
//!   `sha256-<hex>.sig` first (where `cosign sign` puts them), then the OCI 1.1 referrers of
//!   artifact type `application/vnd.dev.cosign.artifact.sig.v1+json` (`registry.referrers`,
//!   which falls back to the referrers tag schema on registries without the API) — fetches
//!   their payload layers, and checks every rule that applies. A refusal is
//!   `permission-denied` naming the rule (`signatures[<name>]`, or `unmatched`) and the
//!   reason: `unsigned`, `signature of another digest`, `wrong key or tampered payload`
//!   (ECDSA cannot tell them apart: see [`verify`]), `malformed signature`;
//! - [`CosignPuller`], exported with [`pullbox_puller::export_puller!`].
//!
//! What is signed is the digest the reference resolves to, as `cosign sign` signs it: for a
//! multi-platform image, the index. Registry failures while looking for signatures (other
//! than "no such tag") fail the pull with their own error, not as a denial. Keys with an
//! `expires` time are judged by the host's wall clock (`clock.now`).

pub mod settings;
pub mod verify;

use std::cell::RefCell;
use std::sync::Mutex;

use pullbox_puller::blob::read_small;
use pullbox_puller::digest;
use pullbox_puller::error::{Error, Result};
use pullbox_puller::host::Host;
use pullbox_puller::oci;
use pullbox_puller::policy::{Policy, Verdict};
use pullbox_puller::pull::{pull_with, Options};
use pullbox_puller::reference::Reference;
use pullbox_puller::types::{Descriptor, ImageInfo, Level, PullRequest};
use pullbox_puller::Puller;

use settings::{CosignSettings, Rule};
use verify::{check, Outcome, Signature, SIGNATURE_ANNOTATION, SIGNATURE_ARTIFACT_TYPE, SIMPLE_SIGNING};

/// The rule that refuses images no rule applies to.
pub const UNMATCHED: &str = "unmatched";

/// The most signature manifests read per pull, and the most signature layers checked: a
/// bound on what a registry full of junk signatures can cost a pull.
pub const MAX_SIGNATURES: usize = 16;

/// The policy of one pull: the settings, the host to look signatures up with, and what was
/// found (looked up once per pull, whatever the number of rules).
pub struct Cosign<'a> {
    host: &'a dyn Host,
    settings: &'a CosignSettings,
    /// The signatures of the root, once looked up: (from the `.sig` tag, from referrers).
    found: RefCell<Option<Found>>,
    /// A registry failure while looking up signatures: the pull fails with it.
    failure: RefCell<Option<Error>>,
}

/// The signatures found for a digest.
#[derive(Debug, Default)]
struct Found {
    signatures: Vec<Signature>,
    /// Where they were looked for, for messages.
    places: Vec<String>,
}

impl<'a> Cosign<'a> {
    /// The policy of one pull through `host`.
    pub fn new(host: &'a dyn Host, settings: &'a CosignSettings) -> Cosign<'a> {
        Cosign { host, settings, found: RefCell::new(None), failure: RefCell::new(None) }
    }

    /// The registry failure that made the last hook refuse, if any.
    pub fn take_failure(&self) -> Option<Error> {
        self.failure.borrow_mut().take()
    }

    /// Judges one rule against the signatures found for `digest`.
    fn judge(&self, rule: &Rule, found: &Found, digest: &str, now: u64) -> std::result::Result<String, String> {
        let keys = self.settings.keys_of(rule, now);
        if keys.is_empty() {
            return Err(format!("every key of the rule ({}) has expired", rule.keys.join(", ")));
        }
        if found.signatures.is_empty() {
            return Err(format!("unsigned: no cosign signature of {digest} ({})", found.places.join(", ")));
        }
        let (mut other, mut bad, mut malformed) = (None, 0, None);
        for sig in &found.signatures {
            match check(sig, &keys, digest) {
                Outcome::Valid { key } => return Ok(key),
                Outcome::OtherDigest { key, signed } => other = Some((key, signed, sig.manifest.clone())),
                Outcome::BadSignature => bad += 1,
                Outcome::Malformed(why) => malformed = Some((why, sig.manifest.clone())),
            }
        }
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        Err(if let Some((key, signed, manifest)) = other {
            format!(
                "signature of another digest: key {key} signed {signed}, not {digest} (signature manifest {manifest})"
            )
        } else if bad > 0 {
            format!(
                "wrong key or tampered payload: {bad} signature(s) of {digest}, none verifies with key(s) {} over its payload",
                names.join(", ")
            )
        } else {
            let (why, manifest) = malformed.unwrap_or_default();
            format!("malformed signature in {manifest}: {why}")
        })
    }

    /// The signatures of `digest` in `name`, looked up once.
    fn found(&self, name: &str, digest: &str) -> Result<std::cell::Ref<'_, Found>> {
        if self.found.borrow().is_none() {
            let found = find_signatures(self.host, name, digest)?;
            *self.found.borrow_mut() = Some(found);
        }
        Ok(std::cell::Ref::map(self.found.borrow(), |f| f.as_ref().expect("looked up")))
    }
}

/// The signature layers of the manifest `desc` (stored already): payloads fetched and read,
/// digests verified.
fn signature_layers(host: &dyn Host, name: &str, desc: &Descriptor, out: &mut Vec<Signature>) -> Result<()> {
    let bytes = read_small(host, desc, "signature manifest")?;
    let manifest = oci::parse_manifest(desc, &bytes)?;
    let layers: Vec<Descriptor> = manifest
        .layers
        .into_iter()
        .filter(|l| l.media_type == SIMPLE_SIGNING)
        .take(MAX_SIGNATURES.saturating_sub(out.len()))
        .collect();
    if layers.is_empty() {
        return Ok(());
    }
    host.fetch(name, &layers)?;
    for layer in layers {
        let signature =
            pullbox_puller::types::label(&layer.annotations, SIGNATURE_ANNOTATION).unwrap_or_default().to_string();
        let payload = read_small(host, &layer, "signature payload")?;
        out.push(Signature { manifest: desc.digest.clone(), payload, signature });
    }
    Ok(())
}

/// Looks up the cosign signatures of `digest` in repository `name`: the `.sig` tag, then the
/// referrers (see the crate docs).
fn find_signatures(host: &dyn Host, name: &str, digest: &str) -> Result<Found> {
    let (_, hex) = digest::parse(digest)?;
    let algorithm = digest.split(':').next().unwrap_or_default();
    let tag = format!("{algorithm}-{hex}.sig");
    let mut found = Found { places: vec![format!("tag {tag}"), "referrers".into()], ..Found::default() };
    match host.resolve(name, &tag) {
        Ok(desc) => signature_layers(host, name, &desc, &mut found.signatures)?,
        Err(Error::NotFound(_)) => {}
        Err(e) => return Err(e.context(format!("looking up signatures of {digest} (tag {tag})"))),
    }
    if found.signatures.is_empty() {
        let referrers = host
            .referrers(name, digest, SIGNATURE_ARTIFACT_TYPE)
            .map_err(|e| e.context(format!("looking up referrers of {digest}")))?;
        for r in referrers.iter().take(MAX_SIGNATURES) {
            if found.signatures.len() >= MAX_SIGNATURES {
                break;
            }
            let desc = r.descriptor();
            host.fetch(name, std::slice::from_ref(&desc))?;
            signature_layers(host, name, &desc, &mut found.signatures)?;
        }
    }
    Ok(found)
}

impl Policy for Cosign<'_> {
    fn audit(&self) -> bool {
        self.settings.audit
    }

    fn check_reference(&self, reference: &Reference) -> Verdict {
        let mut v = Verdict::new();
        if self.settings.rules_for(reference).next().is_none() {
            if self.settings.allow_unmatched {
                v.rule(UNMATCHED, Ok(()));
            } else {
                v.rule(
                    UNMATCHED,
                    Err(format!("no signature rule covers {}, and unmatched images are denied", reference.name())),
                );
            }
        }
        v
    }

    fn check_root(&self, reference: &Reference, root: &Descriptor) -> Verdict {
        let mut v = Verdict::new();
        let rules: Vec<&Rule> = self.settings.rules_for(reference).collect();
        if rules.is_empty() {
            return v;
        }
        let found = match self.found(&reference.name(), &root.digest) {
            Ok(f) => f,
            Err(e) => {
                let reason = format!("cannot look up signatures: {e}");
                *self.failure.borrow_mut() = Some(e);
                for rule in rules {
                    v.rule(&rule.name, Err(reason.clone()));
                }
                return v;
            }
        };
        let now = self.host.now().seconds;
        for rule in rules {
            match self.judge(rule, &found, &root.digest, now) {
                Ok(key) => {
                    self.host.log(
                        Level::Info,
                        &format!("cosign: {reference}: {} signed by key {key} ({})", root.digest, rule.name),
                    );
                    v.rule(&rule.name, Ok(()));
                }
                Err(reason) => {
                    v.rule(&rule.name, Err(reason));
                }
            }
        }
        v
    }
}

static CURRENT: Mutex<Option<CosignSettings>> = Mutex::new(None);

/// The cosign puller: the default puller's machinery with [`Cosign`] as its policy.
pub struct CosignPuller;

impl CosignPuller {
    /// The instance's settings.
    pub fn current() -> CosignSettings {
        CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default()
    }
}

/// Pulls `request` through `host` under `settings`: see the crate docs.
pub fn pull(host: &dyn Host, settings: &CosignSettings, request: &PullRequest) -> Result<ImageInfo> {
    let policy = Cosign::new(host, settings);
    pull_with(host, &Options::default(), &policy, request).map_err(|e| policy.take_failure().unwrap_or(e))
}

impl Puller for CosignPuller {
    fn configure(doc: &str) -> Result<()> {
        let settings = CosignSettings::parse(doc)?;
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(settings);
        Ok(())
    }

    fn pull_image(host: &dyn Host, request: &PullRequest) -> Result<ImageInfo> {
        let settings = Self::current();
        pull(host, &settings, request)
            .inspect_err(|e| host.log(Level::Info, &format!("pull of {:?} failed: {e}", request.reference)))
    }
}

#[cfg(target_arch = "wasm32")]
pullbox_puller::export_puller!(CosignPuller);

#[cfg(test)]
mod tests;

//! The cosign puller's settings: trusted keys and the rules saying which images need a
//! signature by which of them.
//!
//! ```json
//! {
//!   "mode": "enforce",
//!   "keys": {
//!     "release": "-----BEGIN PUBLIC KEY-----\n…\n-----END PUBLIC KEY-----\n",
//!     "ci": {"pem": "-----BEGIN PUBLIC KEY-----\n…", "expires": 1798761600}
//!   },
//!   "rules": [
//!     {"name": "team", "repositories": ["registry.example.com/team/**"], "keys": ["release", "ci"]},
//!     {"name": "mirror", "registries": ["*.mirror.example.com"], "keys": ["release"]}
//!   ],
//!   "unmatched": "deny"
//! }
//! ```
//!
//! - `keys`: name → SPKI PEM public key (what `cosign generate-key-pair` writes to
//!   `cosign.pub`), or an object with `pem` and `expires` (seconds since the epoch; the key
//!   verifies nothing from then on, by the host's `clock`).
//! - `rules`: a rule applies to an image when one of its `registries` ([`HostPattern`]) or
//!   `repositories` ([`RepositoryPattern`]) matches the normalized reference — the default
//!   puller's matchers, so the same spellings match — or, with neither, to every image.
//!   Every rule that applies must be met: a signature of the pulled digest by one of its
//!   `keys`. Rules are named `signatures[<name>]` (their index without a `name`).
//! - `unmatched`: `"deny"` (the default) refuses images no rule applies to, by the rule
//!   `unmatched`; `"allow"` pulls them unverified.
//! - `mode`: `"enforce"` (the default) or `"audit"` (log violations, pull anyway).
//!
//! Unknown keys, unknown key names in rules, malformed patterns or keys, repeated names and
//! empty key lists are refused with `invalid-argument` naming the setting.

use std::collections::{BTreeMap, BTreeSet};

use pullbox_puller::error::{Error, Result};
use pullbox_puller::policy::{canonical_host, HostPattern, RepositoryPattern};
use pullbox_puller::reference::Reference;
use serde_json::Value;

use crate::verify::Key;

/// Settings keys at the top level.
const TOP_KEYS: &[&str] = &["mode", "keys", "rules", "unmatched"];
/// Settings keys of a rule.
const RULE_KEYS: &[&str] = &["name", "registries", "repositories", "keys"];

/// One rule: which images, which keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `signatures[<name or index>]`, as denials name it.
    pub name: String,
    registries: Vec<HostPattern>,
    repositories: Vec<RepositoryPattern>,
    /// Names of keys in [`CosignSettings::keys`].
    pub keys: Vec<String>,
}

impl Rule {
    /// Whether the rule applies to `reference`.
    pub fn applies(&self, reference: &Reference) -> bool {
        if self.registries.is_empty() && self.repositories.is_empty() {
            return true;
        }
        let host_matches =
            canonical_host(reference.domain()).map(|h| self.registries.iter().any(|p| p.matches(&h))).unwrap_or(false);
        host_matches || self.repositories.iter().any(|p| p.matches(reference))
    }
}

/// The parsed settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CosignSettings {
    /// Log violations instead of refusing.
    pub audit: bool,
    /// Trusted keys by name.
    pub keys: BTreeMap<String, Key>,
    /// The rules, in order.
    pub rules: Vec<Rule>,
    /// Whether images no rule applies to are pulled.
    pub allow_unmatched: bool,
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn object<'a>(value: &'a Value, what: &str) -> Result<&'a serde_json::Map<String, Value>> {
    value.as_object().ok_or_else(|| invalid(format!("{what} must be a JSON object, not {value}")))
}

fn strings<'a>(value: &'a Value, what: &str) -> Result<Vec<&'a str>> {
    let items = value.as_array().ok_or_else(|| invalid(format!("{what} must be a list of strings, not {value}")))?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| v.as_str().ok_or_else(|| invalid(format!("{what} entry {i} must be a string, not {v}"))))
        .collect()
}

fn no_unknown(map: &serde_json::Map<String, Value>, known: &[&str], what: &str) -> Result<()> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(invalid(format!("unknown setting {what}{k:?} (known: {})", known.join(", ")))),
        None => Ok(()),
    }
}

fn parse_key(name: &str, value: &Value) -> Result<Key> {
    let what = format!("setting \"keys\".{name:?}");
    let (pem, expires) = match value {
        Value::String(pem) => (pem.as_str(), None),
        Value::Object(map) => {
            no_unknown(map, &["pem", "expires"], &format!("in {what}: "))?;
            let pem = map
                .get("pem")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("{what} needs \"pem\", a PEM public key")))?;
            let expires =
                match map.get("expires") {
                    None => None,
                    Some(v) => Some(v.as_u64().ok_or_else(|| {
                        invalid(format!("{what}: \"expires\" must be seconds since the epoch, not {v}"))
                    })?),
                };
            (pem, expires)
        }
        other => {
            return Err(invalid(format!(
                "{what} must be a PEM public key or {{\"pem\": …, \"expires\": …}}, not {other}"
            )))
        }
    };
    Key::from_pem(name, pem, expires).map_err(|e| invalid(format!("{what}: {e}")))
}

fn parse_rule(i: usize, value: &Value, keys: &BTreeMap<String, Key>) -> Result<Rule> {
    let map = object(value, &format!("setting \"rules\" entry {i}"))?;
    let name = match map.get("name") {
        None => i.to_string(),
        Some(Value::String(n)) if !n.is_empty() && !n.contains([']', '[']) => n.clone(),
        Some(other) => {
            return Err(invalid(format!(
                "setting \"rules\" entry {i}: \"name\" must be a non-empty string without brackets, not {other}"
            )))
        }
    };
    let what = format!("setting \"rules\"[{name}]");
    no_unknown(map, RULE_KEYS, &format!("in {what}: "))?;
    let registries = match map.get("registries") {
        None => Vec::new(),
        Some(v) => strings(v, &format!("{what}.registries"))?
            .into_iter()
            .map(|p| HostPattern::parse(p).map_err(|e| invalid(format!("{what}.registries: {e}"))))
            .collect::<Result<_>>()?,
    };
    let repositories = match map.get("repositories") {
        None => Vec::new(),
        Some(v) => strings(v, &format!("{what}.repositories"))?
            .into_iter()
            .map(|p| RepositoryPattern::parse(p).map_err(|e| invalid(format!("{what}.repositories: {e}"))))
            .collect::<Result<_>>()?,
    };
    let names = strings(
        map.get("keys").ok_or_else(|| invalid(format!("{what} needs \"keys\", the names of its trusted keys")))?,
        &format!("{what}.keys"),
    )?;
    if names.is_empty() {
        return Err(invalid(format!("{what}.keys is empty: no image could pass it")));
    }
    if let Some(unknown) = names.iter().find(|n| !keys.contains_key(**n)) {
        return Err(invalid(format!("{what}.keys: no key named {unknown:?} in \"keys\"")));
    }
    Ok(Rule {
        name: format!("signatures[{name}]"),
        registries,
        repositories,
        keys: names.into_iter().map(str::to_string).collect(),
    })
}

impl CosignSettings {
    /// Parses the settings document; empty means no keys and no rules (nothing may be
    /// pulled: `unmatched` defaults to `deny`).
    ///
    /// Errors: `invalid-argument` naming the setting (see the module docs).
    pub fn parse(doc: &str) -> Result<CosignSettings> {
        let mut out = CosignSettings::default();
        if doc.trim().is_empty() {
            return Ok(out);
        }
        let value: Value =
            serde_json::from_str(doc).map_err(|e| invalid(format!("settings are not valid JSON: {e}")))?;
        let map = object(&value, "the settings")?;
        no_unknown(map, TOP_KEYS, "")?;
        out.audit = match map.get("mode").map(|m| (m, m.as_str())) {
            None | Some((_, Some("enforce"))) => false,
            Some((_, Some("audit"))) => true,
            Some((m, _)) => return Err(invalid(format!("setting \"mode\" must be \"enforce\" or \"audit\", not {m}"))),
        };
        out.allow_unmatched = match map.get("unmatched").map(|m| (m, m.as_str())) {
            None | Some((_, Some("deny"))) => false,
            Some((_, Some("allow"))) => true,
            Some((m, _)) => {
                return Err(invalid(format!("setting \"unmatched\" must be \"deny\" or \"allow\", not {m}")))
            }
        };
        if let Some(keys) = map.get("keys") {
            for (name, v) in object(keys, "setting \"keys\"")? {
                out.keys.insert(name.clone(), parse_key(name, v)?);
            }
        }
        if let Some(rules) = map.get("rules") {
            let items =
                rules.as_array().ok_or_else(|| invalid(format!("setting \"rules\" must be a list, not {rules}")))?;
            let mut seen = BTreeSet::new();
            for (i, r) in items.iter().enumerate() {
                let rule = parse_rule(i, r, &out.keys)?;
                if !seen.insert(rule.name.clone()) {
                    return Err(invalid(format!("setting \"rules\" entry {i}: {} is named twice", rule.name)));
                }
                out.rules.push(rule);
            }
        }
        Ok(out)
    }

    /// The rules that apply to `reference`, in order.
    pub fn rules_for<'a>(&'a self, reference: &'a Reference) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.applies(reference))
    }

    /// The keys of `rule` that are valid at `now` (seconds since the epoch).
    pub fn keys_of(&self, rule: &Rule, now: u64) -> Vec<&Key> {
        rule.keys.iter().filter_map(|n| self.keys.get(n)).filter(|k| k.expires.is_none_or(|e| now < e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::tests::{pem_of, signing_key};

    fn doc(rules: &str) -> String {
        let pem = serde_json::to_string(&pem_of(&signing_key(1))).unwrap();
        format!(r#"{{"keys": {{"release": {pem}, "old": {{"pem": {pem}, "expires": 100}}}}, "rules": {rules}}}"#)
    }

    #[test]
    fn rules_match_with_the_default_pullers_matchers() {
        let s = CosignSettings::parse(&doc(
            r#"[{"name": "team", "repositories": ["127.0.0.1:5000/team/**"], "keys": ["release"]},
                {"registries": ["*.example.com"], "keys": ["release", "old"]}]"#,
        ))
        .unwrap();
        let names = |r: &str| {
            let r = Reference::parse(r).unwrap();
            s.rules_for(&r).map(|r| r.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names("127.0.0.1:5000/team/app:1"), ["signatures[team]"]);
        assert_eq!(names("127.1:5000/team/sub/app:1"), ["signatures[team]"], "canonical host");
        assert!(names("127.0.0.1:5000/teamevil/app:1").is_empty());
        assert_eq!(names("r.example.com/x:1"), ["signatures[1]"]);
        assert!(names("example.com.evil.io/x:1").is_empty());
        assert!(!s.allow_unmatched && !s.audit);
        let all = CosignSettings::parse(&doc(r#"[{"keys": ["release"]}]"#)).unwrap();
        assert_eq!(all.rules_for(&Reference::parse("busybox").unwrap()).count(), 1);
        // Expired keys drop out.
        let rule = &s.rules[1];
        assert_eq!(s.keys_of(rule, 99).len(), 2);
        assert_eq!(s.keys_of(rule, 100).len(), 1);
    }

    #[test]
    fn bad_settings_are_refused_naming_the_setting() {
        assert_eq!(CosignSettings::parse("").unwrap(), CosignSettings::default());
        for (d, want) in [
            ("[]".to_string(), "must be a JSON object"),
            (r#"{"rule": []}"#.into(), "unknown setting \"rule\""),
            (r#"{"mode": "warn"}"#.into(), "\"mode\""),
            (r#"{"unmatched": 1}"#.into(), "\"unmatched\""),
            (r#"{"keys": {"k": "nope"}}"#.into(), "\"keys\".\"k\""),
            (r#"{"keys": {"k": {"pem": "x", "ttl": 1}}}"#.into(), "unknown setting in"),
            (doc(r#"[{"keys": []}]"#), "keys is empty"),
            (doc(r#"[{"keys": ["ci"]}]"#), "no key named \"ci\""),
            (doc(r#"[{"repositories": ["Team/**"], "keys": ["release"]}]"#), "repositories"),
            (doc(r#"[{"registries": ["http://x"], "keys": ["release"]}]"#), "registries"),
            (doc(r#"[{"name": "a", "keys": ["release"]}, {"name": "a", "keys": ["release"]}]"#), "named twice"),
            (doc(r#"[{"key": ["release"]}]"#), "unknown setting in setting \"rules\"[0]"),
        ] {
            match CosignSettings::parse(&d) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(want), "{d}: {m}"),
                other => panic!("{d}: {other:?}"),
            }
        }
    }
}

//! Settings of the default puller, taken by `configure` as a JSON object, and the pull
//! policy they define ([`Settings`] implements [`Policy`]).
//!
//! An empty document (or only whitespace) and `{}` mean the defaults: no policy, everything
//! allowed. Keys (camelCase, except `discard_unpacked_layers`, which keeps containerd's
//! name); `null` is the same as leaving a key out:
//!
//! | key | value | checked at |
//! |---|---|---|
//! | `mode` | `"enforce"` (default): violations refuse the pull; `"audit"`: they are logged as warnings and the pull goes on | — |
//! | `allowedRegistries` | host patterns ([`HostPattern`]): only these registries | reference |
//! | `blockedRegistries` | host patterns: never these registries | reference |
//! | `allowedRepositories` | repository patterns ([`RepositoryPattern`]): only these | reference |
//! | `blockedRepositories` | repository patterns: never these | reference |
//! | `deniedTags` | tag globs (`*` within the tag): refuse pulls by these tags | reference |
//! | `requireDigest` | `true`: only references with a digest (`name@sha256:…`) | reference |
//! | `platforms` | `os/arch[/variant]` ([`PlatformPattern`]): the image's platform must be one | manifest (index entry), config |
//! | `maxImageSize` | bytes: compressed layers plus config, as the manifest declares them | manifest |
//! | `maxLayers` | the most layers an image may have | manifest |
//! | `allowedLayerMediaTypes` | every layer's media type must be one of these | manifest |
//! | `discard_unpacked_layers` | `true`: do not keep layer blobs once unpacked (containerd's option: the manifest gets no `containerd.io/gc.ref.content.l.<i>` labels) | — |
//! | `pinnedImages` | references (`registry.k8s.io/pause:3.10`, `busybox`, `name@sha256:…`): images with one of these names are reported `pinned`, so kubelet never garbage-collects them (containerd CRI's `pinned_images`) | status, list |
//! | `scopes` | a list of scopes ([`Scope`]): rules that apply only to pulls for some pods or runtime handlers | as their rules |
//! | `runtimePlatforms` | an object of runtime handler name (`""`: the default handler) to `{"platform": "os/arch[/variant]", "snapshotter": "name"}` (either or both): pulls for that handler pick that platform from an index and unpack into that snapshotter, one the host offers (containerd CRI's `runtime_platforms` and per-runtime `snapshotter`) ([`RuntimePlatform`]) | pull |
//!
//! A scope is an object with a selector and rules. The selector: `name` (optional; named in
//! denials as `scopes[<name>].<rule>`, else the scope's index is), `namespaces` (globs over
//! the pod's Kubernetes namespace, `*` for any run: `prod-*`), `podLabels` (an object of
//! label key to value glob; every one must be present and match) and `runtimeHandlers`
//! (globs over the runtime handler; `""` is the default handler). A scope applies to a pull
//! when every selector key it has matches; one with none applies to every pull. A pull
//! with no pod (the CLI without `--pod-namespace`, `crictl pull` without a pod config) is
//! matched by no `namespaces` or `podLabels` selector. The rules are the policy keys above:
//! `allowedRegistries`, `blockedRegistries`, `allowedRepositories`, `blockedRepositories`,
//! `deniedTags`, `requireDigest`, `platforms`, `maxImageSize`, `maxLayers`,
//! `allowedLayerMediaTypes`. Scopes only add rules: a pull must pass the top-level rules
//! and those of every scope that applies, so a pod's labels can never loosen the node's
//! policy. `mode`, `discard_unpacked_layers` and `pinnedImages` are node-wide (a pulled
//! image is shared by every pod) and refused inside a scope.
//!
//! An `allowed…` list that is present allows only what it lists (an empty list allows
//! nothing); a `blocked…` match refuses whatever the allow list says. Registry rules apply
//! to the registry of the normalized reference (`busybox` is on `docker.io`) and to the
//! hosts of non-distributable layers' URLs ([`Policy::allows_url_host`]). Tags are checked
//! only for references without a digest: with a digest, the tag plays no part in what is
//! pulled.
//!
//! Any other key, a value of the wrong type, a malformed pattern or a key given twice is
//! refused with `invalid-argument` naming the key, and a refused document leaves the
//! previous settings in force. The host creates a fresh instance for every call and calls
//! `configure` right before it, so the settings live in a global of the instance ([`set`],
//! [`current`]).

use std::fmt;
use std::sync::Mutex;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::oci;
use crate::platform::{self, PlatformPattern};
use crate::policy::{canonical_host, glob, HostPattern, HostPort, Image, Policy, RepositoryPattern, Verdict};
use crate::reference::Reference;
use crate::types::{label, Descriptor, PullRequest};

/// The node-wide keys [`parse`] accepts besides the rules ([`SCOPED_KEYS`]): they cannot be
/// set in a scope (a pulled image is shared by every pod).
pub const NODE_KEYS: &[&str] = &["mode", "discard_unpacked_layers", "pinnedImages", "scopes", "runtimePlatforms"];

/// Whether [`parse`] knows `key`: a node-wide key or a rule.
fn known(key: &str) -> bool {
    NODE_KEYS.contains(&key) || SCOPED_KEYS.contains(&key)
}

/// The rule keys a scope may hold, besides its selector ([`SELECTOR_KEYS`]).
pub const SCOPED_KEYS: &[&str] = &[
    "allowedRegistries",
    "blockedRegistries",
    "allowedRepositories",
    "blockedRepositories",
    "deniedTags",
    "requireDigest",
    "platforms",
    "maxImageSize",
    "maxLayers",
    "allowedLayerMediaTypes",
];

/// The selector keys of a scope.
pub const SELECTOR_KEYS: &[&str] = &["name", "namespaces", "podLabels", "runtimeHandlers"];

/// What a policy violation does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Violations refuse the pull with `permission-denied`.
    #[default]
    Enforce,
    /// Violations are logged as warnings; the pull goes on.
    Audit,
}

/// The default puller's settings. See the module docs for each field's key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// `discard_unpacked_layers`.
    pub discard_unpacked_layers: bool,
    /// `mode`.
    pub mode: Mode,
    /// `allowedRegistries`; `None`: any.
    pub allowed_registries: Option<Vec<HostPattern>>,
    /// `blockedRegistries`.
    pub blocked_registries: Vec<HostPattern>,
    /// `allowedRepositories`; `None`: any.
    pub allowed_repositories: Option<Vec<RepositoryPattern>>,
    /// `blockedRepositories`.
    pub blocked_repositories: Vec<RepositoryPattern>,
    /// `deniedTags`.
    pub denied_tags: Vec<String>,
    /// `requireDigest`.
    pub require_digest: bool,
    /// `platforms`; `None`: any.
    pub platforms: Option<Vec<PlatformPattern>>,
    /// `maxImageSize`, bytes.
    pub max_image_size: Option<u64>,
    /// `maxLayers`.
    pub max_layers: Option<u64>,
    /// `allowedLayerMediaTypes`; `None`: any that the host can unpack.
    pub allowed_layer_media_types: Option<Vec<String>>,
    /// `pinnedImages`, normalized to record names (`docker.io/library/busybox:latest`).
    pub pinned_images: Vec<String>,
    /// `scopes`, in document order.
    pub scopes: Vec<Scope>,
    /// `runtimePlatforms`: runtime handler → what its pulls unpack, sorted by handler.
    pub runtime_platforms: Vec<(String, RuntimePlatform)>,
}

/// One entry of `runtimePlatforms`: how pulls for one runtime handler unpack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimePlatform {
    /// `platform`: the platform picked from an index instead of the request's.
    pub platform: Option<crate::types::Platform>,
    /// `snapshotter`: the snapshotter layers are unpacked into instead of the host's default.
    pub snapshotter: Option<String>,
}

/// One entry of `scopes`: rules that apply to the pulls its selector matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// How denials name it: `name`, or the scope's index in the list.
    pub name: String,
    /// `namespaces` globs; `None`: any namespace, and pulls with no pod.
    pub namespaces: Option<Vec<String>>,
    /// `podLabels`: label key and value glob; every one must match.
    pub pod_labels: Vec<(String, String)>,
    /// `runtimeHandlers` globs; `None`: any handler.
    pub runtime_handlers: Option<Vec<String>>,
    /// The rules (only the [`SCOPED_KEYS`] fields are set).
    pub rules: Settings,
}

impl Scope {
    /// Whether the scope applies to `req`.
    pub fn matches(&self, req: &PullRequest) -> bool {
        if let Some(globs) = &self.namespaces {
            match &req.pod {
                Some(pod) if globs.iter().any(|g| glob(g, &pod.namespace)) => {}
                _ => return false,
            }
        }
        if !self.pod_labels.is_empty() {
            let Some(pod) = &req.pod else { return false };
            let all = self.pod_labels.iter().all(|(k, g)| label(&pod.labels, k).is_some_and(|v| glob(g, v)));
            if !all {
                return false;
            }
        }
        if let Some(globs) = &self.runtime_handlers {
            if !globs.iter().any(|g| glob(g, &req.runtime_handler)) {
                return false;
            }
        }
        true
    }
}

impl Settings {
    /// The defaults, usable in a `const`: no policy, layers kept.
    pub const DEFAULT: Settings = Settings {
        discard_unpacked_layers: false,
        mode: Mode::Enforce,
        allowed_registries: None,
        blocked_registries: Vec::new(),
        allowed_repositories: None,
        blocked_repositories: Vec::new(),
        denied_tags: Vec::new(),
        require_digest: false,
        platforms: None,
        max_image_size: None,
        max_layers: None,
        allowed_layer_media_types: None,
        pinned_images: Vec::new(),
        scopes: Vec::new(),
        runtime_platforms: Vec::new(),
    };

    /// The `runtimePlatforms` entry of runtime handler `handler`, if any.
    pub fn runtime_platform(&self, handler: &str) -> Option<&RuntimePlatform> {
        self.runtime_platforms.iter().find(|(h, _)| h == handler).map(|(_, p)| p)
    }

    /// The scopes that apply to `req`, in document order.
    pub fn scopes_for(&self, req: &PullRequest) -> Vec<&Scope> {
        self.scopes.iter().filter(|s| s.matches(req)).collect()
    }

    /// The policy of a pull of `req`: the top-level rules and those of every scope that
    /// applies to it.
    pub fn policy_for(&self, req: &PullRequest) -> Scoped<'_> {
        Scoped { settings: self, scopes: self.scopes_for(req) }
    }
}

static CURRENT: Mutex<Settings> = Mutex::new(Settings::DEFAULT);

/// The top-level members of a JSON object in document order, duplicates kept (serde_json's
/// maps keep only the last one, and a repeated key is a mistake worth refusing).
struct Members(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

fn invalid(key: &str, why: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("setting {key:?} {why}"))
}

fn bool_of(key: &str, v: &Value) -> Result<bool> {
    v.as_bool().ok_or_else(|| invalid(key, format!("must be true or false, not {v}")))
}

fn u64_of(key: &str, v: &Value) -> Result<u64> {
    v.as_u64().ok_or_else(|| invalid(key, format!("must be a whole number of 0 or more, not {v}")))
}

/// A list of strings, each turned into a `T` by `item` (whose error names the entry).
fn list_of<T>(key: &str, v: &Value, item: impl Fn(&str) -> std::result::Result<T, String>) -> Result<Vec<T>> {
    let Value::Array(items) = v else {
        return Err(invalid(key, format!("must be a list of strings, not {v}")));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let s = x.as_str().ok_or_else(|| invalid(key, format!("must be a list of strings; entry {i} is {x}")))?;
            item(s).map_err(|why| invalid(key, format!("entry {i}: {why}")))
        })
        .collect()
}

/// `s` when its length is in `len` and every byte is `allowed`; else a message saying it is
/// not a `what` (which names the characters allowed).
fn spelled(
    s: &str,
    len: std::ops::RangeInclusive<usize>,
    allowed: impl Fn(u8) -> bool,
    what: &str,
) -> std::result::Result<String, String> {
    if len.contains(&s.len()) && s.bytes().all(allowed) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a {what}"))
    }
}

fn tag_pattern(s: &str) -> std::result::Result<String, String> {
    spelled(
        s,
        1..=crate::reference::TAG_LENGTH_MAX,
        |b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'*'),
        "tag pattern (letters, digits, '_', '.', '-', and * for any run)",
    )
}

/// A reference as the record name it normalizes to.
fn pinned_name(s: &str) -> std::result::Result<String, String> {
    Reference::parse(s).map(|r| r.record_name()).map_err(|e| e.message().to_string())
}

fn media_type(s: &str) -> std::result::Result<String, String> {
    let ok = s.split_once('/').is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        && !s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a media type (type/subtype)"))
    }
}

/// Parses a settings document.
///
/// Errors: `invalid-argument` for a document that is not a JSON object, an unknown or
/// repeated key, or a bad value (the key and, for lists, the entry are named).
pub fn parse(doc: &str) -> Result<Settings> {
    if doc.trim().is_empty() {
        return Ok(Settings::DEFAULT);
    }
    let value: Value =
        serde_json::from_str(doc).map_err(|e| Error::InvalidArgument(format!("settings are not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Error::InvalidArgument("settings must be a JSON object (for example {})".into()));
    }
    let Members(members) =
        serde_json::from_str(doc).map_err(|e| Error::InvalidArgument(format!("settings are not valid JSON: {e}")))?;
    check_unique(&members)?;
    // Nested objects (scopes) are read as `Value`s, which keep only the last of a repeated
    // key: refuse repeats at any depth first.
    serde_json::from_str::<NoRepeats>(doc).map_err(|e| Error::InvalidArgument(format!("settings: {e}")))?;
    parse_members(&members)
}

/// A JSON document that repeats no key in any of its objects (deserializing it checks).
struct NoRepeats;

impl<'de> serde::Deserialize<'de> for NoRepeats {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NoRepeats;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<NoRepeats, E> {
                Ok(NoRepeats)
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<NoRepeats, E> {
                Ok(NoRepeats)
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<NoRepeats, E> {
                Ok(NoRepeats)
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<NoRepeats, E> {
                Ok(NoRepeats)
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<NoRepeats, E> {
                Ok(NoRepeats)
            }
            fn visit_unit<E>(self) -> std::result::Result<NoRepeats, E> {
                Ok(NoRepeats)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<NoRepeats, A::Error> {
                while seq.next_element::<NoRepeats>()?.is_some() {}
                Ok(NoRepeats)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<NoRepeats, A::Error> {
                let mut keys = std::collections::BTreeSet::new();
                while let Some(k) = map.next_key::<String>()? {
                    if !keys.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("key {k:?} is given twice in one object")));
                    }
                    map.next_value::<NoRepeats>()?;
                }
                Ok(NoRepeats)
            }
        }
        d.deserialize_any(V)
    }
}

fn check_unique(members: &[(String, Value)]) -> Result<()> {
    let mut seen: Vec<&str> = Vec::new();
    for (key, _) in members {
        if seen.contains(&key.as_str()) {
            return Err(invalid(key, "is given twice"));
        }
        seen.push(key);
    }
    Ok(())
}

/// The settings of the top-level members (keys checked unique).
fn parse_members(members: &[(String, Value)]) -> Result<Settings> {
    let mut settings = Settings::DEFAULT;
    for (key, value) in members {
        let v = value;
        if v.is_null() && known(key) {
            continue; // null: the default
        }
        match key.as_str() {
            "mode" => {
                settings.mode = match v.as_str() {
                    Some("enforce") => Mode::Enforce,
                    Some("audit") => Mode::Audit,
                    _ => return Err(invalid(key, format!("must be \"enforce\" or \"audit\", not {v}"))),
                }
            }
            "allowedRegistries" => settings.allowed_registries = Some(list_of(key, v, HostPattern::parse)?),
            "blockedRegistries" => settings.blocked_registries = list_of(key, v, HostPattern::parse)?,
            "allowedRepositories" => settings.allowed_repositories = Some(list_of(key, v, RepositoryPattern::parse)?),
            "blockedRepositories" => settings.blocked_repositories = list_of(key, v, RepositoryPattern::parse)?,
            "deniedTags" => settings.denied_tags = list_of(key, v, tag_pattern)?,
            "requireDigest" => settings.require_digest = bool_of(key, v)?,
            "platforms" => settings.platforms = Some(list_of(key, v, PlatformPattern::parse)?),
            "maxImageSize" => settings.max_image_size = Some(u64_of(key, v)?),
            "maxLayers" => settings.max_layers = Some(u64_of(key, v)?),
            "allowedLayerMediaTypes" => settings.allowed_layer_media_types = Some(list_of(key, v, media_type)?),
            "discard_unpacked_layers" => settings.discard_unpacked_layers = bool_of(key, v)?,
            "pinnedImages" => settings.pinned_images = list_of(key, v, pinned_name)?,
            "scopes" => settings.scopes = scopes(v)?,
            "runtimePlatforms" => settings.runtime_platforms = runtime_platforms(v)?,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown setting {key:?} (known: {}, {})",
                    NODE_KEYS.join(", "),
                    SCOPED_KEYS.join(", ")
                )))
            }
        }
    }
    Ok(settings)
}

fn namespace_glob(s: &str) -> std::result::Result<String, String> {
    spelled(
        s,
        1..=63,
        |b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'*'),
        "namespace pattern (lowercase letters, digits, '-', and * for any run)",
    )
}

fn handler_glob(s: &str) -> std::result::Result<String, String> {
    spelled(
        s,
        0..=253,
        |b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'*'),
        "runtime handler pattern (letters, digits, '_', '.', '-', and * for any run; \"\" for \
         the default handler)",
    )
}

/// `runtimePlatforms`: an object of runtime handler name to a [`RuntimePlatform`] object.
fn runtime_platforms(v: &Value) -> Result<Vec<(String, RuntimePlatform)>> {
    const KEY: &str = "runtimePlatforms";
    let Value::Object(map) = v else {
        return Err(invalid(
            KEY,
            format!("must be an object of runtime handler to {{\"platform\", \"snapshotter\"}}, not {v}"),
        ));
    };
    let mut out = Vec::new();
    for (handler, entry) in map {
        let at = |why: String| invalid(KEY, format!("entry {handler:?}: {why}"));
        if handler.contains('*') {
            return Err(at("a runtime handler name, not a pattern".into()));
        }
        handler_glob(handler).map_err(at)?;
        let Value::Object(fields) = entry else {
            return Err(at(format!("must be an object, not {entry}")));
        };
        let mut rp = RuntimePlatform { platform: None, snapshotter: None };
        for (field, value) in fields {
            let text = value.as_str().ok_or_else(|| at(format!("{field:?} must be a string, not {value}")))?;
            match field.as_str() {
                "platform" => {
                    let pattern = PlatformPattern::parse(text).map_err(at)?;
                    rp.platform = Some(pattern.platform());
                }
                "snapshotter" => rp.snapshotter = Some(snapshotter_name(text).map_err(at)?),
                other => return Err(at(format!("unknown key {other:?} (known: platform, snapshotter)"))),
            }
        }
        if rp.platform.is_none() && rp.snapshotter.is_none() {
            return Err(at("names neither \"platform\" nor \"snapshotter\"".into()));
        }
        out.push((handler.clone(), rp));
    }
    Ok(out)
}

/// A snapshotter name as containerd's plugin IDs are spelled.
fn snapshotter_name(s: &str) -> std::result::Result<String, String> {
    spelled(
        s,
        1..=64,
        |b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'),
        "snapshotter name (letters, digits, '_', '.', '-')",
    )
}

/// `scopes`: a list of scope objects.
fn scopes(v: &Value) -> Result<Vec<Scope>> {
    const KEY: &str = "scopes";
    let Value::Array(items) = v else {
        return Err(invalid(KEY, format!("must be a list of objects, not {v}")));
    };
    let mut out: Vec<Scope> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(map) = item.as_object() else {
            return Err(invalid(KEY, format!("must be a list of objects; entry {i} is {item}")));
        };
        // Keys are unique here: `parse` refused a document repeating a key in any object.
        let members: Vec<(String, Value)> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let scope = scope(i, &members).map_err(|e| match e {
            Error::InvalidArgument(m) => invalid(KEY, format!("entry {i}: {m}")),
            other => other,
        })?;
        if out.iter().any(|s| s.name == scope.name) {
            return Err(invalid(KEY, format!("entry {i}: name {:?} is given to two scopes", scope.name)));
        }
        out.push(scope);
    }
    Ok(out)
}

/// One scope, entry `i` of `scopes`.
fn scope(i: usize, members: &[(String, Value)]) -> Result<Scope> {
    let mut scope = Scope {
        name: i.to_string(),
        namespaces: None,
        pod_labels: Vec::new(),
        runtime_handlers: None,
        rules: Settings::DEFAULT,
    };
    let mut rules = Vec::new();
    for (key, v) in members {
        if v.is_null() {
            continue;
        }
        match key.as_str() {
            "name" => {
                scope.name = match v.as_str() {
                    Some(n)
                        if !n.is_empty()
                            && n.len() <= 63
                            && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) =>
                    {
                        n.to_string()
                    }
                    _ => {
                        return Err(invalid(key, format!("must be a name of letters, digits, '_', '.', '-', not {v}")))
                    }
                }
            }
            "namespaces" => scope.namespaces = Some(list_of(key, v, namespace_glob)?),
            "runtimeHandlers" => scope.runtime_handlers = Some(list_of(key, v, handler_glob)?),
            "podLabels" => {
                let Value::Object(map) = v else {
                    return Err(invalid(key, format!("must be an object of label key to value pattern, not {v}")));
                };
                for (k, g) in map {
                    let g = g
                        .as_str()
                        .ok_or_else(|| invalid(key, format!("label {k:?}: the value pattern must be a string")))?;
                    if k.is_empty() || k.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
                        return Err(invalid(key, format!("{k:?} is not a label key")));
                    }
                    scope.pod_labels.push((k.clone(), g.to_string()));
                }
            }
            k if SCOPED_KEYS.contains(&k) => rules.push((key.clone(), v.clone())),
            k if NODE_KEYS.contains(&k) => {
                return Err(invalid(
                    key,
                    "is node-wide and cannot be set in a scope (a pulled image is shared by every pod)",
                ))
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown scope key {key:?} (known: {}, {})",
                    SELECTOR_KEYS.join(", "),
                    SCOPED_KEYS.join(", ")
                )))
            }
        }
    }
    scope.rules = parse_members(&rules)?;
    Ok(scope)
}

/// Parses `doc` and, when valid, makes it the instance's settings.
pub fn configure(doc: &str) -> Result<()> {
    let settings = parse(doc)?;
    set(settings);
    Ok(())
}

/// Replaces the instance's settings.
pub fn set(settings: Settings) {
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = settings;
}

/// The instance's settings.
pub fn current() -> Settings {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn texts<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    items.into_iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ")
}

impl Settings {
    /// The registry rules on one host (of the reference, or of a layer URL); `what` names it
    /// in reasons.
    fn registry_rules(&self, verdict: &mut Verdict, what: &str, domain: &str) {
        let host = canonical_host(domain);
        if !self.blocked_registries.is_empty() {
            let outcome = match &host {
                Err(e) => Err(format!("{what} cannot be checked: {e}")),
                Ok(h) => match self.blocked_registries.iter().find(|p| p.matches(h)) {
                    Some(p) => Err(format!("{what} {h} matches blocked pattern {:?}", p.text)),
                    None => Ok(()),
                },
            };
            verdict.rule("blockedRegistries", outcome);
        }
        if let Some(allowed) = &self.allowed_registries {
            let outcome = match &host {
                Err(e) => Err(format!("{what} cannot be checked: {e}")),
                Ok(h) if allowed.iter().any(|p| p.matches(h)) => Ok(()),
                Ok(h) => Err(format!(
                    "{what} {h} is not an allowed registry (allowed: {})",
                    if allowed.is_empty() { "none".to_string() } else { texts(allowed.iter().map(|p| &p.text)) }
                )),
            };
            verdict.rule("allowedRegistries", outcome);
        }
    }

    fn platform_rule(&self, verdict: &mut Verdict, what: &str, p: &crate::types::Platform) {
        let Some(allowed) = &self.platforms else {
            return;
        };
        let outcome = if p.architecture.is_empty() {
            Err(format!("{what} names no platform (allowed: {})", texts(allowed.iter().map(|a| &a.text))))
        } else if allowed.iter().any(|a| a.matches(p)) {
            Ok(())
        } else {
            Err(format!(
                "{what} is for {}, not an allowed platform (allowed: {})",
                platform::display(p),
                texts(allowed.iter().map(|a| &a.text))
            ))
        };
        verdict.rule("platforms", outcome);
    }
}

impl Policy for Settings {
    fn audit(&self) -> bool {
        self.mode == Mode::Audit
    }

    fn check_reference(&self, reference: &Reference) -> Verdict {
        let mut v = Verdict::new();
        self.registry_rules(&mut v, "registry", reference.domain());
        let name = reference.name();
        if !self.blocked_repositories.is_empty() {
            let outcome = match self.blocked_repositories.iter().find(|p| p.matches(reference)) {
                Some(p) => Err(format!("repository {name} matches blocked pattern {:?}", p.text)),
                None => Ok(()),
            };
            v.rule("blockedRepositories", outcome);
        }
        if let Some(allowed) = &self.allowed_repositories {
            let outcome = if allowed.iter().any(|p| p.matches(reference)) {
                Ok(())
            } else {
                Err(format!(
                    "repository {name} is not an allowed repository (allowed: {})",
                    if allowed.is_empty() { "none".to_string() } else { texts(allowed.iter().map(|p| &p.text)) }
                ))
            };
            v.rule("allowedRepositories", outcome);
        }
        if self.require_digest {
            let outcome = match reference.digest() {
                Some(_) => Ok(()),
                None => Err(format!("the reference names no digest; pull by digest, for example {name}@sha256:…")),
            };
            v.rule("requireDigest", outcome);
        }
        if !self.denied_tags.is_empty() {
            let outcome = match (reference.digest(), reference.tag()) {
                (None, Some(tag)) => match self.denied_tags.iter().find(|p| glob(p, tag)) {
                    Some(p) if p == tag => Err(format!("tag {tag:?} is denied")),
                    Some(p) => Err(format!("tag {tag:?} is denied (pattern {p:?})")),
                    None => Ok(()),
                },
                _ => Ok(()),
            };
            v.rule("deniedTags", outcome);
        }
        v
    }

    fn check_manifest(&self, _reference: &Reference, image: &Image<'_>) -> Verdict {
        let mut v = Verdict::new();
        let m = image.manifest;
        if let Some(entry) = image.index_entry {
            if let Some(p) = &entry.platform {
                self.platform_rule(&mut v, &format!("index entry {}", entry.digest), p);
            }
        }
        if let Some(max) = self.max_layers {
            let n = m.layers.len() as u64;
            let outcome = if n > max {
                Err(format!("manifest {} has {n} layers, more than the {max} allowed", image.manifest_desc.digest))
            } else {
                Ok(())
            };
            v.rule("maxLayers", outcome);
        }
        if let Some(max) = self.max_image_size {
            let size = image.declared_size();
            let outcome = if size > max {
                Err(format!(
                    "the image is {size} bytes (config and compressed layers of manifest {}), \
                     more than the {max} allowed",
                    image.manifest_desc.digest
                ))
            } else {
                Ok(())
            };
            v.rule("maxImageSize", outcome);
        }
        if let Some(allowed) = &self.allowed_layer_media_types {
            let bad: Vec<&Descriptor> = m.layers.iter().filter(|l| !allowed.contains(&l.media_type)).collect();
            let outcome = match bad.first() {
                None => Ok(()),
                Some(first) => Err(format!(
                    "{} of {} layers {} a media type that is not allowed, for example layer {} \
                     of type {:?} (allowed: {})",
                    bad.len(),
                    m.layers.len(),
                    if bad.len() == 1 { "has" } else { "have" },
                    first.digest,
                    first.media_type,
                    texts(allowed)
                )),
            };
            v.rule("allowedLayerMediaTypes", outcome);
        }
        v
    }

    fn check_config(&self, _reference: &Reference, _image: &Image<'_>, config: &oci::Config) -> Verdict {
        let mut v = Verdict::new();
        self.platform_rule(&mut v, "the image config", &config.platform());
        v
    }

    fn allows_url_host(&self, host: &HostPort) -> bool {
        let mut v = Verdict::new();
        self.registry_rules(&mut v, "layer URL host", &host.to_string());
        v.allows()
    }
}

/// The policy of one pull: the top-level rules and those of the scopes that apply
/// ([`Settings::policy_for`]). A scope's rules are named `scopes[<name>].<rule>` in verdicts
/// and denials.
#[derive(Debug, Clone)]
pub struct Scoped<'a> {
    settings: &'a Settings,
    scopes: Vec<&'a Scope>,
}

impl Scoped<'_> {
    /// The names of the scopes that apply.
    pub fn scope_names(&self) -> Vec<&str> {
        self.scopes.iter().map(|s| s.name.as_str()).collect()
    }

    /// The top-level verdict `check` gives, followed by each applying scope's, renamed.
    fn combine(&self, check: impl Fn(&Settings) -> Verdict) -> Verdict {
        let mut v = check(self.settings);
        for scope in &self.scopes {
            let sv = check(&scope.rules);
            let rename = |rule: &str| format!("scopes[{}].{rule}", scope.name);
            v.checked.extend(sv.checked.iter().map(|r| rename(r)));
            v.violations.extend(
                sv.violations.into_iter().map(|x| crate::policy::Violation { rule: rename(&x.rule), reason: x.reason }),
            );
        }
        v
    }
}

impl Policy for Scoped<'_> {
    fn audit(&self) -> bool {
        self.settings.audit()
    }

    fn check_reference(&self, reference: &Reference) -> Verdict {
        self.combine(|s| s.check_reference(reference))
    }

    fn check_root(&self, reference: &Reference, root: &Descriptor) -> Verdict {
        self.combine(|s| s.check_root(reference, root))
    }

    fn check_manifest(&self, reference: &Reference, image: &Image<'_>) -> Verdict {
        self.combine(|s| s.check_manifest(reference, image))
    }

    fn check_config(&self, reference: &Reference, image: &Image<'_>, config: &oci::Config) -> Verdict {
        self.combine(|s| s.check_config(reference, image, config))
    }

    fn allows_url_host(&self, host: &HostPort) -> bool {
        self.settings.allows_url_host(host) && self.scopes.iter().all(|s| s.rules.allows_url_host(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_message(doc: &str) -> String {
        match parse(doc) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("{doc}: expected invalid-argument, got {other:?}"),
        }
    }

    #[test]
    fn parse_table() {
        for doc in [
            "",
            "  \n",
            "{}",
            r#"{"discard_unpacked_layers": false}"#,
            r#"{"mode": "enforce"}"#,
            r#"{"mode": null, "maxLayers": null, "platforms": null}"#,
            r#"{"blockedRegistries": [], "deniedTags": [], "requireDigest": false}"#,
        ] {
            assert_eq!(parse(doc).unwrap(), Settings::DEFAULT, "{doc:?}");
        }
        assert!(parse(r#"{"discard_unpacked_layers": true}"#).unwrap().discard_unpacked_layers);
        let full = parse(
            r#"{
                "mode": "audit",
                "allowedRegistries": ["docker.io", "*.example.com", "127.0.0.1:5000", "[::1]"],
                "blockedRegistries": ["evil.io"],
                "allowedRepositories": ["docker.io/library/*", "quay.io/team/**", "busybox"],
                "blockedRepositories": ["docker.io/library/bad"],
                "deniedTags": ["latest", "*-dev"],
                "requireDigest": true,
                "platforms": ["linux/amd64", "linux/arm64/v8"],
                "maxImageSize": 1073741824,
                "maxLayers": 40,
                "allowedLayerMediaTypes": ["application/vnd.oci.image.layer.v1.tar+gzip"],
                "discard_unpacked_layers": true,
                "pinnedImages": ["registry.k8s.io/pause:3.10", "busybox"]
            }"#,
        )
        .unwrap();
        assert_eq!(full.mode, Mode::Audit);
        assert_eq!(full.allowed_registries.as_ref().unwrap().len(), 4);
        assert_eq!(full.allowed_repositories.as_ref().unwrap().len(), 3);
        assert_eq!(full.denied_tags, vec!["latest".to_string(), "*-dev".into()]);
        assert!(full.require_digest && full.discard_unpacked_layers);
        assert_eq!(full.platforms.as_ref().unwrap().len(), 2);
        assert_eq!(
            full.pinned_images,
            vec!["registry.k8s.io/pause:3.10".to_string(), "docker.io/library/busybox:latest".into()]
        );
        assert_eq!((full.max_image_size, full.max_layers), (Some(1 << 30), Some(40)));
        // An empty allow list is kept: it allows nothing.
        assert_eq!(parse(r#"{"allowedRegistries": []}"#).unwrap().allowed_registries, Some(vec![]));

        // (document, what the message must say: the key, and why)
        let bad: &[(&str, &[&str])] = &[
            (r#"{"pinned": ["busybox"]}"#, &["unknown setting \"pinned\"", "allowedRegistries"]),
            (r#"{"AllowedRegistries": []}"#, &["unknown setting \"AllowedRegistries\""]),
            ("[]", &["must be a JSON object"]),
            ("true", &["must be a JSON object"]),
            ("{", &["not valid JSON"]),
            (r#"{"mode": "audit", "mode": "enforce"}"#, &["\"mode\" is given twice"]),
            (r#"{"discard_unpacked_layers": "yes"}"#, &["\"discard_unpacked_layers\" must be true or false"]),
            (r#"{"mode": "warn"}"#, &["\"mode\"", "\"enforce\" or \"audit\""]),
            (r#"{"mode": 1}"#, &["\"mode\""]),
            (r#"{"allowedRegistries": "docker.io"}"#, &["\"allowedRegistries\" must be a list of strings"]),
            (r#"{"allowedRegistries": [1]}"#, &["\"allowedRegistries\"", "entry 0 is 1"]),
            (
                r#"{"allowedRegistries": ["https://docker.io"]}"#,
                &["\"allowedRegistries\" entry 0", "not a registry host pattern"],
            ),
            (r#"{"blockedRegistries": ["ok.io", "*"]}"#, &["\"blockedRegistries\" entry 1"]),
            (r#"{"blockedRegistries": ["reg*.io"]}"#, &["\"blockedRegistries\"", "leading *."]),
            (r#"{"allowedRepositories": ["team/*"]}"#, &["\"allowedRepositories\" entry 0", "registry"]),
            (r#"{"blockedRepositories": ["docker.io/Library/x*"]}"#, &["\"blockedRepositories\"", "lowercase"]),
            (r#"{"blockedRepositories": ["busybox:latest"]}"#, &["\"blockedRepositories\"", "without tag"]),
            (r#"{"deniedTags": ["a b"]}"#, &["\"deniedTags\" entry 0", "tag pattern"]),
            (r#"{"deniedTags": [""]}"#, &["\"deniedTags\""]),
            (r#"{"requireDigest": "true"}"#, &["\"requireDigest\" must be true or false"]),
            (r#"{"platforms": ["linux"]}"#, &["\"platforms\" entry 0", "os/architecture"]),
            (r#"{"platforms": "linux/amd64"}"#, &["\"platforms\" must be a list"]),
            (r#"{"maxImageSize": -1}"#, &["\"maxImageSize\" must be a whole number"]),
            (r#"{"maxImageSize": 1.5}"#, &["\"maxImageSize\""]),
            (r#"{"maxImageSize": "1G"}"#, &["\"maxImageSize\""]),
            (r#"{"maxLayers": true}"#, &["\"maxLayers\""]),
            (r#"{"allowedLayerMediaTypes": ["gzip"]}"#, &["\"allowedLayerMediaTypes\" entry 0", "type/subtype"]),
            (
                r#"{"pinnedImages": ["pause", "Team/App"]}"#,
                &["\"pinnedImages\" entry 1", "invalid reference \"Team/App\""],
            ),
            (r#"{"pinnedImages": "pause"}"#, &["\"pinnedImages\" must be a list"]),
        ];
        for (doc, wants) in bad {
            let m = invalid_message(doc);
            for want in *wants {
                assert!(m.contains(want), "{doc}: {m:?} lacks {want:?}");
            }
        }
    }

    #[test]
    fn refused_document_keeps_previous() {
        configure(r#"{"discard_unpacked_layers": true}"#).unwrap();
        assert!(configure(r#"{"nope": 1}"#).is_err());
        assert!(configure(r#"{"maxLayers": "x"}"#).is_err());
        assert!(current().discard_unpacked_layers);
        configure("").unwrap();
        assert_eq!(current(), Settings::DEFAULT);
    }
}

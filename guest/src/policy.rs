//! Pull policy: the hooks a pull calls, the verdicts they return, how a verdict is enforced,
//! and the matchers policies are written with.
//!
//! Key items:
//!
//! - [`Policy`]: four hooks, one per stage of a pull ([`Stage`]), each called as soon as what
//!   it judges is known and before anything that depends on it is fetched:
//!   [`Policy::check_reference`] before the registry is contacted,
//!   [`Policy::check_root`] once the root digest is resolved, [`Policy::check_manifest`] once
//!   the image manifest is read (sizes, layers, media types, the index entry's platform) but
//!   before config and layers are fetched, and [`Policy::check_config`] once the small config
//!   is read (its platform) but before any layer is fetched. Every hook returns a
//!   [`Verdict`]: the rules it evaluated and the ones violated.
//! - [`enforce`]: logs every verdict through the `log` import and, unless the policy is in
//!   audit mode, turns violations into `permission-denied` naming each rule and reason.
//! - [`HostPattern`], [`RepositoryPattern`], [`glob`]: matching on the parsed, normalized
//!   reference, never on string prefixes. Hosts are compared in a canonical form
//!   ([`canonical_host`]): lowercase, IPv4 literals in dotted-quad form whatever way they
//!   were written (`127.1`, `0x7f.0.0.1`, `2130706433`), IPv6 literals in RFC 5952 form,
//!   IPv4-mapped IPv6 as IPv4, ports as numbers. So `registry.io` never matches
//!   `registry.io.evil.com`, and a blocked address cannot be reached by spelling it
//!   differently.
//!
//! The default puller's policy is its settings ([`crate::settings::Settings`]); other pullers
//! implement [`Policy`] themselves and call [`crate::pull::pull_with`].

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::error::{Error, Result};
use crate::host::Host;
use crate::oci;
use crate::reference::{self, Reference};
use crate::types::{Descriptor, Level};

/// The stage of a pull at which a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before the registry is contacted: the reference alone.
    Reference,
    /// After resolving: the root digest and media type.
    Root,
    /// After reading the manifest, before fetching config and layers.
    Manifest,
    /// After reading the config, before fetching layers.
    Config,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Reference => "reference",
            Stage::Root => "resolved",
            Stage::Manifest => "manifest",
            Stage::Config => "config",
        })
    }
}

/// One broken rule: its name (a settings key for the default puller) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule, for example `blockedRegistries`.
    pub rule: String,
    /// Why the image breaks it, for people.
    pub reason: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}: {}", self.rule, self.reason)
    }
}

/// What a hook decided: the rules it evaluated, and those violated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Rules evaluated, in order.
    pub checked: Vec<String>,
    /// Rules violated.
    pub violations: Vec<Violation>,
}

impl Verdict {
    /// A verdict with nothing checked.
    pub fn new() -> Verdict {
        Verdict::default()
    }

    /// Records that `rule` was evaluated, violated when `outcome` is `Err(reason)`.
    pub fn rule(&mut self, rule: &str, outcome: std::result::Result<(), String>) -> &mut Self {
        self.checked.push(rule.to_string());
        if let Err(reason) = outcome {
            self.violations.push(Violation { rule: rule.to_string(), reason });
        }
        self
    }

    /// Whether no rule is violated.
    pub fn allows(&self) -> bool {
        self.violations.is_empty()
    }
}

/// What [`Policy::check_manifest`] and [`Policy::check_config`] see of an image.
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    /// What the reference resolved to: a manifest, or an index.
    pub root: &'a Descriptor,
    /// The index entry chosen for the platform, when the root is an index.
    pub index_entry: Option<&'a Descriptor>,
    /// The manifest's descriptor (the root itself, or the chosen entry).
    pub manifest_desc: &'a Descriptor,
    /// The manifest.
    pub manifest: &'a oci::Manifest,
}

impl Image<'_> {
    /// Compressed layers plus config, in bytes, as the manifest declares them (saturating).
    pub fn declared_size(&self) -> u64 {
        self.manifest.layers.iter().fold(self.manifest.config.size, |sum, l| sum.saturating_add(l.size))
    }
}

/// A pull policy. Every hook has a default that checks nothing; a policy overrides those it
/// needs. Hooks are pure: they judge, [`enforce`] logs and refuses.
pub trait Policy {
    /// Whether violations are only logged (`true`) or refuse the pull (`false`).
    fn audit(&self) -> bool {
        false
    }

    /// Before resolving: the normalized reference.
    fn check_reference(&self, _reference: &Reference) -> Verdict {
        Verdict::new()
    }

    /// After resolving: the root descriptor (its digest is verified by the host).
    fn check_root(&self, _reference: &Reference, _root: &Descriptor) -> Verdict {
        Verdict::new()
    }

    /// After reading the manifest, before fetching the config and layers.
    fn check_manifest(&self, _reference: &Reference, _image: &Image<'_>) -> Verdict {
        Verdict::new()
    }

    /// After reading the config, before fetching layers.
    fn check_config(&self, _reference: &Reference, _image: &Image<'_>, _config: &oci::Config) -> Verdict {
        Verdict::new()
    }

    /// Whether a non-distributable layer's alternative location on `host` (a
    /// [`canonical_host`]) may be handed to the host as a fetch hint. A refused URL is
    /// dropped from the descriptor, so the blob comes from the registry, as containerd
    /// falls back to it.
    fn allows_url_host(&self, _host: &HostPort) -> bool {
        true
    }
}

/// The policy that allows everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Policy for AllowAll {}

/// Logs `verdict` (a decision about `reference` at `stage`) and, in enforce mode, refuses
/// the pull when it has violations.
///
/// Errors: `permission-denied` saying `policy denies <reference>: rule <name>: <reason>`
/// for each violation.
pub fn enforce<H: Host + ?Sized, P: Policy + ?Sized>(
    host: &H,
    policy: &P,
    stage: Stage,
    reference: &Reference,
    verdict: Verdict,
) -> Result<()> {
    if verdict.allows() {
        if verdict.checked.is_empty() {
            host.log(Level::Debug, &format!("policy: {reference}: {stage} stage: allowed, no rule applies"));
        } else {
            host.log(
                Level::Info,
                &format!("policy: {reference}: {stage} stage: allowed by {}", verdict.checked.join(", ")),
            );
        }
        return Ok(());
    }
    let reasons = verdict.violations.iter().map(Violation::to_string).collect::<Vec<_>>().join("; ");
    if policy.audit() {
        host.log(
            Level::Warn,
            &format!("policy audit: {reference}: {stage} stage: would deny: {reasons}; pulling anyway"),
        );
        return Ok(());
    }
    host.log(Level::Warn, &format!("policy: {reference}: {stage} stage: denied: {reasons}"));
    host.progress("denied", &reasons);
    Err(Error::PermissionDenied(format!("policy denies {reference}: {reasons}")))
}

// ---- hosts --------------------------------------------------------------------------------

/// A registry host in canonical form, with its port when one was named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Lowercase DNS name, dotted-quad IPv4, or `[`RFC 5952 IPv6`]`.
    pub host: String,
    /// The port, when named.
    pub port: Option<u16>,
}

impl HostPort {
    /// Whether the host is an IP address literal.
    pub fn is_ip(&self) -> bool {
        self.host.starts_with('[') || self.host.parse::<Ipv4Addr>().is_ok()
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// The canonical form of a registry domain (`host[:port]`, as in a reference).
///
/// Errors (a message): a domain outside the reference grammar, an IPv6 literal that is not
/// an address, a port over 65535.
pub fn canonical_host(domain: &str) -> std::result::Result<HostPort, String> {
    reference::check_domain(domain)?;
    let (host, port) = if let Some(inner) = domain.strip_prefix('[') {
        let (ip, rest) = inner.split_once(']').ok_or_else(|| format!("invalid registry host {domain:?}"))?;
        let ip: Ipv6Addr = ip.parse().map_err(|_| format!("{domain:?}: {ip:?} is not an IPv6 address"))?;
        let host = match ip.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("[{ip}]"),
        };
        (host, rest.strip_prefix(':'))
    } else {
        let (host, port) = match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        };
        let host = host.to_ascii_lowercase();
        let host = match inet_aton(&host) {
            Some(v4) => v4.to_string(),
            None => host,
        };
        (host, port)
    };
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| format!("{domain:?}: port {p} is not a port number"))?),
    };
    Ok(HostPort { host, port })
}

/// An IPv4 address written as `inet_aton(3)` (and so the system resolver) reads it: one to
/// four parts, each decimal, octal (leading `0`) or hexadecimal (`0x`), the last filling the
/// remaining bytes. `None` when `s` is not such an address (a DNS name).
pub fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (*part, 10)
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let value = if digits.is_empty() {
            0 // "0x" alone is 0 for inet_aton
        } else {
            u64::from_str_radix(digits, radix).ok()?
        };
        values.push(value);
    }
    let (last, init) = values.split_last()?;
    let mut addr: u64 = 0;
    for (i, v) in init.iter().enumerate() {
        if *v > 0xff {
            return None;
        }
        addr |= v << (24 - 8 * i);
    }
    let last_bits = 32 - 8 * init.len() as u32;
    if *last >= (1u64 << last_bits) {
        return None;
    }
    addr |= last;
    Some(Ipv4Addr::from(addr as u32))
}

/// A registry host pattern: `host[:port]` (exact) or `*.domain[:port]` (any subdomain, at
/// any depth, not the domain itself). Without a port it matches every port of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// As written, for messages.
    pub text: String,
    kind: HostKind,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostKind {
    Exact(String),
    /// The suffix, with its leading dot.
    Subdomains(String),
}

impl HostPattern {
    /// Parses a pattern.
    ///
    /// Errors (a message): anything but a host (a URL, a path, a bare `*`, `*` elsewhere than
    /// a leading `*.`).
    pub fn parse(text: &str) -> std::result::Result<HostPattern, String> {
        let bad = |why: &str| {
            format!("{text:?} is not a registry host pattern ({why}; write host[:port] or *.domain[:port])")
        };
        if text.contains('/') {
            return Err(bad("no scheme or path"));
        }
        if let Some(rest) = text.strip_prefix("*.") {
            if rest.contains('*') {
                return Err(bad("only one leading *. wildcard"));
            }
            let hp = canonical_host(rest).map_err(|e| bad(&e))?;
            if hp.is_ip() {
                return Err(bad("wildcards are for DNS names, not IP addresses"));
            }
            return Ok(HostPattern {
                text: text.to_string(),
                kind: HostKind::Subdomains(format!(".{}", hp.host)),
                port: hp.port,
            });
        }
        if text.contains('*') {
            return Err(bad("a wildcard must be a leading *."));
        }
        let hp = canonical_host(text).map_err(|e| bad(&e))?;
        Ok(HostPattern { text: text.to_string(), kind: HostKind::Exact(hp.host), port: hp.port })
    }

    /// Whether the pattern matches `host`.
    pub fn matches(&self, host: &HostPort) -> bool {
        if self.port.is_some() && self.port != host.port {
            return false;
        }
        match &self.kind {
            HostKind::Exact(h) => *h == host.host,
            HostKind::Subdomains(suffix) => {
                !host.is_ip() && host.host.len() > suffix.len() && host.host.ends_with(suffix)
            }
        }
    }
}

// ---- repositories -------------------------------------------------------------------------

/// A repository pattern: `registry/path`, matched component by component against the
/// normalized name (`docker.io/library/busybox`). `*` matches any characters within one
/// component, `**` (a whole component) any number of components, zero included. The
/// registry component is a [`HostPattern`] when it is a host or `*.domain` (so it is
/// compared canonically, and without a port matches every port); otherwise a glob over the
/// canonical `host[:port]`. A pattern without wildcards is normalized as a reference name
/// (`busybox` is `docker.io/library/busybox`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryPattern {
    /// As written, for messages.
    pub text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of components.
    Any,
    /// The registry component, as a host pattern.
    Host(HostPattern),
    /// A component glob (`*` within the component).
    Glob(String),
}

impl RepositoryPattern {
    /// Parses a pattern.
    ///
    /// Errors (a message): empty components, uppercase in the path, `**` inside a component,
    /// a glob pattern that does not start with a registry, characters outside the name
    /// grammar.
    pub fn parse(text: &str) -> std::result::Result<RepositoryPattern, String> {
        let bad = |why: &str| {
            format!(
                "{text:?} is not a repository pattern ({why}; write registry/path, with * \
                 within a component and ** across components)"
            )
        };
        if !text.contains('*') {
            // A plain name: normalized as pull references are.
            if text.contains('@') || text.rsplit('/').next().is_some_and(|c| c.contains(':')) {
                return Err(bad("a repository, without tag or digest"));
            }
            let r = Reference::parse(text).map_err(|e| bad(e.message()))?;
            let hp = canonical_host(r.domain()).map_err(|e| bad(&e))?;
            let host = HostPattern { text: r.domain().to_string(), kind: HostKind::Exact(hp.host), port: hp.port };
            let mut segments = vec![Segment::Host(host)];
            segments.extend(r.path().split('/').map(|c| Segment::Glob(c.to_string())));
            return Ok(RepositoryPattern { text: text.to_string(), segments });
        }
        let parts: Vec<&str> = text.split('/').collect();
        if parts.len() < 2 && text != "**" {
            return Err(bad("a registry and a path"));
        }
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            if part.is_empty() {
                return Err(bad("empty component"));
            }
            if *part == "**" {
                segments.push(Segment::Any);
            } else if part.contains("**") {
                return Err(bad("** must be a whole component"));
            } else if i == 0 {
                segments.push(registry_segment(part).map_err(|e| bad(&e))?);
            } else if part.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(bad("repository paths are lowercase"));
            } else if !part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'*'))
            {
                return Err(bad("invalid path component"));
            } else {
                segments.push(Segment::Glob(part.to_string()));
            }
        }
        Ok(RepositoryPattern { text: text.to_string(), segments })
    }

    /// Whether the pattern matches the repository `reference` names.
    pub fn matches(&self, reference: &Reference) -> bool {
        let Ok(host) = canonical_host(reference.domain()) else {
            return false;
        };
        let mut name: Vec<Component<'_>> = vec![Component::Registry(&host)];
        name.extend(reference.path().split('/').map(Component::Path));
        match_segments(&self.segments, &name)
    }
}

enum Component<'a> {
    Registry(&'a HostPort),
    Path(&'a str),
}

fn match_segments(pattern: &[Segment], name: &[Component<'_>]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((Segment::Any, rest)) => (0..=name.len()).any(|skip| match_segments(rest, &name[skip..])),
        Some((segment, rest)) => {
            let Some((first, name_rest)) = name.split_first() else {
                return false;
            };
            let ok = match (segment, first) {
                (Segment::Host(p), Component::Registry(h)) => p.matches(h),
                (Segment::Host(_), Component::Path(_)) => false,
                (Segment::Glob(g), Component::Registry(h)) => glob(g, &h.to_string()),
                (Segment::Glob(g), Component::Path(p)) => glob(g, p),
                (Segment::Any, _) => unreachable!("handled above"),
            };
            ok && match_segments(rest, name_rest)
        }
    }
}

/// The first component of a repository pattern: `*`, a [`HostPattern`], or a glob over the
/// canonical `host[:port]`. It must look like a registry (a `.`, a `:`, `[`, `localhost`,
/// or a wildcard): `team/*` names no registry and would never match.
fn registry_segment(part: &str) -> std::result::Result<Segment, String> {
    if part == "*" {
        return Ok(Segment::Glob("*".into()));
    }
    let wildcard_host = part.starts_with("*.") && !part[2..].contains('*');
    if !part.contains('*') || wildcard_host {
        if !wildcard_host && !part.contains(['.', ':', '[']) && part != "localhost" {
            return Err(format!("{part:?} is not a registry host"));
        }
        return HostPattern::parse(part).map(Segment::Host);
    }
    if !part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'*' | b'[' | b']')) {
        return Err(format!("{part:?} is not a registry host"));
    }
    Ok(Segment::Glob(part.to_ascii_lowercase()))
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (none
/// included) and everything else is literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> HostPort {
        canonical_host(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn canonical_hosts() {
        let cases: &[(&str, &str, Option<u16>)] = &[
            ("docker.io", "docker.io", None),
            ("Registry.Example.COM", "registry.example.com", None),
            ("registry.io:5000", "registry.io", Some(5000)),
            ("registry.io:05000", "registry.io", Some(5000)),
            ("127.0.0.1:5000", "127.0.0.1", Some(5000)),
            ("127.1", "127.0.0.1", None),
            ("0177.0.0.1", "127.0.0.1", None),
            ("0x7f.0.0.1", "127.0.0.1", None),
            ("2130706433", "127.0.0.1", None),
            ("127.0.1", "127.0.0.1", None),
            ("[::1]:5000", "[::1]", Some(5000)),
            ("[0:0:0:0:0:0:0:1]", "[::1]", None),
            ("[FC00:0::1]", "[fc00::1]", None),
            ("[::ffff:7f00:1]:5000", "127.0.0.1", Some(5000)),
            ("localhost", "localhost", None),
            ("1.2.3.4.5", "1.2.3.4.5", None),
            ("999.1.1.1", "999.1.1.1", None),
        ];
        for (input, host, port) in cases {
            let got = hp(input);
            assert_eq!((got.host.as_str(), got.port), (*host, *port), "{input}");
        }
        for bad in ["[zz::1]", "[1]", "reg.io:99999", "a..b", "", "http://x"] {
            assert!(canonical_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_patterns() {
        // (pattern, host, matches)
        let cases: &[(&str, &str, bool)] = &[
            ("registry.io", "registry.io", true),
            ("registry.io", "REGISTRY.io", true),
            ("registry.io", "registry.io:5000", true),
            ("registry.io:5000", "registry.io:5000", true),
            ("registry.io:5000", "registry.io:05000", true),
            ("registry.io:5000", "registry.io", false),
            ("registry.io:5000", "registry.io:50001", false),
            ("registry.io:5", "registry.io:5000", false),
            // Never a string prefix or suffix.
            ("registry.io", "registry.io.evil.com", false),
            ("registry.io", "evilregistry.io", false),
            ("registry.io", "registry.iox", false),
            ("registry.io", "sub.registry.io", false),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "A.Example.Com:443", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "evilexample.com", false),
            ("*.example.com", "example.com.evil.io", false),
            ("*.example.com:5000", "a.example.com:5000", true),
            ("*.example.com:5000", "a.example.com", false),
            ("127.0.0.1", "127.0.0.1:5000", true),
            ("127.0.0.1", "127.1:5000", true),
            ("127.0.0.1", "0x7f000001", true),
            ("127.0.0.1", "[::ffff:7f00:1]", true),
            ("127.0.0.1", "127.0.0.10", false),
            ("127.0.0.1", "127.0.0.1.nip.io", false),
            ("[::1]", "[0::1]:5000", true),
            ("[::1]", "[::2]", false),
            ("*.0.0.1", "127.0.0.1", false),
        ];
        for (pattern, host, want) in cases {
            let p = match HostPattern::parse(pattern) {
                Ok(p) => p,
                Err(e) if pattern.starts_with("*.0") => {
                    assert!(e.contains("not IP"), "{e}");
                    continue;
                }
                Err(e) => panic!("{pattern}: {e}"),
            };
            assert_eq!(p.matches(&hp(host)), *want, "{pattern} vs {host}");
        }
        for bad in [
            "",
            "*",
            "*.",
            "https://registry.io",
            "registry.io/x",
            "reg*.io",
            "*.*.io",
            "a..b",
            "registry.io:",
            "registry.io:http",
            "*.1.2.3.4",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn repository_patterns() {
        // (pattern, reference, matches)
        let cases: &[(&str, &str, bool)] = &[
            ("docker.io/library/busybox", "busybox", true),
            ("docker.io/library/busybox", "busybox:1.36", true),
            ("busybox", "docker.io/library/busybox", true),
            ("docker.io/busybox", "busybox", true),
            ("docker.io/library/busybox", "busybox/evil", false),
            ("docker.io/library/busybox", "docker.io/library/busybox2", false),
            ("docker.io/library/*", "busybox", true),
            ("docker.io/library/*", "library/a/b", false),
            ("docker.io/library/**", "library/a/b", true),
            ("docker.io/**", "user/repo", true),
            ("docker.io/**", "quay.io/user/repo", false),
            ("quay.io/team/*", "quay.io/team/app", true),
            ("quay.io/team/*", "quay.io/teamevil/app", false),
            ("quay.io/team/*", "quay.io/team", false),
            ("quay.io/team/**", "quay.io/team/a/b/c", true),
            ("quay.io/team/ap*", "quay.io/team/app", true),
            ("quay.io/team/ap*", "quay.io/team/bpp", false),
            ("quay.io/team/*-dev", "quay.io/team/app-dev", true),
            ("quay.io/team/*-dev", "quay.io/team/app-prod", false),
            // The registry component is a host, never a prefix.
            ("registry.io/**", "registry.io.evil.com/a", false),
            ("registry.io/**", "registry.io:5000/a", true),
            ("registry.io:5000/**", "registry.io:5001/a", false),
            ("Registry.IO/**", "registry.io/a", true),
            ("registry.io/**", "REGISTRY.io/a", true),
            ("127.0.0.1/**", "127.1:5000/a", true),
            ("*.example.com/**", "a.example.com/x/y", true),
            ("*.example.com/**", "example.com/x", false),
            ("*/team/app", "quay.io/team/app", true),
            ("*/team/app", "quay.io/other/app", false),
            ("**/app", "quay.io/team/app", true),
            ("**/app", "docker.io/library/app", true),
            ("**/app", "quay.io/team/apps", false),
            ("127.0.0.1:*/team/*", "127.0.0.1:5000/team/app", true),
            ("127.0.0.1:*/team/*", "127.0.0.10:5000/team/app", false),
            ("**", "anything.io/a/b", true),
        ];
        for (pattern, reference, want) in cases {
            let p = RepositoryPattern::parse(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert_eq!(p.matches(&r(reference)), *want, "{pattern} vs {reference}");
        }
        for bad in [
            "",
            "team/*",
            "busybox/*",
            "docker.io//x",
            "docker.io/Library/*",
            "docker.io/a**/b",
            "docker.io/a$/*",
            "busybox:latest",
            "busybox@sha256:7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa",
            "https://docker.io/*",
            "*",
        ] {
            assert!(RepositoryPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("*", "", true),
            ("*", "abc", true),
            ("a*", "abc", true),
            ("a*c", "abc", true),
            ("a*c", "abd", false),
            ("*b*", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("latest", "latest", true),
            ("latest", "Latest", false),
            ("v1.*", "v1.2", true),
            ("v1.*", "v10", false),
        ] {
            assert_eq!(glob(p, t), want, "{p} vs {t}");
        }
    }

    #[test]
    fn inet_aton_forms() {
        for (s, want) in [
            ("1.2.3.4", Some("1.2.3.4")),
            ("1", Some("0.0.0.1")),
            ("1.2", Some("1.0.0.2")),
            ("1.2.3", Some("1.2.0.3")),
            ("0x1.0X2.03.4", Some("1.2.3.4")),
            ("0x", Some("0.0.0.0")),
            ("256.1.1.1", None),
            ("1.2.3.4.5", None),
            ("08.1.1.1", None),
            ("4294967296", None),
            ("example", None),
            ("", None),
        ] {
            assert_eq!(inet_aton(s).map(|a| a.to_string()).as_deref(), want, "{s}");
        }
    }
}

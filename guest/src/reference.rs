//! Image reference normalization, in the Docker grammar that containerd's CRI uses.
//!
//! [`Reference::parse`] does what `ParseNormalizedNamed` + `TagNameOnly` do in containerd's
//! `reference/docker` (the distribution reference grammar): `busybox` becomes
//! `docker.io/library/busybox:latest`, `user/repo` becomes `docker.io/user/repo:latest`, the
//! first path component is a registry host only when it contains `.` or `:`, is
//! `localhost`, or has an uppercase letter (`Foo/bar` is repository `bar` on host `Foo`,
//! since repository paths are lowercase), and `index.docker.io` is spelled `docker.io`. The
//! grammar:
//!
//! ```text
//! reference      := name [ ":" tag ] [ "@" digest ]
//! name           := [domain "/"] path-component ("/" path-component)*
//! domain         := host [":" port]
//! host           := domain-name | "[" ipv6-address "]"
//! domain-name    := component ("." component)*   component := [a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?
//! port           := [0-9]+
//! path-component := [a-z0-9]+ (([._] | "__" | "-"+) [a-z0-9]+)*
//! tag            := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! ```
//!
//! Bracketed IPv6 hosts (`[::1]:5000/app`) are accepted as in the current grammar, which
//! allows hex digits and colons between the brackets; pullbox also requires them to be an
//! address (`[1]` is refused), so that policy can compare hosts canonically. Zones
//! (`%eth0`) and embedded dotted IPv4 are refused, as in the grammar.
//! Digests are `sha256` or `sha512` with lowercase hex ([`crate::digest::parse`]). The
//! normalized name (domain + `/` + path) is at most [`NAME_TOTAL_LENGTH_MAX`] = 255
//! characters, Docker's limit. A reference with both a tag and a digest resolves by digest;
//! see [`Reference::repo_tag`] for what is recorded.

use std::fmt;

use crate::digest;
use crate::error::{Error, Result};

/// Registry host of names without one.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// The old spelling of [`DEFAULT_DOMAIN`], rewritten to it.
pub const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
/// Repository namespace of single-component names on [`DEFAULT_DOMAIN`].
pub const OFFICIAL_NAMESPACE: &str = "library";
/// Tag of references with neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest normalized repository name, as Docker's `NameTotalLengthMax`.
pub const NAME_TOTAL_LENGTH_MAX: usize = 255;
/// Longest tag (Docker's grammar: one character plus up to 127).
pub const TAG_LENGTH_MAX: usize = 128;

/// Whether a reference with both tag and digest also records a repo tag.
///
/// containerd's CRI (`PullImage` → `ParseDockerRef`, every release through 2.x) drops the tag
/// of `name:tag@digest` and records only the repo digest, and pullbox answers as containerd's
/// CRI does. Flip this to record `name:tag` as well.
pub const RECORD_TAG_WITH_DIGEST: bool = false;

/// A normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parses and normalizes a reference.
    ///
    /// Errors: `invalid-argument` naming the reference and what is wrong with it.
    pub fn parse(s: &str) -> Result<Reference> {
        parse(s).map_err(|why| Error::InvalidArgument(format!("invalid reference {s:?}: {why}")))
    }

    /// The registry host, with its port (`docker.io`, `127.0.0.1:5000`, `[::1]:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path inside the registry (`library/busybox`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The normalized repository name: `domain/path`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The tag: as written, or [`DEFAULT_TAG`] when neither tag nor digest was given.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, when one was given.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What to ask the registry for: the digest when there is one, else the tag.
    pub fn resolve_target(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or(DEFAULT_TAG)
    }

    /// The repo tag to record (`name:tag`); `None` for a digest reference, and for a
    /// tag+digest reference unless [`RECORD_TAG_WITH_DIGEST`].
    pub fn repo_tag(&self) -> Option<String> {
        let tag = self.tag.as_deref()?;
        if self.digest.is_some() && !RECORD_TAG_WITH_DIGEST {
            return None;
        }
        Some(format!("{}:{tag}", self.name()))
    }

    /// The repo digest to record for root digest `digest`: `name@digest`.
    pub fn repo_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }

    /// The image record this reference names: `name@digest` when it has a digest, else
    /// `name:tag` (containerd's `ParseDockerRef` form).
    pub fn record_name(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => self.repo_digest(d),
            (None, Some(t)) => format!("{}:{t}", self.name()),
            (None, None) => format!("{}:{DEFAULT_TAG}", self.name()),
        }
    }
}

impl fmt::Display for Reference {
    /// The full normalized form, tag and digest both when both were given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn parse(s: &str) -> std::result::Result<Reference, String> {
    if s.is_empty() {
        return Err("empty reference".into());
    }
    if s.len() == 64 && digest::is_lower_hex(s) {
        return Err("cannot specify 64-byte hexadecimal strings as a name".into());
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, d)) => {
            digest::parse(d).map_err(|e| e.message().to_string())?;
            (rest, Some(d.to_string()))
        }
        None => (s, None),
    };
    // The tag is after the first ':' of the last path component (a ':' before the last '/'
    // belongs to the registry's port).
    let last_component = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_component..].find(':') {
        Some(i) => {
            let at = last_component + i;
            (&rest[..at], Some(&rest[at + 1..]))
        }
        None => (rest, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }
    if name.is_empty() {
        return Err("missing repository name".into());
    }
    let (domain, remainder) = match name.find('/') {
        Some(i) => {
            let first = &name[..i];
            if first.contains(['.', ':']) || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase()) {
                (first, &name[i + 1..])
            } else {
                (DEFAULT_DOMAIN, name)
            }
        }
        None => (DEFAULT_DOMAIN, name),
    };
    let domain = if domain == LEGACY_DEFAULT_DOMAIN { DEFAULT_DOMAIN } else { domain };
    check_domain(domain)?;
    let path = if domain == DEFAULT_DOMAIN && !remainder.contains('/') {
        format!("{OFFICIAL_NAMESPACE}/{remainder}")
    } else {
        remainder.to_string()
    };
    check_path(&path)?;
    let total = domain.len() + 1 + path.len();
    if total > NAME_TOTAL_LENGTH_MAX {
        return Err(format!(
            "repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters (it has {total})"
        ));
    }
    let tag = match (tag, &digest) {
        (Some(t), _) => Some(t.to_string()),
        (None, None) => Some(DEFAULT_TAG.to_string()),
        (None, Some(_)) => None,
    };
    Ok(Reference { domain: domain.to_string(), path, tag, digest })
}

fn check_tag(tag: &str) -> std::result::Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    if bytes.is_empty() {
        return Err("empty tag".into());
    }
    if bytes.len() > TAG_LENGTH_MAX {
        return Err(format!("tag longer than {TAG_LENGTH_MAX} characters"));
    }
    if !word(bytes[0]) || !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return Err(format!("invalid tag {tag:?} (letters, digits, '_', '.', '-'; not starting with '.' or '-')"));
    }
    Ok(())
}

/// Checks that `domain` is a registry host with an optional port, in the grammar above.
///
/// Errors: a message naming `domain`.
pub fn check_domain(domain: &str) -> std::result::Result<(), String> {
    let bad = || Err(format!("invalid registry host {domain:?}"));
    let (host, port) = if let Some(inner) = domain.strip_prefix('[') {
        let Some(end) = inner.find(']') else {
            return bad();
        };
        let ip = &inner[..end];
        if ip.is_empty() || !ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return bad();
        }
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("invalid registry host {domain:?}: {ip:?} is not an IPv6 address"));
        }
        (None, &inner[end + 1..])
    } else {
        match domain.find(':') {
            Some(i) => (Some(&domain[..i]), &domain[i..]),
            None => (Some(domain), ""),
        }
    };
    if let Some(host) = host {
        let component_ok = |c: &str| {
            let b = c.as_bytes();
            !b.is_empty()
                && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        };
        if !host.split('.').all(component_ok) {
            return bad();
        }
    }
    if !port.is_empty() {
        let digits = port.strip_prefix(':').unwrap_or("");
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return bad();
        }
    }
    Ok(())
}

fn check_path(path: &str) -> std::result::Result<(), String> {
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("repository name must be lowercase ({path:?})"));
    }
    for component in path.split('/') {
        if component.is_empty() {
            return Err(format!("empty path component in repository name {path:?}"));
        }
        if !path_component_ok(component) {
            return Err(format!(
                "invalid path component {component:?} (lowercase letters and digits, \
                 separated by '.', '_', '__' or dashes)"
            ));
        }
    }
    Ok(())
}

fn path_component_ok(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false; // a separator at the start, the end, or two separator runs
        }
        if i == b.len() {
            return true;
        }
        let sep_start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &c[sep_start..i];
        let sep_ok = matches!(sep, "." | "_" | "__") || (!sep.is_empty() && sep.bytes().all(|x| x == b'-'));
        if !sep_ok {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa";

    /// (input, name, tag, digest)
    fn ok_cases() -> Vec<(String, &'static str, Option<&'static str>, Option<&'static str>)> {
        let mut v = vec![
            ("busybox".to_string(), "docker.io/library/busybox", Some("latest"), None),
            ("busybox:1.36".into(), "docker.io/library/busybox", Some("1.36"), None),
            ("library/busybox".into(), "docker.io/library/busybox", Some("latest"), None),
            ("docker.io/busybox".into(), "docker.io/library/busybox", Some("latest"), None),
            ("index.docker.io/busybox".into(), "docker.io/library/busybox", Some("latest"), None),
            ("user/repo".into(), "docker.io/user/repo", Some("latest"), None),
            ("user/repo:v1".into(), "docker.io/user/repo", Some("v1"), None),
            ("a/b/c/d".into(), "docker.io/a/b/c/d", Some("latest"), None),
            ("quay.io/coreos/etcd".into(), "quay.io/coreos/etcd", Some("latest"), None),
            ("gcr.io/pause:3.9".into(), "gcr.io/pause", Some("3.9"), None),
            ("localhost/app".into(), "localhost/app", Some("latest"), None),
            ("localhost:5000/app:1.0".into(), "localhost:5000/app", Some("1.0"), None),
            ("127.0.0.1:5000/team/app:1.0".into(), "127.0.0.1:5000/team/app", Some("1.0"), None),
            ("[::1]:5000/app:v2".into(), "[::1]:5000/app", Some("v2"), None),
            ("[fe80::1]/app".into(), "[fe80::1]/app", Some("latest"), None),
            ("Registry.Example.COM/app".into(), "Registry.Example.COM/app", Some("latest"), None),
            ("my-reg.io:443/a.b/c_d/e__f/g--h".into(), "my-reg.io:443/a.b/c_d/e__f/g--h", Some("latest"), None),
            ("busybox:Tag_with.dots-1".into(), "docker.io/library/busybox", Some("Tag_with.dots-1"), None),
            ("localhost:5000".into(), "docker.io/library/localhost", Some("5000"), None),
            (format!("busybox@{D}"), "docker.io/library/busybox", None, Some(D)),
            (format!("busybox:1.36@{D}"), "docker.io/library/busybox", Some("1.36"), Some(D)),
            (format!("127.0.0.1:5000/app@{D}"), "127.0.0.1:5000/app", None, Some(D)),
        ];
        // From containerd's reference/docker tests (TestValidateReferenceName,
        // TestValidateRemoteName, TestParseRepositoryInfo, TestNormalizedSplitHostname).
        let hex64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a";
        let song = "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev";
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        for (input, name, tag) in [
            ("docker/docker", "docker.io/docker/docker", "latest"),
            ("library/debian", "docker.io/library/debian", "latest"),
            ("index.docker.io/docker/docker", "docker.io/docker/docker", "latest"),
            ("index.docker.io/debian", "docker.io/library/debian", "latest"),
            ("127.0.0.1:5000/docker/docker", "127.0.0.1:5000/docker/docker", "latest"),
            ("127.0.0.1:5000/debian", "127.0.0.1:5000/debian", "latest"),
            ("192.168.0.1", "docker.io/library/192.168.0.1", "latest"),
            ("192.168.0.1:80", "docker.io/library/192.168.0.1", "80"),
            ("192.168.0.1:8/debian", "192.168.0.1:8/debian", "latest"),
            ("[fc00::1]:5000/docker", "[fc00::1]:5000/docker", "latest"),
            ("[fc00::1]:5000/docker/docker", "[fc00::1]:5000/docker/docker", "latest"),
            ("[fc00:1:2:3:4:5:6:7]:5000/library/debian", "[fc00:1:2:3:4:5:6:7]:5000/library/debian", "latest"),
            ("Docker/docker", "Docker/docker", "latest"),
            ("DOCKER/docker", "DOCKER/docker", "latest"),
            ("Foo/bar:Tag", "Foo/bar", "Tag"),
            ("docker-rules/docker", "docker.io/docker-rules/docker", "latest"),
            ("docker---rules/docker", "docker.io/docker---rules/docker", "latest"),
            ("d/docker", "docker.io/d/docker", "latest"),
            ("jess/t", "docker.io/jess/t", "latest"),
            ("dock__er/docker", "docker.io/dock__er/docker", "latest"),
            ("test_com/foo", "docker.io/test_com/foo", "latest"),
            ("test-com:8080/foo", "test-com:8080/foo", "latest"),
            ("xn--n3h.com:18080/foo", "xn--n3h.com:18080/foo", "latest"),
            ("docker.io/library/foo/bar", "docker.io/library/foo/bar", "latest"),
            ("store/foo/bar", "docker.io/store/foo/bar", "latest"),
            ("localhost/app:v1", "localhost/app", "v1"),
        ] {
            v.push((input.to_string(), name, Some(tag), None));
        }
        v.push((song.to_string(), leak(format!("docker.io/library/{song}")), Some("latest"), None));
        v.push((format!("docker.io/{hex64}"), leak(format!("docker.io/library/{hex64}")), Some("latest"), None));
        // 63 hex digits are a name, not an ID.
        v.push((hex64[..63].to_string(), leak(format!("docker.io/library/{}", &hex64[..63])), Some("latest"), None));
        v.push((format!("[::1]:5000/app:v2@{D}"), "[::1]:5000/app", Some("v2"), Some(D)));
        let sha512 = Box::leak(format!("sha512:{}", "0".repeat(128)).into_boxed_str());
        v.push((format!("quay.io/a/b:c@{sha512}"), "quay.io/a/b", Some("c"), Some(sha512)));
        v.push((format!("app@{sha512}"), "docker.io/library/app", None, Some(sha512)));
        // The longest name allowed: "docker.io/" + 245 characters = 255.
        let long = format!("docker.io/u/{}", "a".repeat(243));
        let long_name = Box::leak(long.clone().into_boxed_str());
        v.push((long, long_name, Some("latest"), None));
        let long_tag = Box::leak(format!("a{}", "b".repeat(127)).into_boxed_str());
        v.push((format!("app:{long_tag}"), "docker.io/library/app", Some(long_tag), None));
        v
    }

    #[test]
    fn normalizes() {
        for (input, name, tag, digest) in ok_cases() {
            let r = Reference::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.name(), name, "{input}");
            assert_eq!(r.tag(), tag, "{input}");
            assert_eq!(r.digest(), digest, "{input}");
        }
    }

    /// (input, part of the message)
    fn bad_cases() -> Vec<(String, &'static str)> {
        vec![
            ("".into(), "empty reference"),
            ("Busybox".into(), "must be lowercase"),
            ("user/Repo".into(), "must be lowercase"),
            ("docker/Docker".into(), "must be lowercase"),
            ("Foo/Bar".into(), "must be lowercase"),
            ("quay.io/Coreos/etcd".into(), "must be lowercase"),
            ("docker.io/docker/Docker".into(), "must be lowercase"),
            ("https://github.com/docker/docker".into(), "invalid registry host"),
            ("-docker".into(), "invalid path component"),
            ("-docker/docker".into(), "invalid path component"),
            ("docker-/docker".into(), "invalid path component"),
            ("-docker-/docker".into(), "invalid path component"),
            ("-docker.io/docker/docker".into(), "invalid registry host"),
            ("docker///docker".into(), "empty path component"),
            ("docker.io/docker///docker".into(), "empty path component"),
            ("____/____".into(), "invalid path component"),
            ("_docker/_docker".into(), "invalid path component"),
            ("dock..er/docker".into(), "invalid registry host"),
            ("dock_.er/docker".into(), "invalid registry host"),
            ("dock-.er/docker".into(), "invalid registry host"),
            ("docker/".into(), "empty path component"),
            ("[fc00::1]".into(), "invalid tag"),
            ("[fc00::1]:5000".into(), "invalid tag"),
            ("fc00::1:5000/debian".into(), "invalid registry host"),
            ("[fe80::1%eth0]:5000/debian".into(), "invalid registry host"),
            ("[2001:db8:3:4::192.0.2.33]:5000/debian".into(), "invalid registry host"),
            ("[1]:5000/app".into(), "is not an IPv6 address"),
            ("[:::::]/app".into(), "is not an IPv6 address"),
            ("[]/app".into(), "invalid path component"),
            ("[::1]5000/app".into(), "invalid registry host"),
            ("localhost:5000/app:v1:v2".into(), "invalid tag"),
            ("app@sha256:7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa@x".into(), "invalid digest"),
            (format!("app@{D}:tag"), "invalid digest"),
            (
                format!(
                    "{}/docker",
                    ["this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255"; 4].join("_")
                ),
                "more than 255 characters",
            ),
            ("user//repo".into(), "empty path component"),
            ("user/repo/".into(), "empty path component"),
            ("/repo".into(), "empty path component"),
            ("quay.io/".into(), "empty path component"),
            ("busybox:".into(), "empty tag"),
            (":tag".into(), "missing repository name"),
            ("busybox:.bad".into(), "invalid tag"),
            ("busybox:a:b".into(), "invalid tag"),
            (format!("busybox:{}", "a".repeat(129)), "tag longer"),
            ("busybox@".into(), "invalid digest"),
            ("busybox@sha256:abc".into(), "expected 64 hex digits"),
            (format!("busybox@sha256:{}", "A".repeat(64)), "lowercase"),
            (format!("busybox@md5:{}", "a".repeat(32)), "unsupported algorithm"),
            (format!("busybox@sha512:{}", "a".repeat(64)), "expected 128 hex digits"),
            ("a..b/c".into(), "invalid registry host"),
            ("-bad.io/c".into(), "invalid registry host"),
            ("reg.io:/c".into(), "invalid registry host"),
            ("reg.io:50a/c".into(), "invalid registry host"),
            ("[zz::1]:5000/app".into(), "invalid registry host"),
            ("[::1/app".into(), "invalid registry host"),
            ("a_/b".into(), "invalid path component"),
            ("_a".into(), "invalid path component"),
            ("a___b".into(), "invalid path component"),
            ("a._b".into(), "invalid path component"),
            ("a..b".into(), "invalid path component"),
            ("bad name".into(), "invalid path component"),
            ("a/b$".into(), "invalid path component"),
            ("a".repeat(64), "64-byte hexadecimal"),
            (format!("docker.io/u/{}", "a".repeat(244)), "more than 255 characters"),
        ]
    }

    #[test]
    fn rejects() {
        for (input, want) in bad_cases() {
            match Reference::parse(&input) {
                Err(Error::InvalidArgument(m)) => {
                    assert!(m.contains(want), "{input:?}: message {m:?} lacks {want:?}");
                    assert!(m.contains(&format!("{input:?}")), "{input:?}: message {m:?} does not name it");
                }
                other => panic!("{input:?}: expected invalid-argument, got {other:?}"),
            }
        }
    }

    #[test]
    fn records_and_targets() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.resolve_target(), "latest");
        assert_eq!(r.repo_tag().as_deref(), Some("docker.io/library/busybox:latest"));
        assert_eq!(r.record_name(), "docker.io/library/busybox:latest");
        assert_eq!(r.repo_digest(D), format!("docker.io/library/busybox@{D}"));

        let r = Reference::parse(&format!("busybox:1.36@{D}")).unwrap();
        assert_eq!(r.resolve_target(), D);
        assert_eq!(r.repo_tag(), None, "containerd's CRI drops the tag of tag+digest");
        assert_eq!(r.record_name(), format!("docker.io/library/busybox@{D}"));
        assert_eq!(r.to_string(), format!("docker.io/library/busybox:1.36@{D}"));

        let r = Reference::parse(&format!("busybox@{D}")).unwrap();
        assert_eq!(r.repo_tag(), None);
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{D}"));
    }
}

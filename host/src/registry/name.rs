//! Repository names as the transport sees them: `registry[:port]/path`, already normalized by
//! the puller. The host re-validates everything it puts into a URL, because the guest is not
//! trusted to have done so.
//!
//! [`reference_registry`] is the one piece of reference parsing the host does itself: the
//! registry a request's image reference names, which the request's credentials are bound to
//! (see `auth`), so that a puller cannot send them to a registry of its choosing.

use std::{fmt, net::IpAddr};

use crate::error::{Error, Result};

/// A repository on a registry, for example `127.0.0.1:5000/team/app`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repository {
    /// Registry host as written in the name (`docker.io`, `127.0.0.1:5000`, `[::1]:5000`).
    registry: String,
    /// Repository path on the registry (`library/busybox`).
    path: String,
}

/// The longest repository name accepted (the distribution spec's limit).
const MAX_NAME: usize = 255;

/// The registry of references without one (Docker's rule).
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// The registry host an image reference names, as Docker and containerd normalize it: the
/// first path component when it looks like a host (it holds a `.` or a `:`, is `localhost`,
/// or has an uppercase letter), `docker.io` otherwise; `index.docker.io` is `docker.io`; a
/// port is kept; the host is lowercased. `busybox`, `library/busybox:1` and
/// `index.docker.io/library/busybox` are on `docker.io`; `127.0.0.1:5000/team/app@sha256:…`
/// is on `127.0.0.1:5000`.
///
/// Only the registry is parsed: whether the rest is a valid reference is the puller's call,
/// and a request the puller reads differently gets no credentials anywhere else.
pub fn reference_registry(reference: &str) -> String {
    let name = reference.trim().split('@').next().unwrap_or_default();
    let Some((first, _)) = name.split_once('/') else { return DEFAULT_REGISTRY.to_owned() };
    let is_host = first.contains(['.', ':']) || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase());
    if !is_host {
        return DEFAULT_REGISTRY.to_owned();
    }
    let host = first.to_ascii_lowercase();
    if host == "index.docker.io" {
        DEFAULT_REGISTRY.to_owned()
    } else {
        host
    }
}

impl Repository {
    /// Parses and validates `registry/path`.
    pub fn parse(name: &str) -> Result<Repository> {
        let bad = |why: &str| Error::InvalidArgument(format!("invalid repository name {name:?}: {why}"));
        let (registry, path) = name.split_once('/').ok_or_else(|| bad("no registry host"))?;
        if registry.is_empty() || !registry.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) {
            return Err(bad("invalid registry host"));
        }
        if path.is_empty() || path.len() > MAX_NAME {
            return Err(bad("repository path must have 1 to 255 characters"));
        }
        for component in path.split('/') {
            let ok = !component.is_empty()
                && component.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && component.as_bytes()[0].is_ascii_alphanumeric()
                && component.as_bytes()[component.len() - 1].is_ascii_alphanumeric();
            if !ok {
                return Err(bad("path components are lowercase letters, digits and separators"));
            }
        }
        Ok(Repository { registry: registry.to_owned(), path: path.to_owned() })
    }

    /// The registry host as written in the name.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the registry is on this machine: such registries are spoken to in plain HTTP
    /// unless configured otherwise.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.registry)
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.path)
    }
}

/// Whether `registry` (`host[:port]`) is on loopback: `localhost`, `127.0.0.0/8`, `[::1]`.
pub fn is_loopback_host(registry: &str) -> bool {
    let host = host_of(registry);
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host part of `host[:port]`, without IPv6 brackets.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    registry.split(':').next().unwrap_or_default()
}

/// Whether `tag` is a valid tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries() {
        for (name, loopback) in [
            ("127.0.0.1:5000/team/app", true),
            ("127.1.2.3/a", true),
            ("localhost:5000/a", true),
            ("[::1]:5000/a", true),
            ("registry.io/a", false),
            ("localhost.evil.com/a", false),
            ("docker.io/library/busybox", false),
        ] {
            assert_eq!(Repository::parse(name).unwrap().is_loopback(), loopback, "{name}");
        }
    }

    #[test]
    fn registries_of_references() {
        for (reference, registry) in [
            ("busybox", "docker.io"),
            ("busybox:1.36", "docker.io"),
            ("library/busybox", "docker.io"),
            ("team/app:1.0", "docker.io"),
            ("docker.io/library/busybox", "docker.io"),
            ("index.docker.io/library/busybox", "docker.io"),
            ("Index.Docker.IO/library/busybox", "docker.io"),
            ("registry-1.docker.io/library/busybox", "registry-1.docker.io"),
            ("quay.io/team/app", "quay.io"),
            ("127.0.0.1:5000/team/app:1.0", "127.0.0.1:5000"),
            ("127.0.0.1:5000/team/app@sha256:abcd", "127.0.0.1:5000"),
            ("localhost/app", "localhost"),
            ("localhost:5000/app", "localhost:5000"),
            ("[::1]:5000/app", "[::1]:5000"),
            ("Registry/app", "registry"),
            ("busybox@sha256:abcd", "docker.io"),
            ("sha256:abcd", "docker.io"),
            // Whatever comes after the first `/` is path, even when it looks like a host.
            ("team/evil.io/app", "docker.io"),
        ] {
            assert_eq!(reference_registry(reference), registry, "{reference}");
        }
    }

    #[test]
    fn names_are_validated() {
        for bad in ["busybox", "reg.io/", "reg.io/UPPER", "reg.io/a//b", "reg.io/a/../b", "reg io/a", "reg.io/-a"] {
            assert!(Repository::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(valid_tag("1.0-rc_1"));
        assert!(!valid_tag("../x") && !valid_tag("") && !valid_tag(".x"));
    }
}

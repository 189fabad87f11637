//! Registry host configuration in containerd's `hosts.toml` format, so one directory (by
//! default `/etc/containerd/certs.d`) configures containerd and pullbox alike.
//!
//! Key items: [`hosts_for`] (the hosts to try for a registry, in order, the upstream last)
//! and [`Host`].
//!
//! For registry `R` the directory of the first existing of `DIR/R'` (`host_port_` for
//! `host:port`), `DIR/R` and `DIR/_default` is read, as containerd does:
//!
//! ```toml
//! server = "https://registry.example.com"      # the upstream; default: R itself
//! ca = "ca.pem"                                # top-level fields configure the upstream
//!
//! [host."https://mirror.local:5000"]           # tried first, in file order
//!   capabilities = ["pull", "resolve"]         # default: pull, resolve, push
//!   ca = ["/etc/certs/ca.pem"]                 # string or list; relative to the directory
//!   client = [["client.cert", "client.key"]]   # "both.pem", ["a.pem"], or [[cert, key]]
//!   skip_verify = false
//!   header = { X-Custom = "v", X-Multi = ["a", "b"] }
//!   override_path = false                      # true: the URL path is the API root
//! ```
//!
//! A host's `header`s go to that host only: not to a host it redirects to, nor to the other
//! hosts of the file. Credentials of a request go to the upstream, not to mirrors (see
//! `auth`); a mirror that needs authentication gets it through its own `header`
//! (`Authorization`).
//!
//! A directory without `hosts.toml` is read the Docker way: `*.crt` are CA bundles,
//! `*.cert` with the `*.key` of the same name are client pairs, for the upstream.
//!
//! Unlike containerd, a `hosts.toml` that cannot be parsed fails the pull instead of being
//! ignored with a log line: a mirror or CA that is silently dropped is worse than an error.
//!
//! Without configuration the upstream is `https://R/v2` (`https://registry-1.docker.io/v2`
//! for `docker.io`), or `http://R/v2` when `R` is on loopback (`localhost`, `127.0.0.0/8`,
//! `[::1]`), as containerd and Docker allow. Plain HTTP is otherwise only used where a
//! `server` or `host` URL says `http://`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use reqwest::header::{HeaderName, HeaderValue};

use crate::error::{Error, Result};

use super::name::is_loopback_host;

/// The name of the fallback host directory.
pub const DEFAULT_DIR: &str = "_default";

/// What a host may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch manifests and blobs by digest.
    pub pull: bool,
    /// Resolve tags (and digests) to manifests.
    pub resolve: bool,
    /// Push (pullbox never pushes; kept for fidelity).
    pub push: bool,
}

impl Capabilities {
    const ALL: Capabilities = Capabilities { pull: true, resolve: true, push: true };
}

/// TLS settings of a host: files, read when the host's HTTP client is built.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsFiles {
    /// CA bundles trusted in addition to the system's roots.
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files; a missing key means "in the certificate's file".
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Skip verification of the server's certificate (only where configured).
    pub skip_verify: bool,
}

/// One host to try for a registry.
#[derive(Debug, Clone)]
pub struct Host {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub authority: String,
    /// The API root path, `/v2` unless `override_path` says otherwise; no trailing slash.
    pub path: String,
    pub capabilities: Capabilities,
    pub tls: TlsFiles,
    /// Extra headers for every request to this host (never for a host it redirects to).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether this host is a mirror (a `[host."…"]` entry) rather than the registry's
    /// upstream (the last host: `server`, or the registry itself). Credentials given for the
    /// registry are not sent to mirrors (see `auth`).
    pub mirror: bool,
}

impl Host {
    /// `scheme://host[:port]`.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// Whether requests go in plain HTTP.
    pub fn plain_http(&self) -> bool {
        self.scheme == "http"
    }

    /// The URL of `tail` (`manifests/…`, `blobs/…`) of `repository` on this host. For a
    /// host other than the registry itself (a mirror), the registry is named in the `ns`
    /// query parameter, as containerd does, so mirrors that serve several registries know
    /// which one is meant.
    pub fn url(&self, registry: &str, repository: &str, tail: &str) -> String {
        let mut url = format!("{}{}/{repository}/{tail}", self.origin(), self.path);
        if is_mirror(&self.authority, registry) {
            url.push_str("?ns=");
            url.push_str(&url::form_urlencoded::byte_serialize(registry.as_bytes()).collect::<String>());
        }
        url
    }
}

/// Whether `host` serves `registry` as a mirror rather than being it.
fn is_mirror(host: &str, registry: &str) -> bool {
    !(host.eq_ignore_ascii_case(registry) || (registry == "docker.io" && host == "registry-1.docker.io"))
}

/// The hosts to try for `registry`, in order, the upstream last. `dir` is the hosts
/// directory; `None` means no configuration.
pub fn hosts_for(dir: Option<&Path>, registry: &str) -> Result<Vec<Host>> {
    let mut hosts = match dir.and_then(|d| host_dir(d, registry)) {
        Some(d) => {
            let file = d.join("hosts.toml");
            match fs::read_to_string(&file) {
                Ok(text) => parse(&d, &text).map_err(|why| {
                    Error::FailedPrecondition(format!("invalid registry host configuration {}: {why}", file.display()))
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![cert_dir(&d)?],
                Err(e) => return Err(Error::io(format!("reading {}", file.display()))(e)),
            }
        }
        None => vec![Entry::default()],
    };
    // The last entry is the upstream; without `server` it is the registry itself.
    if let Some(last) = hosts.last_mut() {
        if last.host.is_none() {
            let (scheme, authority) = if registry == "docker.io" {
                ("https", "registry-1.docker.io".to_owned())
            } else if is_loopback_host(registry) {
                ("http", registry.to_owned())
            } else {
                ("https", registry.to_owned())
            };
            last.host = Some((scheme.to_owned(), authority, "/v2".to_owned()));
            last.capabilities = Capabilities::ALL;
        }
    }
    let upstream = hosts.len().saturating_sub(1);
    Ok(hosts
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let (scheme, authority, path) = e.host.expect("every entry has a host now");
            Host {
                scheme,
                authority,
                path,
                capabilities: e.capabilities,
                tls: e.tls,
                headers: e.headers,
                mirror: i < upstream,
            }
        })
        .collect())
}

/// The configuration directory for `registry`: `host_port_`, then `host:port`, then
/// `_default`.
fn host_dir(dir: &Path, registry: &str) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(i) = registry.rfind(':').filter(|&i| i > 0 && !registry.ends_with(']')) {
        candidates.push(format!("{}_{}_", &registry[..i], &registry[i + 1..]));
    }
    candidates.push(registry.to_owned());
    candidates.push(DEFAULT_DIR.to_owned());
    candidates.into_iter().map(|c| dir.join(c)).find(|p| p.is_dir())
}

/// A host entry while parsing; `host` is `None` for an upstream without `server`.
#[derive(Debug, Clone)]
struct Entry {
    host: Option<(String, String, String)>,
    capabilities: Capabilities,
    tls: TlsFiles,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Default for Entry {
    fn default() -> Self {
        Entry { host: None, capabilities: Capabilities::ALL, tls: TlsFiles::default(), headers: Vec::new() }
    }
}

/// Parses a `hosts.toml` read from `dir`. Errors are plain reasons (the caller names the file).
fn parse(dir: &Path, text: &str) -> std::result::Result<Vec<Entry>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.message().to_owned())?;
    let mut entries = Vec::new();
    if let Some(hosts) = table.get("host") {
        let hosts = hosts.as_table().ok_or("`host` must be a table of hosts")?;
        // `preserve_order`: the file's order, which is the order hosts are tried in.
        for (name, config) in hosts {
            let config = config.as_table().ok_or_else(|| format!("host {name:?} must be a table"))?;
            entries.push(entry(dir, Some(name), config).map_err(|e| format!("host {name:?}: {e}"))?);
        }
    }
    let server = match table.get("server") {
        None => None,
        Some(toml::Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err("`server` must be a string".into()),
    };
    for key in table.keys() {
        if !matches!(
            key.as_str(),
            "server" | "host" | "capabilities" | "ca" | "client" | "skip_verify" | "header" | "override_path"
        ) {
            tracing::warn!(key, "ignoring an unknown key in hosts.toml");
        }
    }
    entries.push(entry(dir, server, &table).map_err(|e| format!("server: {e}"))?);
    Ok(entries)
}

/// One host's settings; `server` is its URL (`None`: the default upstream).
fn entry(dir: &Path, server: Option<&str>, t: &toml::Table) -> std::result::Result<Entry, String> {
    let override_path = match t.get("override_path") {
        None => false,
        Some(v) => v.as_bool().ok_or("`override_path` must be a boolean")?,
    };
    let host = server.map(|s| parse_server(s, override_path)).transpose()?;
    let capabilities = match t.get("capabilities") {
        None => Capabilities::ALL,
        Some(v) => {
            let mut caps = Capabilities { pull: false, resolve: false, push: false };
            for c in strings(v, "capabilities")? {
                match c.to_ascii_lowercase().as_str() {
                    "pull" => caps.pull = true,
                    "resolve" => caps.resolve = true,
                    "push" => caps.push = true,
                    other => return Err(format!("unknown capability {other:?}")),
                }
            }
            if strings(v, "capabilities")?.is_empty() {
                Capabilities::ALL
            } else {
                caps
            }
        }
    };
    let abs = |p: &str| if Path::new(p).is_absolute() { PathBuf::from(p) } else { dir.join(p) };
    let mut tls = TlsFiles::default();
    if let Some(v) = t.get("ca") {
        tls.ca = strings(v, "ca")?.iter().map(|p| abs(p)).collect();
    }
    if let Some(v) = t.get("client") {
        match v {
            toml::Value::String(s) => tls.client.push((abs(s), None)),
            toml::Value::Array(items) => {
                for item in items {
                    match item {
                        toml::Value::String(s) => tls.client.push((abs(s), None)),
                        toml::Value::Array(pair) => {
                            let pair = strings(&toml::Value::Array(pair.clone()), "client")?;
                            let [cert, key] = pair.as_slice() else {
                                return Err("a `client` pair must be [certificate, key]".into());
                            };
                            tls.client.push((abs(cert), Some(abs(key))));
                        }
                        _ => return Err("`client` entries must be strings or [certificate, key] pairs".into()),
                    }
                }
            }
            _ => return Err("`client` must be a string or a list".into()),
        }
    }
    if let Some(v) = t.get("skip_verify") {
        tls.skip_verify = v.as_bool().ok_or("`skip_verify` must be a boolean")?;
    }
    let mut headers = Vec::new();
    if let Some(v) = t.get("header") {
        let table = v.as_table().ok_or("`header` must be a table")?;
        for (name, values) in table {
            let name = HeaderName::try_from(name.as_str()).map_err(|_| format!("invalid header name {name:?}"))?;
            for value in strings(values, "header")? {
                let value =
                    HeaderValue::try_from(value.as_str()).map_err(|_| format!("invalid value for header {name}"))?;
                headers.push((name.clone(), value));
            }
        }
    }
    Ok(Entry { host, capabilities, tls, headers })
}

/// `scheme://host[:port][/path]` → scheme, authority, API root path (as containerd: no
/// scheme means HTTPS; the path gets `/v2` appended unless it ends so or `override_path`).
fn parse_server(server: &str, override_path: bool) -> std::result::Result<(String, String, String), String> {
    let with_scheme = if server.starts_with("http://") || server.starts_with("https://") {
        server.to_owned()
    } else {
        format!("https://{server}")
    };
    let url = url::Url::parse(&with_scheme).map_err(|e| format!("invalid URL {server:?}: {e}"))?;
    let host = url.host_str().ok_or_else(|| format!("no host in {server:?}"))?;
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let mut path = url.path().trim_end_matches('/').to_owned();
    if !override_path && !path.ends_with("/v2") {
        path.push_str("/v2");
    }
    Ok((url.scheme().to_owned(), authority, path))
}

/// A string or a list of strings.
fn strings(v: &toml::Value, what: &str) -> std::result::Result<Vec<String>, String> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or_else(|| format!("`{what}` must hold strings")))
            .collect(),
        _ => Err(format!("`{what}` must be a string or a list of strings")),
    }
}

/// A directory in Docker's `certs.d` layout: the upstream with its CAs and client pairs.
fn cert_dir(dir: &Path) -> Result<Entry> {
    let mut entry = Entry::default();
    let read = fs::read_dir(dir).map_err(Error::io(format!("reading {}", dir.display())))?;
    let mut names: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => entry.tls.ca.push(p),
            Some("cert") => {
                let key = p.with_extension("key");
                if key.is_file() {
                    entry.tls.client.push((p, Some(key)));
                } else {
                    return Err(Error::FailedPrecondition(format!("client certificate {} has no .key", p.display())));
                }
            }
            _ => {}
        }
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, registry_dir: &str, text: &str) {
        let d = dir.join(registry_dir);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("hosts.toml"), text).unwrap();
    }

    #[test]
    fn defaults_without_configuration() {
        let h = hosts_for(None, "docker.io").unwrap();
        assert_eq!(h.len(), 1);
        assert!(!h[0].mirror);
        assert_eq!(
            h[0].url("docker.io", "library/busybox", "manifests/latest"),
            "https://registry-1.docker.io/v2/library/busybox/manifests/latest"
        );
        let h = hosts_for(None, "127.0.0.1:5000").unwrap();
        assert_eq!(h[0].url("127.0.0.1:5000", "a", "blobs/x"), "http://127.0.0.1:5000/v2/a/blobs/x");
        for (registry, http) in [
            ("127.1.2.3", true),
            ("localhost:5000", true),
            ("[::1]:5000", true),
            ("registry.io", false),
            ("localhost.evil.com", false),
            ("10.0.0.1:5000", false),
        ] {
            assert_eq!(hosts_for(None, registry).unwrap()[0].plain_http(), http, "{registry}");
        }
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(hosts_for(Some(empty.path()), "quay.io").unwrap()[0].origin(), "https://quay.io");
    }

    #[test]
    fn hosts_toml_in_file_order_upstream_last() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "registry.io",
            r#"
server = "https://upstream.io"
ca = "upstream-ca.pem"
header = { X-Upstream = "1" }

[host."https://zz-first.local:5000"]
  capabilities = ["pull", "resolve"]
  ca = ["/abs/ca.pem", "rel.pem"]
  client = [["c.cert", "c.key"], "both.pem"]
  header = { X-A = "a", X-B = ["b1", "b2"] }

[host."http://aa-second.local"]
  capabilities = ["pull"]
  skip_verify = true

[host."https://custom.local/some/api"]
  override_path = true
"#,
        );
        let h = hosts_for(Some(dir.path()), "registry.io").unwrap();
        let origins: Vec<String> = h.iter().map(Host::origin).collect();
        assert_eq!(
            origins,
            ["https://zz-first.local:5000", "http://aa-second.local", "https://custom.local", "https://upstream.io"]
        );
        let d = dir.path().join("registry.io");
        assert_eq!(h[0].tls.ca, [PathBuf::from("/abs/ca.pem"), d.join("rel.pem")]);
        assert_eq!(h[0].tls.client, [(d.join("c.cert"), Some(d.join("c.key"))), (d.join("both.pem"), None)]);
        assert_eq!(h[0].headers.len(), 3);
        assert_eq!(h[0].capabilities, Capabilities { pull: true, resolve: true, push: false });
        assert!(!h[1].capabilities.resolve && h[1].capabilities.pull && h[1].tls.skip_verify);
        assert_eq!(
            h[1].url("registry.io", "team/app", "blobs/sha256:1"),
            "http://aa-second.local/v2/team/app/blobs/sha256:1?ns=registry.io"
        );
        assert_eq!(
            h[2].url("registry.io", "team/app", "manifests/1"),
            "https://custom.local/some/api/team/app/manifests/1?ns=registry.io"
        );
        assert_eq!(h[3].tls.ca, [d.join("upstream-ca.pem")]);
        assert_eq!(h[3].headers[0].0.as_str(), "x-upstream");
        assert_eq!(h[3].capabilities, Capabilities::ALL);
        assert_eq!(
            h.iter().map(|h| h.mirror).collect::<Vec<_>>(),
            [true, true, true, false],
            "only the upstream is not a mirror"
        );
        // The upstream named by `server` is a different host: it gets `ns` too.
        assert!(h[3].url("registry.io", "a", "b").ends_with("?ns=registry.io"));
    }

    #[test]
    fn mirrors_before_the_default_upstream() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "docker.io", "[host.\"http://127.0.0.1:5001\"]\ncapabilities = [\"pull\", \"resolve\"]\n");
        let h = hosts_for(Some(dir.path()), "docker.io").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            h[0].url("docker.io", "library/a", "manifests/1"),
            "http://127.0.0.1:5001/v2/library/a/manifests/1?ns=docker.io"
        );
        assert_eq!(
            h[1].url("docker.io", "library/a", "manifests/1"),
            "https://registry-1.docker.io/v2/library/a/manifests/1"
        );
    }

    #[test]
    fn host_directories_and_default() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "_default", "server = \"https://fallback.io\"\n");
        write(dir.path(), "reg.io_5000_", "server = \"https://port-style.io\"\n");
        write(dir.path(), "other.io:5000", "server = \"https://colon-style.io\"\n");
        assert_eq!(hosts_for(Some(dir.path()), "reg.io:5000").unwrap()[0].authority, "port-style.io");
        assert_eq!(hosts_for(Some(dir.path()), "other.io:5000").unwrap()[0].authority, "colon-style.io");
        assert_eq!(hosts_for(Some(dir.path()), "unknown.io").unwrap()[0].authority, "fallback.io");
    }

    #[test]
    fn docker_cert_directories() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("reg.io");
        fs::create_dir_all(&d).unwrap();
        for f in ["ca.crt", "client.cert", "client.key", "README"] {
            fs::write(d.join(f), "x").unwrap();
        }
        let h = hosts_for(Some(dir.path()), "reg.io").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].origin(), "https://reg.io");
        assert_eq!(h[0].tls.ca, [d.join("ca.crt")]);
        assert_eq!(h[0].tls.client, [(d.join("client.cert"), Some(d.join("client.key")))]);
    }

    #[test]
    fn invalid_files_fail_loudly() {
        for bad in [
            "server = 5",
            "[host.\"https://m\"]\ncapabilities = [\"fly\"]",
            "[host.\"https://m\"]\nclient = [[\"only-one\"]]",
            "skip_verify = \"yes\"",
            "not toml at all [",
            "[host.\"https://m\"]\nheader = { \"bad header\" = \"v\" }",
        ] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "reg.io", bad);
            let err = hosts_for(Some(dir.path()), "reg.io").unwrap_err();
            assert_eq!(err.code(), crate::error::Code::FailedPrecondition, "{bad}: {err}");
            assert!(err.to_string().contains("hosts.toml"), "{err}");
        }
    }

    #[test]
    fn server_urls() {
        assert_eq!(parse_server("reg.io:5000", false).unwrap(), ("https".into(), "reg.io:5000".into(), "/v2".into()));
        assert_eq!(parse_server("http://reg.io/", false).unwrap(), ("http".into(), "reg.io".into(), "/v2".into()));
        assert_eq!(parse_server("https://reg.io/x/v2", false).unwrap().2, "/x/v2");
        assert_eq!(parse_server("https://reg.io/x", false).unwrap().2, "/x/v2");
        assert_eq!(parse_server("https://reg.io/x", true).unwrap().2, "/x");
        assert_eq!(parse_server("https://reg.io", true).unwrap().2, "");
    }
}

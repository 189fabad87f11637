//! Docker's client configuration (`config.json`) as a [`CredentialProvider`], for the CLI.
//!
//! Key type: [`DockerConfig`]. [`DockerConfig::default_path`] is `$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`. Per registry host, as the Docker CLI does:
//!
//! 1. `credHelpers[host]` names a helper: `docker-credential-<name> get` is run with the
//!    server on stdin and answers `{"ServerURL", "Username", "Secret"}` (a `Username` of
//!    `<token>` means `Secret` is an identity token);
//! 2. else `credsStore`, the helper for every host, is asked the same way;
//! 3. else `auths[host]`: `auth` (base64 `user:password`), or `username` and `password`,
//!    `identitytoken`, `registrytoken`.
//!
//! Keys of `auths` may carry a scheme and a path (`https://index.docker.io/v1/`); only the
//! host is compared. Docker Hub (`docker.io`, `registry-1.docker.io`) is looked up under
//! `https://index.docker.io/v1/` and its aliases. A helper that says "credentials not found"
//! means no credentials; other helper failures are errors that name the helper and its exit
//! status, never its output (which may hold a secret). Answers are cached for the life of
//! the value (one CLI command), so a helper runs at most once per host.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Mutex,
    time::Duration,
};

use base64::Engine as _;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};

use super::auth::{same_registry, server_host, CredentialProvider, Secret};

/// How long a credential helper may run.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest helper answer read.
const MAX_HELPER_OUTPUT: usize = 1 << 20;

/// Docker Hub's key in `config.json`.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// The parts of `config.json` that hold credentials. `Debug` shows only the hosts.
#[derive(Default, serde::Deserialize)]
struct File {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Default, serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// Docker's `config.json`. See the module docs.
pub struct DockerConfig {
    path: PathBuf,
    file: File,
    cache: Mutex<HashMap<String, Option<Secret>>>,
}

impl std::fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut hosts: Vec<&String> = self.file.auths.keys().collect();
        hosts.sort();
        f.debug_struct("DockerConfig").field("path", &self.path).field("auths", &hosts).finish_non_exhaustive()
    }
}

impl DockerConfig {
    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`; `None` without either
    /// variable.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            return Some(Path::new(&d).join("config.json"));
        }
        std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| Path::new(&h).join(".docker/config.json"))
    }

    /// Reads `path`; a missing file is an empty configuration. The error for a malformed
    /// file names the file and the position, not the content.
    pub fn load(path: &Path) -> Result<DockerConfig> {
        let file = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::InvalidArgument(format!(
                    "{} is not a valid Docker config (line {}, column {})",
                    path.display(),
                    e.line(),
                    e.column()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
        };
        Ok(DockerConfig { path: path.to_owned(), file, cache: Mutex::new(HashMap::new()) })
    }

    /// Candidate keys for `host` in `credHelpers` and `auths`.
    fn keys_for(host: &str) -> Vec<String> {
        if same_registry(host, "docker.io") {
            vec![DOCKER_HUB_KEY.into(), "index.docker.io".into(), "docker.io".into(), "registry-1.docker.io".into()]
        } else {
            vec![host.to_ascii_lowercase()]
        }
    }

    /// The server name a helper is asked about: Docker Hub's key, else the host.
    fn helper_server(host: &str) -> String {
        if same_registry(host, "docker.io") {
            DOCKER_HUB_KEY.into()
        } else {
            host.to_owned()
        }
    }

    async fn lookup(&self, host: &str) -> Result<Option<Secret>> {
        let keys = Self::keys_for(host);
        let helper = keys
            .iter()
            .find_map(|k| self.file.cred_helpers.iter().find(|(h, _)| server_host(h) == server_host(k)).map(|(_, v)| v))
            .or(self.file.creds_store.as_ref())
            .filter(|h| !h.is_empty());
        if let Some(helper) = helper {
            if let Some(secret) = run_helper(helper, &Self::helper_server(host)).await? {
                return Ok(Some(secret));
            }
        }
        for key in &keys {
            let entry = self.file.auths.iter().find(|(k, _)| server_host(k) == server_host(key)).map(|(_, v)| v);
            if let Some(e) = entry {
                return entry_secret(e, &self.path, key);
            }
        }
        Ok(None)
    }
}

/// The secret of an `auths` entry.
fn entry_secret(e: &AuthEntry, path: &Path, key: &str) -> Result<Option<Secret>> {
    let some = |s: &Option<String>| s.as_ref().filter(|s| !s.is_empty()).cloned();
    if let Some(t) = some(&e.identitytoken) {
        return Ok(Some(Secret::IdentityToken(t)));
    }
    if let Some(t) = some(&e.registrytoken) {
        return Ok(Some(Secret::RegistryToken(t)));
    }
    if let Some(auth) = some(&e.auth) {
        let bad =
            || Error::InvalidArgument(format!("{}: the auth of {key} is not base64 of user:password", path.display()));
        let decoded = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (username, password) = decoded.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Secret::Basic { username: username.to_owned(), password: password.to_owned() }));
    }
    if let Some(username) = some(&e.username) {
        return Ok(Some(Secret::Basic { username, password: e.password.clone().unwrap_or_default() }));
    }
    Ok(None)
}

/// Runs `docker-credential-<helper> get` for `server`.
async fn run_helper(helper: &str, server: &str) -> Result<Option<Secret>> {
    if !helper.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(Error::InvalidArgument(format!("invalid credential helper name {helper:?}")));
    }
    let program = format!("docker-credential-{helper}");
    tracing::debug!(program, server, "asking a credential helper");
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io(format!("cannot run the credential helper {program}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its input is not an error here.
        let _ = stdin.write_all(server.as_bytes()).await;
    }
    let output = match tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output()).await {
        Ok(r) => r.map_err(Error::io(format!("running the credential helper {program}")))?,
        Err(_) => {
            return Err(Error::Unavailable {
                what: format!("credential helper {program} did not answer within {HELPER_TIMEOUT:?}"),
                source: None,
            })
        }
    };
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stdout).to_lowercase()
            + &String::from_utf8_lossy(&output.stderr).to_lowercase();
        if said.contains("credentials not found") {
            return Ok(None);
        }
        return Err(Error::PermissionDenied(format!("credential helper {program} failed ({})", output.status)));
    }
    if output.stdout.len() > MAX_HELPER_OUTPUT {
        return Err(Error::PermissionDenied(format!("credential helper {program} answered too much")));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&output.stdout).map_err(|_| {
        Error::PermissionDenied(format!("credential helper {program} answered something that is not credentials"))
    })?;
    if a.secret.is_empty() && a.username.is_empty() {
        return Ok(None);
    }
    Ok(Some(if a.username == "<token>" {
        Secret::IdentityToken(a.secret)
    } else {
        Secret::Basic { username: a.username, password: a.secret }
    }))
}

#[async_trait::async_trait]
impl CredentialProvider for DockerConfig {
    async fn secret(&self, _registry: &str, host: &str) -> Result<Option<Secret>> {
        let key = host.to_ascii_lowercase();
        if let Some(hit) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(hit.clone());
        }
        let found = self.lookup(host).await?;
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, found.clone());
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn config(json: &str) -> (tempfile::TempDir, DockerConfig) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        let c = DockerConfig::load(&path).unwrap();
        (dir, c)
    }

    #[tokio::test]
    async fn auths_by_host() {
        let (_d, c) = config(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOmh1YnBhc3M="},
                "http://127.0.0.1:5000/v2/": {"username": "u", "password": "p"},
                "reg.io": {"identitytoken": "refresh"},
                "tok.io": {"registrytoken": "bearer"},
                "empty.io": {}
            }}"#,
        );
        let basic = |u: &str, p: &str| Some(Secret::Basic { username: u.into(), password: p.into() });
        assert_eq!(c.secret("docker.io", "registry-1.docker.io").await.unwrap(), basic("hub", "hubpass"));
        assert_eq!(c.secret("127.0.0.1:5000", "127.0.0.1:5000").await.unwrap(), basic("u", "p"));
        assert_eq!(c.secret("reg.io", "reg.io").await.unwrap(), Some(Secret::IdentityToken("refresh".into())));
        assert_eq!(c.secret("tok.io", "tok.io").await.unwrap(), Some(Secret::RegistryToken("bearer".into())));
        assert_eq!(c.secret("empty.io", "empty.io").await.unwrap(), None);
        assert_eq!(c.secret("other.io", "other.io").await.unwrap(), None);
        assert!(!format!("{c:?}").contains("hubpass"));
    }

    #[tokio::test]
    async fn missing_and_malformed_files() {
        let c = DockerConfig::load(Path::new("/nonexistent/config.json")).unwrap();
        assert_eq!(c.secret("r.io", "r.io").await.unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths": {"r.io": {"auth": "s3cr3t-not-json"#).unwrap();
        let err = DockerConfig::load(&path).unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    /// Runs the helper tests with a private PATH entry; one test, so no other test sees the
    /// changed PATH half-way.
    #[tokio::test]
    async fn credential_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let helper = |name: &str, script: &str| {
            let p = dir.path().join(format!("docker-credential-{name}"));
            std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        helper(
            "pbtest",
            r#"read server; case "$server" in reg.io) echo '{"ServerURL":"reg.io","Username":"hu","Secret":"hs"}';; tok.io) echo '{"Username":"<token>","Secret":"idt"}';; *) echo "credentials not found in native keychain"; exit 1;; esac"#,
        );
        helper("broken", "echo 'leaked-secret' >&2; exit 3");
        let path = std::env::var("PATH").unwrap_or_default();
        // Only this test changes PATH in this test binary.
        std::env::set_var("PATH", format!("{}:{path}", dir.path().display()));
        let (_d, c) = config(
            r#"{"credHelpers": {"reg.io": "pbtest", "tok.io": "pbtest", "none.io": "pbtest", "bad.io": "broken"},
                "auths": {"none.io": {"auth": "dTpw"}}}"#,
        );
        assert_eq!(
            c.secret("reg.io", "reg.io").await.unwrap(),
            Some(Secret::Basic { username: "hu".into(), password: "hs".into() })
        );
        assert_eq!(c.secret("tok.io", "tok.io").await.unwrap(), Some(Secret::IdentityToken("idt".into())));
        // Not found by the helper: the auths entry still counts.
        assert_eq!(
            c.secret("none.io", "none.io").await.unwrap(),
            Some(Secret::Basic { username: "u".into(), password: "p".into() })
        );
        let err = c.secret("bad.io", "bad.io").await.unwrap_err();
        assert!(err.to_string().contains("docker-credential-broken") && !err.to_string().contains("leaked"), "{err}");
        let (_d, c) = config(r#"{"credsStore": "pbtest"}"#);
        assert!(c.secret("reg.io", "reg.io").await.unwrap().is_some());
        assert_eq!(c.secret("x.io", "x.io").await.unwrap(), None);
        std::env::set_var("PATH", path);
    }
}

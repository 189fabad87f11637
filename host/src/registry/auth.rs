//! Registry authentication: the credentials of a request and the challenge–response flows of
//! the distribution spec.
//!
//! Key types:
//! - [`Credentials`]: what one request may authenticate with — nothing, one secret bound to
//!   one registry (from the CRI's `AuthConfig`, see [`AuthConfig`]), or a
//!   [`CredentialProvider`] asked per registry host (Docker's `config.json`, see
//!   [`super::docker_config`]). Its `Debug` prints no secret.
//! - [`Secret`]: a username and password, an identity (OAuth2 refresh) token, or a registry
//!   (bearer) token. Never logged, never in an error message, never handed to the guest.
//! - `Authorizer`: shared by every pull of a process. It remembers which scheme each registry
//!   host challenged with (so later requests authenticate up front, as containerd's
//!   authorizer does) and caches bearer tokens per realm, service, scope and credential until
//!   they expire.
//!
//! The flow, as containerd's `remotes/docker` authorizer: a request goes out without
//! credentials until the host has answered 401 with `WWW-Authenticate`; then `Basic` sends
//! the username and password, `Bearer realm=…,service=…,scope=…` fetches a token from the
//! realm (`GET` with basic auth for a password, the OAuth2 `POST` with `refresh_token` for an
//! identity token, anonymously without credentials) and the request is retried once. A
//! second 401 is a permission error. A registry token is sent as the bearer token as is.
//!
//! Where a secret goes. The puller names the registry of every `resolve` and `fetch`, and the
//! puller is not trusted, so a secret is never sent to "the registry of the pull" as the
//! puller sees it. A secret of the CRI is bound when the request arrives: to its
//! `server_address`, or, without one, to the registry of the request's image reference as the
//! host parses it ([`super::name::reference_registry`]). It is then offered only to a host
//! that is that registry (Docker Hub's names are one registry), or to the upstream that
//! `hosts.toml` configures for it (its `server`); never to a mirror (a `[host."…"]` entry)
//! unless the mirror's own host is the one the secret is bound to. This is stricter than
//! containerd, which offers a CRI secret without `server_address` to every host of the pull,
//! mirrors included: a mirror is often another party (a peer-to-peer cache), and an operator
//! who wants pullbox to authenticate to one says so with the mirror's `header`
//! (`Authorization`) in `hosts.toml`. A [`CredentialProvider`] is asked per host contacted,
//! so it answers for mirrors only what it holds for them. A redirect never carries a secret
//! or a `hosts.toml` header to another origin (see the module docs of `registry`).
//!
//! Tokens obtained with credentials are cached under a fingerprint of those credentials (a
//! SHA-256 keyed with a random per-process salt), so one request's token never serves another
//! request that has other (or no) credentials. Tokens live `expires_in` seconds (60 when the
//! token service does not say, as the spec prescribes) less a margin of 10 % (at most 30 s),
//! so a token is not used in the last moments of its life.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use base64::Engine as _;
use reqwest::header::HeaderValue;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// How long a token lives when the token service does not say (the spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// The longest token-service answer read.
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;

/// The `client_id` sent with OAuth2 token requests.
const CLIENT_ID: &str = "pullbox";

/// A secret for one registry host. `Debug` redacts everything.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A username and password: HTTP basic auth, or the token realm's basic auth.
    Basic { username: String, password: String },
    /// An identity token: an OAuth2 refresh token exchanged at the token realm.
    IdentityToken(String),
    /// A registry token: sent to the registry as the bearer token as is.
    RegistryToken(String),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Basic { .. } => f.write_str("Secret::Basic(<redacted>)"),
            Secret::IdentityToken(_) => f.write_str("Secret::IdentityToken(<redacted>)"),
            Secret::RegistryToken(_) => f.write_str("Secret::RegistryToken(<redacted>)"),
        }
    }
}

impl Secret {
    /// A keyed hash of the secret: equal secrets give equal fingerprints within one process;
    /// nothing about the secret can be learnt from it.
    fn fingerprint(&self) -> [u8; 32] {
        static SALT: OnceLock<[u8; 16]> = OnceLock::new();
        let salt = SALT.get_or_init(|| *uuid::Uuid::new_v4().as_bytes());
        let mut h = Sha256::new();
        h.update(salt);
        let mut field = |tag: u8, s: &str| {
            h.update([tag]);
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        match self {
            Secret::Basic { username, password } => {
                field(1, username);
                field(2, password);
            }
            Secret::IdentityToken(t) => field(3, t),
            Secret::RegistryToken(t) => field(4, t),
        }
        h.finalize().into()
    }

    /// The `Authorization` value for HTTP basic auth, marked sensitive (never printed by the
    /// HTTP stack's `Debug`).
    fn basic_header(username: &str, password: &str) -> Result<HeaderValue> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        sensitive(format!("Basic {encoded}"))
    }
}

/// An `Authorization` header value marked sensitive; the error names no part of it.
fn sensitive(value: String) -> Result<HeaderValue> {
    let mut v = HeaderValue::from_str(&value)
        .map_err(|_| Error::InvalidArgument("credentials contain characters that cannot be sent in a header".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Looks up a secret per registry host: Docker's `config.json` and its credential helpers,
/// or anything else that keeps credentials.
#[async_trait::async_trait]
pub trait CredentialProvider: Send + Sync {
    /// The secret for `host` (`host[:port]` as contacted, for example `registry-1.docker.io`
    /// or `127.0.0.1:5000`); `registry` is the registry the image is named after
    /// (`docker.io`), which differs from `host` for mirrors and Docker Hub. `Ok(None)` when
    /// there is none. Errors must not contain the secret.
    async fn secret(&self, registry: &str, host: &str) -> Result<Option<Secret>>;
}

/// The fields of the CRI's `AuthConfig` (runtime.v1), empty strings for absent fields.
#[derive(Clone, Default)]
pub struct AuthConfig {
    pub username: String,
    pub password: String,
    /// Base64 of `username:password`.
    pub auth: String,
    /// The registry these credentials are for; empty for "the registry of the request's
    /// image reference" (as the host parses it, never as the puller names it).
    pub server_address: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig").field("server_address", &self.server_address).finish_non_exhaustive()
    }
}

/// What one request may authenticate with. See the module docs. `Debug` prints no secret.
#[derive(Clone, Default)]
pub struct Credentials(Inner);

#[derive(Clone, Default)]
enum Inner {
    #[default]
    Anonymous,
    /// One secret for the registry `server` (`host[:port]`, lowercase), its configured
    /// upstream included, mirrors excluded.
    Static {
        secret: Secret,
        server: String,
    },
    Provider(Arc<dyn CredentialProvider>),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Inner::Anonymous => f.write_str("Credentials::Anonymous"),
            Inner::Static { secret, server } => {
                f.debug_struct("Credentials::Static").field("secret", secret).field("server", server).finish()
            }
            Inner::Provider(_) => f.write_str("Credentials::Provider"),
        }
    }
}

impl Credentials {
    /// No credentials: anonymous access (anonymous bearer tokens still work).
    pub fn anonymous() -> Credentials {
        Credentials(Inner::Anonymous)
    }

    /// One secret for `registry` (a server address: `host[:port]`, any scheme or path
    /// ignored), sent only to hosts of that registry (see the module docs).
    pub fn with_secret(secret: Secret, registry: &str) -> Credentials {
        Credentials(Inner::Static { secret, server: canonical_registry(&server_host(registry)) })
    }

    /// A username and password for `registry`.
    pub fn basic(registry: &str, username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials::with_secret(Secret::Basic { username: username.into(), password: password.into() }, registry)
    }

    /// Credentials looked up per host when a host asks for them.
    pub fn from_provider(provider: Arc<dyn CredentialProvider>) -> Credentials {
        Credentials(Inner::Provider(provider))
    }

    /// The credentials of a CRI `AuthConfig` for a pull from `image_registry` (the registry
    /// of the request's reference, from [`super::name::reference_registry`]), interpreted
    /// as containerd's CRI plugin does: `username` (with `password`) first, then
    /// `identity_token`, then `auth` (base64 of `username:password`), then
    /// `registry_token`; all empty is anonymous. They are bound to the registry of
    /// `server_address` (its host, any scheme or path ignored) or, when it is empty, to
    /// `image_registry`; Docker Hub's names (`docker.io`, `index.docker.io`,
    /// `registry-1.docker.io`) are one registry. `InvalidArgument` for an `auth` that is not
    /// base64 of `user:password`; the message does not contain it.
    pub fn from_auth_config(config: &AuthConfig, image_registry: &str) -> Result<Credentials> {
        let secret = if !config.username.is_empty() {
            Some(Secret::Basic { username: config.username.clone(), password: config.password.clone() })
        } else if !config.identity_token.is_empty() {
            Some(Secret::IdentityToken(config.identity_token.clone()))
        } else if !config.auth.is_empty() {
            let bad =
                || Error::InvalidArgument("the auth field of the credentials is not base64 of user:password".into());
            let decoded = base64::engine::general_purpose::STANDARD.decode(config.auth.trim()).map_err(|_| bad())?;
            let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
            let (user, pass) = decoded.split_once(':').ok_or_else(bad)?;
            Some(Secret::Basic { username: user.to_owned(), password: pass.trim_end_matches('\0').to_owned() })
        } else if !config.registry_token.is_empty() {
            Some(Secret::RegistryToken(config.registry_token.clone()))
        } else {
            None
        };
        let Some(secret) = secret else { return Ok(Credentials::anonymous()) };
        let server = match config.server_address.trim() {
            "" => image_registry,
            s => s,
        };
        if server_host(server).is_empty() {
            return Err(Error::InvalidArgument(
                "the credentials name no registry: empty server address and image registry".into(),
            ));
        }
        Ok(Credentials::with_secret(secret, server))
    }

    /// Who these credentials are, without revealing them: `anonymous`, a keyed hash of the
    /// secret (with the server it is limited to), or `provider` (the process's credential
    /// store). Requests with different identities never share one pull.
    pub fn identity(&self) -> String {
        match &self.0 {
            Inner::Anonymous => "anonymous".into(),
            Inner::Static { secret, server } => format!("{}@{server}", hex::encode(secret.fingerprint())),
            Inner::Provider(p) => format!("provider:{:p}", Arc::as_ptr(p)),
        }
    }

    /// Whether these are anonymous.
    pub fn is_anonymous(&self) -> bool {
        matches!(self.0, Inner::Anonymous)
    }

    /// The secret for `host` (`host[:port]` as contacted) serving `registry` (as the puller
    /// named it); `mirror`: the host is a mirror of `hosts.toml`, not the registry's
    /// upstream. A bound secret goes to its registry's own hosts and configured upstream
    /// only (see the module docs); a provider is asked about `host`.
    pub(crate) async fn secret_for(&self, registry: &str, host: &str, mirror: bool) -> Result<Option<Secret>> {
        match &self.0 {
            Inner::Anonymous => Ok(None),
            Inner::Static { secret, server } => {
                let applies = same_registry(server, host) || (!mirror && same_registry(server, registry));
                Ok(applies.then(|| secret.clone()))
            }
            Inner::Provider(p) => p.secret(registry, host).await,
        }
    }
}

/// `index.docker.io` and the other names of Docker Hub as `docker.io`; other hosts as they are.
fn canonical_registry(host: &str) -> String {
    if same_registry(host, "docker.io") {
        "docker.io".to_owned()
    } else {
        host.to_owned()
    }
}

/// The `host[:port]` of a server address: `https://index.docker.io/v1/` → `index.docker.io`.
pub(crate) fn server_host(address: &str) -> String {
    let s = address.trim();
    let s = s.split_once("://").map(|(_, rest)| rest).unwrap_or(s);
    s.split('/').next().unwrap_or_default().to_ascii_lowercase()
}

/// Whether two registry hosts name the same registry, Docker Hub's aliases included.
pub(crate) fn same_registry(a: &str, b: &str) -> bool {
    let hub =
        |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com");
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    a == b || (hub(&a) && hub(&b))
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scopes: Vec<String> },
}

/// Parses the `WWW-Authenticate` values of a 401; `Bearer` wins over `Basic` (as containerd
/// prefers it). `None` when no value is a scheme pullbox speaks.
pub(crate) fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    let mut basic = false;
    for v in values {
        let v = v.trim();
        let (scheme, rest) = v.split_once(char::is_whitespace).unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            let params = parse_params(rest)?;
            let realm = params.get("realm").filter(|r| !r.is_empty())?.clone();
            let scopes =
                params.get("scope").map(|s| s.split_whitespace().map(str::to_owned).collect()).unwrap_or_default();
            return Some(Challenge::Bearer { realm, service: params.get("service").cloned(), scopes });
        }
        if scheme.eq_ignore_ascii_case("basic") {
            basic = true;
        }
    }
    basic.then_some(Challenge::Basic)
}

/// Parses `k="v", k2=v2` (auth-params) into lowercase keys and unquoted values.
fn parse_params(s: &str) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut s = s.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            // A quoted string; `\"` escapes a quote.
            let mut value = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &q[end? + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        out.insert(key, value);
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

/// A cached bearer token.
struct CachedToken {
    token: String,
    expires: Instant,
}

/// Key of the token cache: realm, service, scopes (sorted, space-joined) and the fingerprint
/// of the credentials (`None`: anonymous).
type TokenKey = (String, String, String, Option<[u8; 32]>);

/// What the authorizer decided to send with one request.
#[derive(Default)]
pub(crate) struct Authorization {
    /// The `Authorization` header, marked sensitive.
    pub header: Option<HeaderValue>,
    /// The token-cache entry the header came from, to drop when the registry refuses it.
    token_key: Option<TokenKey>,
    /// Whether any credentials were available for the host (for error messages).
    pub had_credentials: bool,
}

/// The transport's memory of hosts' challenges and the token cache. See the module docs.
#[derive(Default)]
pub(crate) struct Authorizer {
    /// The last challenge of each host, by `scheme://host[:port]`.
    challenges: Mutex<HashMap<String, Challenge>>,
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
}

/// Where a request goes and for what; everything the authorizer needs to know about it.
pub(crate) struct Target<'a> {
    /// `scheme://host[:port]` of the host contacted.
    pub origin: &'a str,
    /// `host[:port]` of the host contacted.
    pub host: &'a str,
    /// Whether the host is spoken to in plain HTTP (then a plain-HTTP realm is allowed too).
    pub plain_http: bool,
    /// The registry the image is named after (`docker.io`), as the puller named it.
    pub registry: &'a str,
    /// Whether the host is a mirror of `hosts.toml` rather than the registry's upstream.
    pub mirror: bool,
    /// The repository path (`library/busybox`).
    pub repository: &'a str,
}

impl Target<'_> {
    fn pull_scope(&self) -> String {
        format!("repository:{}:pull", self.repository)
    }
}

impl Authorizer {
    /// Records the challenge of a 401 from `target`'s host. Returns `false` when the answer
    /// has no challenge pullbox can answer.
    pub fn challenged(&self, target: &Target<'_>, resp: &reqwest::Response, sent: &Authorization) -> bool {
        if let Some(key) = &sent.token_key {
            // The registry refused a token: never offer it again.
            self.tokens.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        }
        let values = resp.headers().get_all(reqwest::header::WWW_AUTHENTICATE).iter().filter_map(|v| v.to_str().ok());
        match parse_challenges(values) {
            Some(c) => {
                tracing::debug!(host = target.host, challenge = ?c, "registry asks for authentication");
                self.challenges.lock().unwrap_or_else(|e| e.into_inner()).insert(target.origin.to_owned(), c);
                true
            }
            None => false,
        }
    }

    /// The `Authorization` for a request to `target`: nothing until the host has
    /// challenged; then basic auth, or a bearer token (cached, or fetched now with `http`).
    pub async fn authorize(
        &self,
        http: &reqwest::Client,
        target: &Target<'_>,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<Authorization> {
        let challenge = self.challenges.lock().unwrap_or_else(|e| e.into_inner()).get(target.origin).cloned();
        let Some(challenge) = challenge else { return Ok(Authorization::default()) };
        let secret = credentials.secret_for(target.registry, target.host, target.mirror).await?;
        let had_credentials = secret.is_some();
        match (challenge, secret) {
            (Challenge::Basic, Some(Secret::Basic { username, password })) => Ok(Authorization {
                header: Some(Secret::basic_header(&username, &password)?),
                token_key: None,
                had_credentials,
            }),
            (Challenge::Basic, _) => Ok(Authorization { had_credentials, ..Default::default() }),
            (Challenge::Bearer { .. }, Some(Secret::RegistryToken(token))) => Ok(Authorization {
                header: Some(sensitive(format!("Bearer {token}"))?),
                token_key: None,
                had_credentials,
            }),
            (Challenge::Bearer { realm, service, scopes }, secret) => {
                let mut all: Vec<String> = scopes;
                all.push(target.pull_scope());
                all.sort();
                all.dedup();
                let key: TokenKey = (
                    realm.clone(),
                    service.clone().unwrap_or_default(),
                    all.join(" "),
                    secret.as_ref().map(Secret::fingerprint),
                );
                let cached = {
                    let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
                    let now = Instant::now();
                    tokens.retain(|_, t| t.expires > now);
                    tokens.get(&key).map(|t| t.token.clone())
                };
                let token = match cached {
                    Some(t) => t,
                    None => {
                        let (token, lifetime) =
                            fetch_token(http, target, &realm, service.as_deref(), &all, secret.as_ref(), timeout)
                                .await?;
                        let margin = (lifetime / 10).min(Duration::from_secs(30));
                        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(
                            key.clone(),
                            CachedToken { token: token.clone(), expires: Instant::now() + lifetime - margin },
                        );
                        token
                    }
                };
                Ok(Authorization {
                    header: Some(sensitive(format!("Bearer {token}"))?),
                    token_key: Some(key),
                    had_credentials,
                })
            }
        }
    }
}

/// Asks the token realm for a token; returns it and its lifetime.
async fn fetch_token(
    http: &reqwest::Client,
    target: &Target<'_>,
    realm: &str,
    service: Option<&str>,
    scopes: &[String],
    secret: Option<&Secret>,
    timeout: Duration,
) -> Result<(String, Duration)> {
    let who = format!("the token service of {}", target.host);
    let url =
        url::Url::parse(realm).map_err(|_| Error::PermissionDenied(format!("{}: invalid token realm", target.host)))?;
    let realm_loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    let allowed = match url.scheme() {
        "https" => true,
        "http" => realm_loopback || target.plain_http,
        _ => false,
    };
    if !allowed {
        return Err(Error::PermissionDenied(format!(
            "{}: refusing token realm {}://{}: only HTTPS (or plain HTTP on loopback or for a plain-HTTP registry)",
            target.host,
            url.scheme(),
            url.host_str().unwrap_or_default()
        )));
    }
    tracing::debug!(host = target.host, realm = %url, ?scopes, with_credentials = secret.is_some(), "fetching a bearer token");
    let request = match secret {
        Some(Secret::IdentityToken(refresh)) => {
            let mut form = vec![
                ("grant_type", "refresh_token".to_owned()),
                ("refresh_token", refresh.clone()),
                ("client_id", CLIENT_ID.to_owned()),
                ("scope", scopes.join(" ")),
            ];
            if let Some(s) = service {
                form.push(("service", s.to_owned()));
            }
            let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
            http.post(url).header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(body)
        }
        other => {
            let mut url = url;
            {
                let mut q = url.query_pairs_mut();
                if let Some(s) = service {
                    q.append_pair("service", s);
                }
                for s in scopes {
                    q.append_pair("scope", s);
                }
                if matches!(other, Some(Secret::Basic { .. })) {
                    q.append_pair("client_id", CLIENT_ID);
                }
            }
            let mut req = http.get(url);
            if let Some(Secret::Basic { username, password }) = other {
                req = req.header(reqwest::header::AUTHORIZATION, Secret::basic_header(username, password)?);
            }
            req
        }
    };
    let resp = match tokio::time::timeout(timeout, request.send()).await {
        Ok(r) => r.map_err(|e| Error::unavailable(format!("cannot reach {who}"), e.without_url()))?,
        Err(_) => {
            return Err(Error::Unavailable { what: format!("{who} did not answer within {timeout:?}"), source: None })
        }
    };
    let status = resp.status();
    if status.is_server_error() {
        return Err(Error::Unavailable { what: format!("{who} answered {status}"), source: None });
    }
    if !status.is_success() {
        let why = if secret.is_some() { "refused the credentials" } else { "refused anonymous access" };
        return Err(Error::PermissionDenied(format!("{who} {why} ({status})")));
    }
    let body = super::read_capped(resp, MAX_TOKEN_RESPONSE, &who, timeout).await?;
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| Error::Unavailable {
        what: format!("{who} answered something that is not a token response"),
        source: None,
    })?;
    let token = parsed
        .token
        .filter(|t| !t.is_empty())
        .or(parsed.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| Error::PermissionDenied(format!("{who} returned no token")))?;
    let lifetime = parsed.expires_in.filter(|&s| s > 0).map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_LIFETIME);
    Ok((token, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = parse_challenges([
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        ])
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scopes: vec!["repository:library/busybox:pull".into()],
            }
        );
        assert_eq!(parse_challenges([r#"Basic realm="registry""#]), Some(Challenge::Basic));
        // Bearer wins whatever the order; unknown schemes are ignored.
        assert!(matches!(
            parse_challenges(["Basic realm=x", "Negotiate", r#"bearer realm="http://127.0.0.1/t""#]),
            Some(Challenge::Bearer { .. })
        ));
        assert_eq!(parse_challenges(["Negotiate abc"]), None);
        assert_eq!(parse_challenges([r#"Bearer service="x""#]), None, "a bearer challenge needs a realm");
        let p = parse_params(r#"realm="a\"b", scope="x y",service=plain"#).unwrap();
        assert_eq!(p["realm"], "a\"b");
        assert_eq!(p["scope"], "x y");
        assert_eq!(p["service"], "plain");
    }

    fn auth_config(f: impl FnOnce(&mut AuthConfig)) -> AuthConfig {
        let mut c = AuthConfig::default();
        f(&mut c);
        c
    }

    /// The secret for the upstream `host` of `registry`.
    async fn secret(c: &Credentials, registry: &str, host: &str) -> Option<Secret> {
        c.secret_for(registry, host, false).await.unwrap()
    }

    /// The secret for the mirror `host` of `registry`.
    async fn mirror_secret(c: &Credentials, registry: &str, host: &str) -> Option<Secret> {
        c.secret_for(registry, host, true).await.unwrap()
    }

    #[tokio::test]
    async fn cri_auth_configs_map_like_containerd() {
        let basic = |u: &str, p: &str| Some(Secret::Basic { username: u.into(), password: p.into() });
        let c = Credentials::from_auth_config(
            &auth_config(|c| {
                c.username = "u".into();
                c.password = "p".into();
                c.identity_token = "ignored".into();
            }),
            "r.io",
        )
        .unwrap();
        assert_eq!(secret(&c, "r.io", "r.io").await, basic("u", "p"));

        let c = Credentials::from_auth_config(&auth_config(|c| c.auth = "dXNlcjpwYTpzcw==".into()), "r.io").unwrap();
        assert_eq!(secret(&c, "r.io", "r.io").await, basic("user", "pa:ss"));

        let c = Credentials::from_auth_config(
            &auth_config(|c| {
                c.identity_token = "refresh".into();
                c.auth = "dXNlcjpwYXNz".into();
            }),
            "r.io",
        )
        .unwrap();
        assert_eq!(secret(&c, "r.io", "r.io").await, Some(Secret::IdentityToken("refresh".into())));

        let c = Credentials::from_auth_config(&auth_config(|c| c.registry_token = "tok".into()), "r.io").unwrap();
        assert_eq!(secret(&c, "r.io", "r.io").await, Some(Secret::RegistryToken("tok".into())));

        let c = Credentials::from_auth_config(&AuthConfig::default(), "r.io").unwrap();
        assert!(c.is_anonymous());

        let err =
            Credentials::from_auth_config(&auth_config(|c| c.auth = "not base64 s3cr3t!".into()), "r.io").unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        let err = Credentials::from_auth_config(&auth_config(|c| c.auth = "bm9jb2xvbg==".into()), "r.io").unwrap_err();
        assert_eq!(err.code(), crate::error::Code::InvalidArgument);
    }

    /// The puller names the registry of every resolve and fetch; a secret goes only where the
    /// host bound it when the request arrived.
    #[tokio::test]
    async fn secrets_stay_with_the_registry_they_are_bound_to() {
        // No server address: bound to the request's registry, whatever the puller names.
        let c = Credentials::from_auth_config(&auth_config(|c| c.username = "u".into()), "registry-a.io:5000").unwrap();
        assert!(secret(&c, "registry-a.io:5000", "registry-a.io:5000").await.is_some());
        assert!(secret(&c, "Registry-A.io:5000", "registry-a.io:5000").await.is_some(), "hosts compare without case");
        assert!(secret(&c, "evil.io", "evil.io").await.is_none(), "a registry the puller names");
        assert!(secret(&c, "registry-a.io", "registry-a.io").await.is_none(), "another port is another registry");
        assert!(secret(&c, "registry-a.io:5000", "upstream.io").await.is_some(), "the configured upstream");
        assert!(mirror_secret(&c, "registry-a.io:5000", "mirror.local").await.is_none(), "a mirror");
        assert!(secret(&c, "evil.io", "upstream.io").await.is_none(), "the upstream of another registry");

        // Docker Hub under any of its names.
        let c = Credentials::from_auth_config(&auth_config(|c| c.username = "u".into()), "index.docker.io").unwrap();
        assert!(secret(&c, "docker.io", "registry-1.docker.io").await.is_some());
        assert!(mirror_secret(&c, "docker.io", "mirror.gcr.io").await.is_none());
        assert!(secret(&c, "quay.io", "quay.io").await.is_none());

        // A server address wins over the image's registry.
        let c = Credentials::from_auth_config(
            &auth_config(|c| {
                c.username = "u".into();
                c.server_address = "https://index.docker.io/v1/".into();
            }),
            "quay.io",
        )
        .unwrap();
        assert!(secret(&c, "docker.io", "registry-1.docker.io").await.is_some());
        assert!(secret(&c, "quay.io", "quay.io").await.is_none());
        assert!(secret(&c, "other.io", "other.io").await.is_none());
        let c = Credentials::from_auth_config(
            &auth_config(|c| {
                c.username = "u".into();
                c.server_address = "r.io:5000".into();
            }),
            "r.io:5000",
        )
        .unwrap();
        assert!(secret(&c, "r.io:5000", "upstream.local").await.is_some(), "the upstream configured for the registry");
        assert!(mirror_secret(&c, "r.io:5000", "mirror.local").await.is_none(), "not a mirror");
        assert!(secret(&c, "r.io", "r.io").await.is_none());
        // A server address that names a mirror is the operator's choice: that mirror gets it.
        let c = Credentials::from_auth_config(
            &auth_config(|c| {
                c.username = "u".into();
                c.server_address = "mirror.local".into();
            }),
            "r.io",
        )
        .unwrap();
        assert!(mirror_secret(&c, "r.io", "mirror.local").await.is_some());
        assert!(secret(&c, "r.io", "r.io").await.is_none());

        // Different bindings are different identities: such requests never share a pull.
        let a = Credentials::basic("a.io", "u", "p");
        let b = Credentials::basic("b.io", "u", "p");
        assert_ne!(a.identity(), b.identity());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = Credentials::basic("r.io", "alice", "hunter2-password");
        let s = format!("{c:?} {:?}", Secret::IdentityToken("tok-123".into()));
        assert!(!s.contains("alice") && !s.contains("hunter2") && !s.contains("tok-123"), "{s}");
        let a = auth_config(|c| {
            c.username = "alice".into();
            c.password = "hunter2".into();
            c.auth = "YWxpY2U6aHVudGVyMg==".into();
        });
        let s = format!("{a:?}");
        assert!(!s.contains("alice") && !s.contains("hunter2") && !s.contains("YWxp"), "{s}");
        let h = Secret::basic_header("alice", "hunter2").unwrap();
        assert!(h.is_sensitive());
        assert!(!format!("{h:?}").contains("YWxp"));
    }

    #[test]
    fn fingerprints_tell_secrets_apart() {
        let a = Secret::Basic { username: "a".into(), password: "bc".into() };
        let b = Secret::Basic { username: "ab".into(), password: "c".into() };
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        assert_ne!(Secret::IdentityToken("x".into()).fingerprint(), Secret::RegistryToken("x".into()).fingerprint());
    }

    #[test]
    fn server_hosts() {
        assert_eq!(server_host("https://index.docker.io/v1/"), "index.docker.io");
        assert_eq!(server_host("Reg.IO:5000"), "reg.io:5000");
        assert_eq!(server_host("http://127.0.0.1:5000/x"), "127.0.0.1:5000");
        assert!(same_registry("docker.io", "registry-1.docker.io"));
        assert!(!same_registry("docker.io", "quay.io"));
    }
}

//! The bearer-token flow of the distribution spec: on a 401 with
//! `WWW-Authenticate: Bearer realm="…",service="…",scope="…"`, ask the realm for a token and
//! retry. Tokens are cached per registry and repository and never logged.

use std::{collections::HashMap, sync::Mutex};

use crate::error::{Error, Result};

use super::Repository;

/// Tokens by `(registry, repository)`.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, String>>,
}

impl TokenCache {
    /// The cached token for `repo`, if any.
    pub fn get(&self, repo: &Repository) -> Option<String> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(&repo.to_string()).cloned()
    }

    /// Answers a challenge: fetches a token from the realm and caches it.
    pub async fn fetch(&self, http: &reqwest::Client, repo: &Repository, challenge: &str) -> Result<String> {
        let params = parse_challenge(challenge).ok_or_else(|| {
            Error::PermissionDenied(format!("{} requires authentication this client cannot perform", repo.registry()))
        })?;
        let realm = params.get("realm").ok_or_else(|| {
            Error::PermissionDenied(format!("{}: bearer challenge without realm", repo.registry()))
        })?;
        let mut url = url::Url::parse(realm)
            .map_err(|_| Error::PermissionDenied(format!("{}: invalid token realm", repo.registry())))?;
        if url.scheme() != "https" && !(url.scheme() == "http" && repo.is_loopback()) {
            return Err(Error::PermissionDenied(format!(
                "{}: refusing a token realm that is not HTTPS",
                repo.registry()
            )));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", &format!("repository:{}:pull", repo.path()));
        }
        let resp = http
            .get(url)
            .send()
            .await
            .map_err(|e| Error::unavailable(format!("cannot reach the token service of {}", repo.registry()), e))?;
        if !resp.status().is_success() {
            return Err(Error::PermissionDenied(format!(
                "token service of {} answered {}",
                repo.registry(),
                resp.status()
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body: TokenResponse = resp
            .json()
            .await
            .map_err(|e| Error::unavailable(format!("invalid answer from the token service of {}", repo.registry()), e))?;
        let token = body.token.or(body.access_token).ok_or_else(|| {
            Error::PermissionDenied(format!("token service of {} returned no token", repo.registry()))
        })?;
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(repo.to_string(), token.clone());
        Ok(token)
    }
}

/// Parses `Bearer k="v",k2="v2"` into its parameters; `None` for other schemes.
fn parse_challenge(header: &str) -> Option<HashMap<String, String>> {
    let rest = header.trim().strip_prefix("Bearer ").or_else(|| header.trim().strip_prefix("bearer "))?;
    let mut out = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        out.insert(key, value.to_owned());
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let p = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/busybox:pull");
        assert!(parse_challenge("Basic realm=\"x\"").is_none());
    }
}

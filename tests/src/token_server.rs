//! A bearer-token server for the distribution registry's `auth: token:` mode, on 127.0.0.1.
//!
//! Key type: [`TokenServer`], a route of the tests' one HTTP server
//! ([`crate::fault_server::FaultServer`]). It answers `GET /token?service=…&scope=…` (HTTP basic auth
//! with one of its users) with a JWT signed ES256 by a key generated at start; the JWT's
//! header carries the key's self-signed certificate (`x5c`), and the same certificate is the
//! registry's `rootcertbundle`, so the registry trusts exactly this server's tokens.
//!
//! Users get `pull` on every repository they ask for and nothing else; anonymous or wrong
//! credentials get 401. Every request and every issued token is recorded, so tests can
//! count token fetches and search logs for the tokens.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use crate::fault_server::{Answer, FaultServer, Head};

/// The `service` the registry announces and the tokens are issued for.
pub const SERVICE: &str = "pullbox-test-registry";
/// The tokens' issuer.
pub const ISSUER: &str = "pullbox-test-token-server";
/// How long issued tokens live.
const LIFETIME_SECS: u64 = 300;

struct State {
    users: Vec<(String, String)>,
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    issued: Mutex<Vec<String>>,
}

/// A running token server. See the module docs.
#[derive(Debug)]
pub struct TokenServer {
    server: FaultServer,
    bundle: PathBuf,
    state: Arc<State>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("users", &self.users.len()).finish_non_exhaustive()
    }
}

impl TokenServer {
    /// Starts a server for `users` (name, password); writes the signing certificate to
    /// `dir/token-ca.pem`.
    pub fn start(dir: &Path, users: &[(&str, &str)]) -> Result<TokenServer> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("cannot generate a signing key"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("cannot load the signing key"))?;
        let rc_key = rcgen::KeyPair::try_from(pkcs8.as_ref())?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, ISSUER);
        let cert = params.self_signed(&rc_key)?;
        let bundle = dir.join("token-ca.pem");
        fs::write(&bundle, cert.pem())?;

        let state = Arc::new(State {
            users: users.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect(),
            key,
            cert_der: cert.der().to_vec(),
            issued: Mutex::new(Vec::new()),
        });
        let server = FaultServer::local()?;
        let s = state.clone();
        server.route("/token", move |head| answer(&s, head));
        Ok(TokenServer { server, bundle, state })
    }

    /// The realm to configure in the registry: `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.server.addr())
    }

    /// The certificate bundle the registry must trust (`rootcertbundle`).
    pub fn cert_bundle(&self) -> &Path {
        &self.bundle
    }

    /// The path and query of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.server.requests().into_iter().map(|r| r.path).collect()
    }

    /// Every token issued so far.
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
}

/// The answer to `GET /token?service=…&scope=…`: a token for a known user (HTTP basic auth),
/// `401` for anyone else.
fn answer(s: &State, head: &Head) -> Answer {
    let user = head.header("authorization").and_then(|v| {
        let b64 = v.strip_prefix("Basic ")?;
        let decoded = String::from_utf8(STANDARD.decode(b64).ok()?).ok()?;
        let (u, p) = decoded.split_once(':')?;
        s.users.iter().any(|(uu, pp)| uu == u && pp == p).then(|| u.to_owned())
    });
    let Some(user) = user else {
        return Answer::json(401, r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#);
    };
    let scopes: Vec<String> = head.query().into_iter().filter(|(k, _)| k == "scope").map(|(_, v)| v).collect();
    let token = sign(s, &user, &scopes);
    s.issued.lock().unwrap().push(token.clone());
    Answer::json(200, serde_json::json!({"token": token, "expires_in": LIFETIME_SECS}).to_string())
}

/// A JWT granting `pull` on the repositories of `scopes` (`repository:NAME:ACTIONS`).
fn sign(s: &State, user: &str, scopes: &[String]) -> String {
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .flat_map(|scope| scope.split(' '))
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            let granted: Vec<&str> = actions.split(',').filter(|a| *a == "pull").collect();
            (kind == "repository").then(|| serde_json::json!({"type": kind, "name": name, "actions": granted}))
        })
        .collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let jti = hex::encode(ring::rand::generate::<[u8; 16]>(&SystemRandom::new()).unwrap().expose());
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&s.cert_der)]});
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": user,
        "aud": SERVICE,
        "exp": now + LIFETIME_SECS,
        "nbf": now - 10,
        "iat": now,
        "jti": jti,
        "access": access,
    });
    let input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let sig = s.key.sign(&SystemRandom::new(), input.as_bytes()).expect("ECDSA signing");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

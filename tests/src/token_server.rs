//! A bearer-token server for the distribution registry's `auth: token:` mode, on 127.0.0.1.
//!
//! Key type: [`TokenServer`]. It answers `GET /token?service=…&scope=…` (HTTP basic auth
//! with one of its users) with a JWT signed ES256 by a key generated at start; the JWT's
//! header carries the key's self-signed certificate (`x5c`), and the same certificate is the
//! registry's `rootcertbundle`, so the registry trusts exactly this server's tokens.
//!
//! Users get `pull` on every repository they ask for and nothing else; anonymous or wrong
//! credentials get 401. Every request and every issued token is recorded, so tests can
//! count token fetches and search logs for the tokens.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use crate::proxy::read_head;

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
    requests: Mutex<Vec<String>>,
    issued: Mutex<Vec<String>>,
}

/// A running token server. See the module docs.
pub struct TokenServer {
    addr: String,
    bundle: PathBuf,
    state: Arc<State>,
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer").field("addr", &self.addr).finish_non_exhaustive()
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

        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State {
            users: users.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect(),
            key,
            cert_der: cert.der().to_vec(),
            requests: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        runtime.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(conn, &s).await;
                });
            }
        });
        Ok(TokenServer { addr, bundle, state, runtime: Some(runtime) })
    }

    /// The realm to configure in the registry: `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The certificate bundle the registry must trust (`rootcertbundle`).
    pub fn cert_bundle(&self) -> &Path {
        &self.bundle
    }

    /// The path and query of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Every token issued so far.
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Percent-decoding of a query component (`+` is a space).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn serve(mut conn: TcpStream, s: &State) -> std::io::Result<()> {
    let Some((head, _)) = read_head(&mut conn).await? else { return Ok(()) };
    let target = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
    s.requests.lock().unwrap().push(target.clone());
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut params: HashMap<String, Vec<String>> = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.entry(decode(k)).or_default().push(decode(v));
    }
    let user = head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if !k.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let b64 = v.trim().strip_prefix("Basic ")?;
        let decoded = String::from_utf8(STANDARD.decode(b64).ok()?).ok()?;
        let (u, p) = decoded.split_once(':')?;
        s.users.iter().any(|(uu, pp)| uu == u && pp == p).then(|| u.to_owned())
    });
    let (status, body) = match (path, user) {
        ("/token", Some(user)) => {
            let scopes = params.get("scope").cloned().unwrap_or_default();
            let token = sign(s, &user, &scopes);
            s.issued.lock().unwrap().push(token.clone());
            let body = serde_json::json!({"token": token, "expires_in": LIFETIME_SECS}).to_string();
            ("200 OK", body)
        }
        ("/token", None) => {
            ("401 Unauthorized", r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#.to_owned())
        }
        _ => ("404 Not Found", String::new()),
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(answer.as_bytes()).await?;
    conn.shutdown().await
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

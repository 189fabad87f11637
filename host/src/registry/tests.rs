//! The transport against a scripted HTTP server on loopback: authentication flows, token
//! caching, retries, resumption, the stall timeout and mirror fallback, with the embedded
//! content store underneath. (The integration tests in `tests/all/transport.rs` run the
//! same paths against Debian's registry, a token server and a fault-injecting proxy.)

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;
use crate::backend::{embedded, Backend, LeaseId};

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

/// What the server does with a request.
enum Reply {
    /// Status, headers, body.
    Full(u16, Vec<(String, String)>, Vec<u8>),
    /// Headers announcing `len` bytes, then only `body`, then the connection is closed.
    Cut(usize, Vec<u8>),
    /// Headers announcing `len` bytes, then `body`, then nothing for a long time.
    Stall(usize, Vec<u8>),
}

fn ok(body: &[u8]) -> Reply {
    Reply::Full(200, Vec::new(), body.to_vec())
}

fn status(code: u16) -> Reply {
    Reply::Full(code, Vec::new(), Vec::new())
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A scripted HTTP/1.1 server: one request per connection.
struct Server {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (handler, log) = (handler.clone(), log.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, handler, log).await;
                });
            }
        });
        Server { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(mut conn: TcpStream, handler: Handler, log: Arc<Mutex<Vec<Seen>>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut byte).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&byte[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_owned();
    let method = first.split(' ').next().unwrap_or_default().to_owned();
    let path = first.split(' ').nth(1).unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let seen = Seen { method, path, headers };
    log.lock().unwrap().push(seen.clone());
    let head = |code: u16, extra: &[(String, String)], len: usize| {
        let mut h = format!("HTTP/1.1 {code} X\r\nContent-Length: {len}\r\nConnection: close\r\n");
        for (k, v) in extra {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str("\r\n");
        h
    };
    match handler(&seen) {
        Reply::Full(code, extra, body) => {
            conn.write_all(head(code, &extra, body.len()).as_bytes()).await?;
            conn.write_all(&body).await?;
        }
        Reply::Cut(len, body) => {
            conn.write_all(head(200, &[], len).as_bytes()).await?;
            conn.write_all(&body).await?;
            conn.flush().await?;
        }
        Reply::Stall(len, body) => {
            conn.write_all(head(200, &[], len).as_bytes()).await?;
            conn.write_all(&body).await?;
            conn.flush().await?;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }
    conn.shutdown().await
}

/// A blob of `n` deterministic bytes and its descriptor.
fn blob(n: usize) -> (Vec<u8>, Descriptor) {
    let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
    let desc = Descriptor::of_bytes("application/vnd.oci.image.layer.v1.tar", &data);
    (data, desc)
}

const MANIFEST: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;

fn manifest_reply() -> Reply {
    Reply::Full(
        200,
        vec![("Content-Type".into(), "application/vnd.oci.image.manifest.v1+json".into())],
        MANIFEST.to_vec(),
    )
}

struct Store {
    _dir: tempfile::TempDir,
    backend: Backend,
    lease: LeaseId,
}

async fn store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let backend = embedded::open(dir.path()).unwrap();
    let lease = backend.leases.create().await.unwrap();
    Store { _dir: dir, backend, lease }
}

impl Store {
    /// A request's sink into this store, asking the registry with `credentials`.
    fn sink(&self, credentials: &Credentials) -> Sink {
        Sink::new(self.backend.content.clone(), self.lease.clone(), Arc::new(NoProgress), credentials.clone())
    }
}

fn client(hosts_dir: Option<&Path>) -> Client {
    Client::with_config(Config {
        hosts_dir: hosts_dir.map(Path::to_owned),
        stall_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(5),
        attempts: 3,
        backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        max_concurrent_downloads: DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    })
    .unwrap()
}

fn repo(addr: &str) -> Repository {
    Repository::parse(&format!("{addr}/team/app")).unwrap()
}

async fn fetch(c: &Client, s: &Store, addr: &str, desc: &Descriptor, creds: &Credentials) -> Result<()> {
    c.fetch(&repo(addr), desc, &s.sink(creds), None).await
}

async fn committed(s: &Store, digest: &Digest) -> bool {
    s.backend.content.info(digest).await.is_ok()
}

#[tokio::test]
async fn bearer_tokens_are_fetched_once_per_scope_and_credentials() {
    let (data, desc) = blob(3000);
    let token_requests = Arc::new(AtomicUsize::new(0));
    let tr = token_requests.clone();
    let realm = Arc::new(Mutex::new(String::new()));
    let r = realm.clone();
    let server = Server::start(move |req| {
        if req.path.starts_with("/token") {
            tr.fetch_add(1, Ordering::SeqCst);
            // alice:s3cret
            return match req.headers.get("authorization").map(String::as_str) {
                Some("Basic YWxpY2U6czNjcmV0") => ok(br#"{"token":"tok-for-alice","expires_in":300}"#),
                _ => status(401),
            };
        }
        if req.headers.get("authorization").map(String::as_str) != Some("Bearer tok-for-alice") {
            let challenge = format!(
                r#"Bearer realm="{}",service="test-registry",scope="repository:team/app:pull""#,
                r.lock().unwrap()
            );
            return Reply::Full(
                401,
                vec![("WWW-Authenticate".into(), challenge)],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.to_vec(),
            );
        }
        if req.path.contains("/manifests/") {
            manifest_reply()
        } else {
            ok(&data)
        }
    })
    .await;
    *realm.lock().unwrap() = format!("http://{}/token", server.addr);
    let (c, s) = (client(None), store().await);
    let alice = Credentials::basic(&server.addr, "alice", "s3cret");

    let desc_m = c.resolve(&repo(&server.addr), "1.0", &s.sink(&alice)).await.unwrap();
    assert_eq!(desc_m.digest, Digest::sha256_of(MANIFEST));
    fetch(&c, &s, &server.addr, &desc, &alice).await.unwrap();
    assert!(committed(&s, &desc.digest).await);
    assert_eq!(token_requests.load(Ordering::SeqCst), 1, "one token for the scope: {:#?}", server.seen());
    let token_query = server.seen().into_iter().find(|r| r.path.starts_with("/token")).unwrap().path;
    assert!(
        token_query.contains("service=test-registry") && token_query.contains("scope=repository%3Ateam%2Fapp%3Apull"),
        "{token_query}"
    );

    // Anonymous requests do not reuse alice's token: they ask for their own and are refused.
    let err = c.resolve(&repo(&server.addr), "1.0", &s.sink(&Credentials::anonymous())).await.unwrap_err();
    assert_eq!(err.code(), crate::error::Code::PermissionDenied, "{err}");
    assert_eq!(token_requests.load(Ordering::SeqCst), 2);
    // Wrong credentials: refused, and the message holds no secret.
    let err = c
        .resolve(&repo(&server.addr), "1.0", &s.sink(&Credentials::basic(&server.addr, "alice", "wrong-pw")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), crate::error::Code::PermissionDenied);
    let msg = err.chain();
    assert!(!msg.contains("wrong-pw") && !msg.contains("s3cret") && msg.contains("refused the credentials"), "{msg}");
}

#[tokio::test]
async fn a_refused_cached_token_is_replaced_once() {
    let (data, desc) = blob(100);
    let issued = Arc::new(AtomicUsize::new(0));
    let iss = issued.clone();
    let accepted = Arc::new(AtomicUsize::new(1));
    let acc = accepted.clone();
    let realm = Arc::new(Mutex::new(String::new()));
    let r = realm.clone();
    let server = Server::start(move |req| {
        if req.path.starts_with("/token") {
            let n = iss.fetch_add(1, Ordering::SeqCst) + 1;
            return ok(format!(r#"{{"access_token":"t{n}"}}"#).as_bytes());
        }
        let want = format!("Bearer t{}", acc.load(Ordering::SeqCst));
        if req.headers.get("authorization") != Some(&want) {
            let challenge = format!(r#"Bearer realm="{}",service="s""#, r.lock().unwrap());
            return Reply::Full(401, vec![("WWW-Authenticate".into(), challenge)], Vec::new());
        }
        if req.path.contains("/manifests/") {
            manifest_reply()
        } else {
            ok(&data)
        }
    })
    .await;
    *realm.lock().unwrap() = format!("http://{}/token", server.addr);
    let (c, s) = (client(None), store().await);
    let anon = Credentials::anonymous();
    c.resolve(&repo(&server.addr), "1.0", &s.sink(&anon)).await.unwrap();
    assert_eq!(issued.load(Ordering::SeqCst), 1);
    // The registry now wants the next token: the cached one is refused, dropped, replaced.
    accepted.store(2, Ordering::SeqCst);
    fetch(&c, &s, &server.addr, &desc, &anon).await.unwrap();
    assert_eq!(issued.load(Ordering::SeqCst), 2);
    // A registry that refuses every token: one retry, then a permission error.
    accepted.store(99, Ordering::SeqCst);
    let (_, other) = blob(101);
    let err = fetch(&c, &s, &server.addr, &other, &anon).await.unwrap_err();
    assert_eq!(err.code(), crate::error::Code::PermissionDenied, "{err}");
    assert_eq!(issued.load(Ordering::SeqCst), 3, "exactly one new token after the refusal");
}

#[tokio::test]
async fn basic_auth_after_the_challenge_then_up_front() {
    let (data, desc) = blob(10);
    let server = Server::start(move |req| {
        // bob:pw
        if req.headers.get("authorization").map(String::as_str) != Some("Basic Ym9iOnB3") {
            return Reply::Full(401, vec![("WWW-Authenticate".into(), r#"Basic realm="r""#.into())], Vec::new());
        }
        ok(&data)
    })
    .await;
    let (c, s) = (client(None), store().await);
    let err = fetch(&c, &s, &server.addr, &desc, &Credentials::anonymous()).await.unwrap_err();
    assert!(err.chain().contains("no credentials for this host"), "{}", err.chain());
    let bob =
        Credentials::from_auth_config(&AuthConfig { auth: "Ym9iOnB3".into(), ..Default::default() }, &server.addr)
            .unwrap();
    fetch(&c, &s, &server.addr, &desc, &bob).await.unwrap();
    let before = server.seen().len();
    let (data2, desc2) = blob(11);
    drop(data2);
    // The host is known to want basic auth: the next request authenticates at once (and
    // gets the 10-byte blob, whose size does not match: a fatal mismatch, not a retry).
    let err = fetch(&c, &s, &server.addr, &desc2, &bob).await.unwrap_err();
    assert_eq!(err.code(), crate::error::Code::FailedPrecondition, "{err}");
    assert_eq!(server.seen().len(), before + 1);
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff() {
    let (data, desc) = blob(500);
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let server =
        Server::start(move |_| if c2.fetch_add(1, Ordering::SeqCst) < 2 { status(503) } else { ok(&data) }).await;
    let (c, s) = (client(None), store().await);
    fetch(&c, &s, &server.addr, &desc, &Credentials::anonymous()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Always 503: `attempts` tries, then the error.
    let always = Server::start(|_| status(503)).await;
    let (_, other) = blob(501);
    let err = fetch(&c, &s, &always.addr, &other, &Credentials::anonymous()).await.unwrap_err();
    assert_eq!(err.code(), crate::error::Code::Unavailable);
    assert_eq!(always.seen().len(), 3);
    assert!(!committed(&s, &other.digest).await);
}

#[tokio::test]
async fn broken_downloads_resume_with_range() {
    let (data, desc) = blob(10_000);
    let d = data.clone();
    let server = Server::start(move |req| match req.headers.get("range") {
        None => Reply::Cut(d.len(), d[..4000].to_vec()),
        Some(r) => {
            let start: usize = r.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
            let range = format!("bytes {start}-{}/{}", d.len() - 1, d.len());
            Reply::Full(206, vec![("Content-Range".into(), range)], d[start..].to_vec())
        }
    })
    .await;
    let (c, s) = (client(None), store().await);
    fetch(&c, &s, &server.addr, &desc, &Credentials::anonymous()).await.unwrap();
    assert!(committed(&s, &desc.digest).await);
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[1].headers.get("range").map(String::as_str), Some("bytes=4000-"));
}

#[tokio::test]
async fn stalled_bodies_fail_the_download() {
    let (data, desc) = blob(10_000);
    let server = Server::start(move |_| Reply::Stall(data.len(), data[..100].to_vec())).await;
    let (c, s) = (client(None), store().await);
    let started = std::time::Instant::now();
    let err = fetch(&c, &s, &server.addr, &desc, &Credentials::anonymous()).await.unwrap_err();
    assert!(err.to_string().contains("stalled") && err.to_string().contains("500ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(server.seen().len(), 1, "a stall is not retried");
    assert!(!committed(&s, &desc.digest).await);
}

#[tokio::test]
async fn corrupt_bytes_are_never_committed() {
    let (mut data, desc) = blob(1000);
    data[500] ^= 0xff;
    let server = Server::start(move |_| ok(&data)).await;
    let (c, s) = (client(None), store().await);
    let err = fetch(&c, &s, &server.addr, &desc, &Credentials::anonymous()).await.unwrap_err();
    assert_eq!(err.code(), crate::error::Code::FailedPrecondition, "{err}");
    assert_eq!(server.seen().len(), 1, "a digest mismatch is not retried");
    assert!(!committed(&s, &desc.digest).await);
}

#[tokio::test]
async fn mirrors_first_then_the_upstream() {
    let (data, desc) = blob(64);
    let mirror = Server::start(|_| status(404)).await;
    let upstream =
        Server::start(move |req| if req.path.contains("/manifests/") { manifest_reply() } else { ok(&data) }).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join(&upstream.addr);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("hosts.toml"),
        format!("server = \"http://{}\"\n[host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\nheader = {{ X-Mirror-Test = \"yes\" }}\n", upstream.addr, mirror.addr),
    )
    .unwrap();
    let (c, s) = (client(Some(dir.path())), store().await);
    c.resolve(&repo(&upstream.addr), "1.0", &s.sink(&Credentials::anonymous())).await.unwrap();
    fetch(&c, &s, &upstream.addr, &desc, &Credentials::anonymous()).await.unwrap();
    let asked = mirror.seen();
    assert_eq!(asked.len(), 2, "{asked:#?}");
    let ns = format!("?ns={}", upstream.addr.replace(':', "%3A"));
    assert!(asked[0].path.ends_with(&ns) && asked[1].path.ends_with(&ns), "{asked:#?}");
    assert_eq!(asked[0].headers.get("x-mirror-test").map(String::as_str), Some("yes"));
    // The upstream's HEAD answer names no digest: the manifest is fetched with GET.
    let upstream_asked: Vec<_> = upstream.seen().into_iter().map(|r| r.method).collect();
    assert_eq!(upstream_asked, ["HEAD", "GET", "GET"]);

    // A mirror without `resolve` is not asked for tags.
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\ncapabilities = [\"pull\"]\n",
            upstream.addr, mirror.addr
        ),
    )
    .unwrap();
    c.resolve(&repo(&upstream.addr), "1.0", &s.sink(&Credentials::anonymous())).await.unwrap();
    assert_eq!(mirror.seen().len(), 2);
}

#[test]
fn content_ranges_parse() {
    assert_eq!(range_start("bytes 4000-9999/10000"), Some(4000));
    assert_eq!(range_start("bytes */10000"), None);
    assert_eq!(seconds(Duration::from_secs(2)), "2s");
    assert_eq!(seconds(Duration::from_millis(1500)), "1500ms");
}

/// A registry that wants basic auth from bob (`bob:pw`) and serves the manifest and `data`.
fn bob_registry(data: Vec<u8>) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    move |req| {
        if req.headers.get("authorization").map(String::as_str) != Some("Basic Ym9iOnB3") {
            return Reply::Full(401, vec![("WWW-Authenticate".into(), r#"Basic realm="r""#.into())], Vec::new());
        }
        if req.path.contains("/manifests/") {
            manifest_reply()
        } else {
            ok(&data)
        }
    }
}

/// bob's credentials as the CRI sends them (no `server_address`), for a request whose
/// reference names `registry`.
fn bob_for(registry: &str) -> Credentials {
    Credentials::from_auth_config(&AuthConfig { auth: "Ym9iOnB3".into(), ..Default::default() }, registry).unwrap()
}

/// The puller names the registry of each resolve and fetch. A request for registry A whose
/// puller names registry B (which asks for credentials just as A does) must not hand A's
/// credentials to B.
#[tokio::test]
async fn credentials_without_a_server_address_stay_with_the_request_registry() {
    let (data, desc) = blob(32);
    let a = Server::start(bob_registry(data.clone())).await;
    let b = Server::start(bob_registry(data)).await;
    let (c, s) = (client(None), store().await);
    // The registry as the host reads it from the request's reference.
    let creds = bob_for(&reference_registry(&format!("{}/team/app:1.0", a.addr)));

    c.resolve(&repo(&a.addr), "1.0", &s.sink(&creds)).await.unwrap();
    fetch(&c, &s, &a.addr, &desc, &creds).await.unwrap();
    assert!(a.seen().iter().any(|r| r.headers.contains_key("authorization")), "A never got the credentials");

    let err = c.resolve(&repo(&b.addr), "1.0", &s.sink(&creds)).await.unwrap_err();
    assert_eq!(err.code(), crate::error::Code::PermissionDenied, "{err}");
    assert!(err.chain().contains("no credentials for this host"), "{}", err.chain());
    let (_, other) = blob(33);
    fetch(&c, &s, &b.addr, &other, &creds).await.unwrap_err();
    let seen = b.seen();
    assert!(seen.len() >= 2, "{seen:#?}");
    assert!(seen.iter().all(|r| !r.headers.contains_key("authorization")), "B got A's credentials: {seen:#?}");
}

/// Credentials for the registry go to its upstream, never to a mirror of `hosts.toml`, even
/// one that asks for them; the mirror's own `header` is how it is given any.
#[tokio::test]
async fn mirrors_get_no_registry_credentials() {
    let (data, desc) = blob(48);
    let upstream = Server::start(bob_registry(data.clone())).await;
    let mirror = Server::start(bob_registry(data)).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join(&upstream.addr);
    std::fs::create_dir_all(&d).unwrap();
    let hosts = |mirror_headers: &str| {
        format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n{mirror_headers}",
            upstream.addr, mirror.addr
        )
    };
    std::fs::write(d.join("hosts.toml"), hosts("")).unwrap();
    let (c, s) = (client(Some(dir.path())), store().await);
    let creds = bob_for(&upstream.addr);
    c.resolve(&repo(&upstream.addr), "1.0", &s.sink(&creds)).await.unwrap();
    fetch(&c, &s, &upstream.addr, &desc, &creds).await.unwrap();
    let asked = mirror.seen();
    assert!(asked.len() >= 2, "the mirror was not tried first: {asked:#?}");
    assert!(
        asked.iter().all(|r| !r.headers.contains_key("authorization")),
        "the mirror got the credentials: {asked:#?}"
    );
    assert!(upstream
        .seen()
        .iter()
        .any(|r| r.headers.get("authorization").map(String::as_str) == Some("Basic Ym9iOnB3")));

    // Configured for the mirror: its `header` authenticates it, and the upstream is not asked.
    std::fs::write(d.join("hosts.toml"), hosts("header = { Authorization = \"Basic Ym9iOnB3\" }\n")).unwrap();
    let before = upstream.seen().len();
    c.resolve(&repo(&upstream.addr), "1.0", &s.sink(&Credentials::anonymous())).await.unwrap();
    assert_eq!(upstream.seen().len(), before, "the mirror with its header served the manifest");
}

/// Blob storage behind a redirect: `Authorization` and the host's `hosts.toml` headers stay
/// on the registry's origin; `Range` goes along; a redirect on the same origin keeps them.
#[tokio::test]
async fn redirects_to_another_host_carry_no_credentials_or_configured_headers() {
    let (data, desc) = blob(4000);
    let d = data.clone();
    let storage = Server::start(move |req| match req.headers.get("range") {
        None => Reply::Cut(d.len(), d[..1500].to_vec()),
        Some(r) => {
            let start: usize = r.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
            let range = format!("bytes {start}-{}/{}", d.len() - 1, d.len());
            Reply::Full(206, vec![("Content-Range".into(), range)], d[start..].to_vec())
        }
    })
    .await;
    let storage_url = format!("http://{}/bucket/blob?X-Signature=s1gn3d", storage.addr);
    let registry = Server::start(move |req| {
        if req.headers.get("authorization").map(String::as_str) != Some("Basic Ym9iOnB3") {
            return Reply::Full(401, vec![("WWW-Authenticate".into(), r#"Basic realm="r""#.into())], Vec::new());
        }
        if req.path.starts_with("/v2/team/app/blobs/") {
            // First to another path of the same origin, then to the storage.
            return Reply::Full(302, vec![("Location".into(), "/same-origin/blob".into())], Vec::new());
        }
        Reply::Full(307, vec![("Location".into(), storage_url.clone())], Vec::new())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let hd = dir.path().join(&registry.addr);
    std::fs::create_dir_all(&hd).unwrap();
    std::fs::write(hd.join("hosts.toml"), "header = { X-Registry-Secret = \"hdr-s3cret\" }\n").unwrap();
    let (c, s) = (client(Some(dir.path())), store().await);
    fetch(&c, &s, &registry.addr, &desc, &bob_for(&registry.addr)).await.unwrap();
    assert!(committed(&s, &desc.digest).await);

    let on_registry = registry.seen();
    let same_origin: Vec<&Seen> = on_registry.iter().filter(|r| r.path == "/same-origin/blob").collect();
    assert!(!same_origin.is_empty(), "{on_registry:#?}");
    for r in same_origin {
        assert_eq!(r.headers.get("authorization").map(String::as_str), Some("Basic Ym9iOnB3"), "{r:#?}");
        assert_eq!(r.headers.get("x-registry-secret").map(String::as_str), Some("hdr-s3cret"), "{r:#?}");
    }
    let on_storage = storage.seen();
    assert_eq!(on_storage.len(), 2, "one cut download and its resumption: {on_storage:#?}");
    for r in &on_storage {
        assert_eq!(r.path, "/bucket/blob?X-Signature=s1gn3d");
        assert!(!r.headers.contains_key("authorization"), "the storage got the credentials: {r:#?}");
        assert!(!r.headers.contains_key("x-registry-secret"), "the storage got a hosts.toml header: {r:#?}");
        assert!(!r.headers.contains_key("referer"), "{r:#?}");
    }
    assert_eq!(on_storage[1].headers.get("range").map(String::as_str), Some("bytes=1500-"));
}

/// A redirect target that asks for credentials gets none; a redirect loop ends.
#[tokio::test]
async fn redirect_targets_are_not_answered_and_loops_end() {
    let (_, desc) = blob(10);
    let other =
        Server::start(|_| Reply::Full(401, vec![("WWW-Authenticate".into(), r#"Basic realm="r""#.into())], Vec::new()))
            .await;
    let to = format!("http://{}/elsewhere", other.addr);
    let registry = Server::start(move |_| Reply::Full(307, vec![("Location".into(), to.clone())], Vec::new())).await;
    let (c, s) = (client(None), store().await);
    let err = fetch(&c, &s, &registry.addr, &desc, &bob_for(&registry.addr)).await.unwrap_err();
    assert_eq!(err.code(), crate::error::Code::PermissionDenied, "{err}");
    assert!(err.chain().contains("redirected to"), "{}", err.chain());
    assert!(other.seen().iter().all(|r| !r.headers.contains_key("authorization")), "{:#?}", other.seen());
    assert_eq!(other.seen().len(), 1, "the target's challenge was answered: {:#?}", other.seen());

    let looping =
        Server::start(|req| Reply::Full(302, vec![("Location".into(), format!("{}x", req.path))], Vec::new())).await;
    let err = fetch(&c, &s, &looping.addr, &desc, &Credentials::anonymous()).await.unwrap_err();
    assert!(err.chain().contains(&format!("more than {MAX_REDIRECTS} times")), "{}", err.chain());
    assert_eq!(looping.seen().len(), MAX_REDIRECTS + 1);
}

#[test]
fn distribution_sources_merge_like_containerd() {
    assert_eq!(merge_source(None, "team/app").as_deref(), Some("team/app"));
    assert_eq!(merge_source(Some(""), "team/app").as_deref(), Some("team/app"));
    assert_eq!(merge_source(Some("team/app"), "team/app"), None);
    assert_eq!(merge_source(Some("team/b"), "team/a").as_deref(), Some("team/a,team/b"));
    assert_eq!(merge_source(Some("team/a,team/c"), "team/b").as_deref(), Some("team/a,team/b,team/c"));
    assert_eq!(merge_source(Some("team/a,team/b"), "team/b"), None);
}

/// A `HEAD` that names a stored manifest's digest is the only request of a re-resolve; one
/// that names another digest is followed by a `GET` of that digest.
#[tokio::test]
async fn stored_manifests_resolve_with_head_alone() {
    let digest = Arc::new(Mutex::new(Digest::sha256_of(MANIFEST).to_string()));
    let d = digest.clone();
    let server = Server::start(move |_| {
        Reply::Full(
            200,
            vec![
                ("Content-Type".into(), "application/vnd.oci.image.manifest.v1+json".into()),
                ("Docker-Content-Digest".into(), d.lock().unwrap().clone()),
            ],
            MANIFEST.to_vec(),
        )
    })
    .await;
    let (c, s) = (client(None), store().await);
    let asked = || server.seen().into_iter().map(|r| format!("{} {}", r.method, r.path)).collect::<Vec<_>>();
    let (r, anon) = (repo(&server.addr), Credentials::anonymous());
    let sink = s.sink(&anon);
    let resolve = || c.resolve(&r, "1.0", &sink);
    let first = resolve().await.unwrap();
    assert_eq!(first.digest, Digest::sha256_of(MANIFEST));
    let get = format!("GET /v2/team/app/manifests/{}", first.digest);
    assert_eq!(asked(), ["HEAD /v2/team/app/manifests/1.0".to_owned(), get.clone()]);
    assert_eq!(resolve().await.unwrap(), first);
    assert_eq!(asked().len(), 3);
    assert_eq!(asked()[2], "HEAD /v2/team/app/manifests/1.0");

    // The tag moved (the HEAD names a digest not stored): GET by that digest, which must match.
    let other = Digest::sha256_of(b"another manifest").to_string();
    *digest.lock().unwrap() = other.clone();
    let err = resolve().await.unwrap_err();
    assert_eq!(err.code(), crate::error::Code::FailedPrecondition, "{err}");
    assert_eq!(asked()[4], format!("GET /v2/team/app/manifests/{other}"));
}

/// An index listing one signature referrer and one SBOM, as a referrers answer.
fn referrers_index() -> Vec<u8> {
    let entry = |t: &str, c: char| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":42,"artifactType":"{t}"}}"#,
            c.to_string().repeat(64)
        )
    };
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{},{}]}}"#,
        entry("application/vnd.dev.cosign.artifact.sig.v1+json", 'a'),
        entry("application/spdx+json", 'b')
    )
    .into_bytes()
}

#[tokio::test]
async fn referrers_come_from_the_api_or_the_tag_schema_or_are_none() {
    let subject = Digest::sha256_of(b"subject");
    let sig_type = "application/vnd.dev.cosign.artifact.sig.v1+json";
    let c = client(None);

    // The referrers API, filtered by the registry's answer and again here.
    let api =
        Server::start(|req| if req.path.contains("/referrers/") { ok(&referrers_index()) } else { status(404) }).await;
    let found = c.referrers(&repo(&api.addr), &subject, sig_type, &Credentials::anonymous()).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].artifact_type, sig_type);
    let asked = api.seen()[0].path.clone();
    assert_eq!(
        asked,
        format!("/v2/team/app/referrers/{subject}?artifactType=application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson")
    );

    // No API (404): the `sha256-<hex>` tag.
    let tag_path = format!("/v2/team/app/manifests/sha256-{}", subject.hex());
    let tp = tag_path.clone();
    let schema = Server::start(move |req| if req.path == tp { ok(&referrers_index()) } else { status(404) }).await;
    let found = c.referrers(&repo(&schema.addr), &subject, "", &Credentials::anonymous()).await.unwrap();
    assert_eq!(found.len(), 2, "no filter: both");
    assert_eq!(schema.seen().last().unwrap().path, tag_path);

    // Neither: none. A server error is not "none".
    let none = Server::start(|_| status(404)).await;
    assert!(c.referrers(&repo(&none.addr), &subject, "", &Credentials::anonymous()).await.unwrap().is_empty());
    let broken = Server::start(|_| status(500)).await;
    assert!(matches!(
        c.referrers(&repo(&broken.addr), &subject, "", &Credentials::anonymous()).await,
        Err(Error::Unavailable { .. })
    ));
    // A filter that is not a media type never reaches the wire.
    assert!(matches!(
        c.referrers(&repo(&none.addr), &subject, "a/b?x=y", &Credentials::anonymous()).await,
        Err(Error::InvalidArgument(_))
    ));
}

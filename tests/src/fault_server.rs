//! The tests' one HTTP server on 127.0.0.1: a proxy in front of a real registry that injects
//! faults, holds downloads part-way, counts and records requests; or, without an upstream, a
//! server whose routes the test writes (the bearer-token endpoint of [`crate::token_server`])
//! and that answers everything else `404`, as late as the test wants.
//!
//! Key types: [`FaultServer`] ([`FaultServer::proxy`] in front of an upstream `host:port`,
//! [`FaultServer::local`] without one), [`Fault`] (what to do to a matching request, armed with
//! [`FaultServer::inject`] for requests whose path contains a string, a number of times),
//! [`Answer`] (what a route answers) and [`Logged`] (every request it saw, in order).
//!
//! - Faults: a wrong status without asking the upstream, a delay, a reset (RST) or a stall
//!   after some body bytes, a corrupted body byte. The fault is chosen when the request
//!   arrives: the first armed rule whose string the path contains uses up one of its times.
//! - Gates: [`FaultServer::hold`] stops the response bodies of requests whose path contains a
//!   string after some bytes until [`FaultServer::release`]; a pull is held in a known state
//!   (half a layer written, its snapshot prepared), then completed, with no timeout involved.
//!   Gates are looked at for every chunk, so one armed while a download runs still holds it.
//! - Counting: blob `GET`s in flight ([`FaultServer::max_blob_gets_in_flight`]), downloads
//!   started ([`FaultServer::downloads`]).
//!
//! It speaks just enough HTTP/1.1 for a registry client: one request per connection (requests
//! are forwarded with `Connection: close` and answered with it), heads parsed with `httparse`,
//! bodies relayed byte for byte so that faults land at exact body offsets and a reset is a
//! real RST (a server library would hide both). It runs on a tokio runtime of its own, so the
//! synchronous tests start it like any other server; it may be started inside another runtime
//! too. Dropping it stops everything, stalled and held connections included.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// The largest request or response head accepted.
const MAX_HEAD: usize = 64 << 10;

/// The most headers a head may have.
const MAX_HEADERS: usize = 100;

/// How long a reset waits after the last bytes it lets through, so the client reads them
/// before the RST arrives.
const RESET_GRACE: Duration = Duration::from_millis(300);

/// What the server does to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an empty body, without asking the upstream.
    Status(u16),
    /// Forward; after this many body bytes (given time to arrive) reset the connection.
    ResetAfter(u64),
    /// Forward; invert the body byte at this offset.
    CorruptAt(u64),
    /// Forward; after this many body bytes send nothing more, holding the connection open.
    StallAfter(u64),
    /// Wait this many milliseconds, then forward (or answer).
    Delay(u64),
}

/// One request the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// The `Range` header, if any (a resumed download).
    pub range: Option<String>,
    /// Whether the request carried an `Authorization` header.
    pub authorized: bool,
    /// The names of the request's headers, lowercase, in order.
    pub headers: Vec<String>,
    /// The fault applied to it, if any.
    pub fault: Option<Fault>,
}

/// A parsed request or response head.
#[derive(Debug, Clone)]
pub struct Head {
    /// The request or status line.
    pub line: String,
    /// Name and value of each header, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// A request's method and target (path and query).
    pub fn method_and_target(&self) -> (&str, &str) {
        let mut words = self.line.split(' ');
        (words.next().unwrap_or_default(), words.next().unwrap_or_default())
    }

    /// A request's query parameters, percent-decoded, in order.
    pub fn query(&self) -> Vec<(String, String)> {
        let target = self.method_and_target().1;
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
        form_urlencoded::parse(query.as_bytes()).into_owned().collect()
    }

    /// The head with `Connection: close` instead of any connection header.
    fn closing(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.line);
        for (k, v) in &self.headers {
            if !["connection", "keep-alive", "proxy-connection"].iter().any(|h| k.eq_ignore_ascii_case(h)) {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }
}

/// What a route answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    /// A JSON answer.
    pub fn json(status: u16, body: impl Into<String>) -> Answer {
        Answer { status, content_type: "application/json", body: body.into() }
    }

    fn bytes(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Injected",
    }
}

type Route = Arc<dyn Fn(&Head) -> Answer + Send + Sync>;

struct Rule {
    needle: String,
    fault: Fault,
    remaining: usize,
}

struct Gate {
    needle: String,
    after: u64,
    open: bool,
}

#[derive(Default)]
struct State {
    /// Where unrouted requests go; `None` answers them `404`.
    upstream: Option<String>,
    /// Exact paths (without the query) the server answers itself.
    routes: Mutex<Vec<(String, Route)>>,
    rules: Mutex<Vec<Rule>>,
    gates: Mutex<Vec<Gate>>,
    gates_changed: Notify,
    held: AtomicUsize,
    log: Mutex<Vec<Logged>>,
    /// Blob GETs in flight now, and the most there ever were.
    blob_gets: Mutex<(usize, usize)>,
}

impl State {
    /// The body offset at which a closed gate holds `path`, if one does.
    fn gate_for(&self, path: &str) -> Option<u64> {
        self.gates.lock().unwrap().iter().find(|g| !g.open && path.contains(&g.needle)).map(|g| g.after)
    }

    /// Waits until no closed gate matches `path`.
    async fn wait_open(&self, path: &str) {
        self.held.fetch_add(1, Ordering::SeqCst);
        while self.gate_for(path).is_some() {
            // A release between the check and the wait is caught by the timeout.
            let _ = tokio::time::timeout(Duration::from_millis(200), self.gates_changed.notified()).await;
        }
        self.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One blob GET in flight; counted down when dropped, however the request ends.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn new(state: &'a State) -> Self {
        let mut n = state.blob_gets.lock().unwrap();
        n.0 += 1;
        n.1 = n.1.max(n.0);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.blob_gets.lock().unwrap().0 -= 1;
    }
}

/// A running server. See the module docs.
pub struct FaultServer {
    addr: String,
    state: Arc<State>,
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for FaultServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultServer")
            .field("addr", &self.addr)
            .field("upstream", &self.state.upstream)
            .finish_non_exhaustive()
    }
}

impl FaultServer {
    /// Starts a proxy on a free port of 127.0.0.1 that forwards to `upstream` (`host:port`).
    pub fn proxy(upstream: &str) -> Result<FaultServer> {
        Self::start(Some(upstream.to_owned()))
    }

    /// Starts a server with no upstream: it answers its routes ([`FaultServer::route`]) and
    /// everything else `404` with the body `{}`.
    pub fn local() -> Result<FaultServer> {
        Self::start(None)
    }

    fn start(upstream: Option<String>) -> Result<FaultServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr: SocketAddr = listener.local_addr()?;
        let state = Arc::new(State { upstream, ..State::default() });
        let s = state.clone();
        runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else { return };
            while let Ok((conn, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = handle(conn, &s).await;
                });
            }
        });
        Ok(FaultServer { addr: addr.to_string(), state, runtime: Some(runtime) })
    }

    /// `127.0.0.1:PORT`: the registry address to pull from.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Answers requests for exactly `path` (the query aside) with `answer` instead of
    /// forwarding them. Faults apply to them as to any request.
    pub fn route(&self, path: &str, answer: impl Fn(&Head) -> Answer + Send + Sync + 'static) {
        self.state.routes.lock().unwrap().push((path.to_owned(), Arc::new(answer)));
    }

    /// Applies `fault` to the next `times` requests whose path contains `path_contains`.
    pub fn inject(&self, path_contains: &str, fault: Fault, times: usize) {
        self.state.rules.lock().unwrap().push(Rule { needle: path_contains.to_owned(), fault, remaining: times });
    }

    /// Holds the response bodies of requests whose path contains `needle` after `after`
    /// bytes, until [`FaultServer::release`].
    pub fn hold(&self, needle: &str, after: u64) {
        self.state.gates.lock().unwrap().push(Gate { needle: needle.to_owned(), after, open: false });
    }

    /// Lets the responses held for `needle` go on (and those to come pass).
    pub fn release(&self, needle: &str) {
        for gate in self.state.gates.lock().unwrap().iter_mut().filter(|g| g.needle == needle) {
            gate.open = true;
        }
        self.state.gates_changed.notify_waiters();
    }

    /// How many responses are being held right now.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    /// The requests whose path contains `needle`.
    pub fn requests_for(&self, needle: &str) -> Vec<Logged> {
        self.requests().into_iter().filter(|r| r.path.contains(needle)).collect()
    }

    /// The `GET`s whose path contains `needle` that started a download (no `Range`).
    pub fn downloads(&self, needle: &str) -> usize {
        self.requests().iter().filter(|r| r.method == "GET" && r.range.is_none() && r.path.contains(needle)).count()
    }

    /// The most blob `GET`s that were ever in flight at once.
    pub fn max_blob_gets_in_flight(&self) -> usize {
        self.state.blob_gets.lock().unwrap().1
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Which head [`read_head`] parses.
#[derive(Clone, Copy)]
enum Kind {
    Request,
    Response,
}

/// Reads an HTTP head (through the blank line) and parses it; returns it and any bytes read
/// after it. `None` when the peer closed before sending anything.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R, kind: Kind) -> io::Result<Option<(Head, Vec<u8>)>> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let parsed = parse(kind, &buf).map_err(|e| invalid(e.to_string()))?;
        if let Some((head, len)) = parsed {
            let rest = buf.split_off(len);
            return Ok(Some((head, rest)));
        }
        if buf.len() > MAX_HEAD {
            return Err(invalid("head too large".to_owned()));
        }
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a head"))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A complete head at the start of `buf` and its length; `None` when `buf` holds only part
/// of one.
fn parse(kind: Kind, buf: &[u8]) -> Result<Option<(Head, usize)>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (status, line, headers) = match kind {
        Kind::Request => {
            let mut r = httparse::Request::new(&mut headers);
            (
                r.parse(buf)?,
                format!("{} {} HTTP/1.1", r.method.unwrap_or_default(), r.path.unwrap_or_default()),
                r.headers,
            )
        }
        Kind::Response => {
            let mut r = httparse::Response::new(&mut headers);
            (
                r.parse(buf)?,
                format!("HTTP/1.1 {} {}", r.code.unwrap_or_default(), r.reason.unwrap_or_default()),
                r.headers,
            )
        }
    };
    let httparse::Status::Complete(len) = status else { return Ok(None) };
    let headers = headers.iter().map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).trim().to_owned()));
    Ok(Some((Head { line, headers: headers.collect() }, len)))
}

async fn handle(mut client: TcpStream, state: &State) -> io::Result<()> {
    let Some((head, rest)) = read_head(&mut client, Kind::Request).await? else { return Ok(()) };
    let (method, path) = head.method_and_target();
    let (method, path) = (method.to_owned(), path.to_owned());
    let fault = {
        let mut rules = state.rules.lock().unwrap();
        let hit = rules.iter_mut().find(|r| r.remaining > 0 && path.contains(&r.needle));
        hit.map(|r| {
            r.remaining -= 1;
            r.fault
        })
    };
    let _in_flight = (method == "GET" && path.contains("/blobs/")).then(|| InFlight::new(state));
    state.log.lock().unwrap().push(Logged {
        method,
        path: path.clone(),
        range: head.header("range").map(str::to_owned),
        authorized: head.header("authorization").is_some(),
        headers: head.headers.iter().map(|(k, _)| k.to_ascii_lowercase()).collect(),
        fault,
    });
    if let Some(Fault::Status(code)) = fault {
        client.write_all(&Answer { status: code, content_type: "text/plain", body: String::new() }.bytes()).await?;
        return client.shutdown().await;
    }
    if let Some(Fault::Delay(ms)) = fault {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let route = {
        let bare = path.split('?').next().unwrap_or_default();
        state.routes.lock().unwrap().iter().find(|(p, _)| p == bare).map(|(_, r)| r.clone())
    };
    let upstream = match (route, &state.upstream) {
        (Some(route), _) => {
            client.write_all(&route(&head).bytes()).await?;
            return client.shutdown().await;
        }
        (None, None) => {
            client.write_all(&Answer::json(404, "{}").bytes()).await?;
            return client.shutdown().await;
        }
        (None, Some(upstream)) => upstream,
    };

    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(&head.closing()).await?;
    let body_len: u64 = head.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    up.write_all(&rest).await?;
    let more = body_len.saturating_sub(rest.len() as u64);
    tokio::io::copy(&mut (&mut client).take(more), &mut up).await?;
    let Some((response, pending)) = read_head(&mut up, Kind::Response).await? else { return Ok(()) };
    client.write_all(&response.closing()).await?;
    relay(client, up, pending, &path, fault, state).await
}

/// Relays the upstream's response body to the client, applying `fault` and the gates.
async fn relay(
    mut client: TcpStream,
    mut up: TcpStream,
    mut pending: Vec<u8>,
    path: &str,
    fault: Option<Fault>,
    state: &State,
) -> io::Result<()> {
    let mut sent: u64 = 0;
    let mut corrupted = false;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        if pending.is_empty() {
            let n = up.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n]);
        }
        let len = pending.len() as u64;
        match fault {
            Some(Fault::CorruptAt(at)) if !corrupted && (sent..sent + len).contains(&at) => {
                pending[(at - sent) as usize] ^= 0xff;
                corrupted = true;
            }
            Some(Fault::ResetAfter(at)) | Some(Fault::StallAfter(at)) if sent + len > at => {
                client.write_all(&pending[..(at - sent) as usize]).await?;
                client.flush().await?;
                if let Some(Fault::StallAfter(_)) = fault {
                    // Hold both connections until the server is dropped.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return Ok(());
                }
                // Let the client read what was sent, then reset: an RST, not an orderly close.
                tokio::time::sleep(RESET_GRACE).await;
                client.set_zero_linger()?;
                drop(client);
                return Ok(());
            }
            _ => {}
        }
        if let Some(at) = state.gate_for(path).filter(|&at| sent + len > at) {
            let before = pending.drain(..at.saturating_sub(sent) as usize).collect::<Vec<u8>>();
            client.write_all(&before).await?;
            client.flush().await?;
            sent += before.len() as u64;
            state.wait_open(path).await;
            continue;
        }
        client.write_all(&pending).await?;
        sent += len;
        pending.clear();
    }
    client.shutdown().await
}

//! A fault-injecting HTTP proxy on 127.0.0.1, between pullbox and a registry.
//!
//! Key types: [`FaultProxy`] (started with the upstream's address; pullbox is pointed at the
//! proxy's address instead of the registry's), [`Fault`] (what to do to a matching request)
//! and [`Logged`] (every request it saw, in order, for assertions).
//!
//! It speaks just enough HTTP/1.1 for a registry client: one request per connection (it
//! forwards the request with `Connection: close` and answers with `Connection: close`),
//! bodies relayed byte for byte so faults land at exact body offsets. It runs on its own
//! tokio runtime, so the synchronous tests can start it like any other server; dropping it
//! stops everything, stalled connections included.
//!
//! Faults are armed with [`FaultProxy::inject`] for requests whose path contains a string
//! (usually a blob digest), a number of times; each matching request uses one.
//!
//! The proxy also counts blob downloads in flight (`GET` requests whose path holds
//! `/blobs/`, from their arrival until their answer is relayed): [`FaultProxy::max_blob_gets_in_flight`]
//! is the most there ever were at once. [`Fault::Delay`] makes downloads last long enough for
//! that count to mean something.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// The largest request or response head accepted.
const MAX_HEAD: usize = 64 << 10;

/// What the proxy does to a matching request.
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
    /// Wait this many milliseconds, then forward.
    Delay(u64),
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Whether the request carried an `Authorization` header.
    pub authorized: bool,
    /// The names of the request's headers, lowercase, in order.
    pub headers: Vec<String>,
    /// The fault applied to it, if any.
    pub fault: Option<Fault>,
}

struct Rule {
    needle: String,
    fault: Fault,
    remaining: usize,
}

#[derive(Default)]
struct State {
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<Logged>>,
    /// Blob GETs in flight now, and the most there ever were.
    blob_gets: Mutex<(usize, usize)>,
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

/// A running proxy. See the module docs.
pub struct FaultProxy {
    addr: String,
    state: Arc<State>,
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 that forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Result<FaultProxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State::default());
        let (s, upstream) = (state.clone(), upstream.to_owned());
        runtime.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (s, upstream) = (s.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = handle(conn, &upstream, &s).await;
                });
            }
        });
        Ok(FaultProxy { addr, state, runtime: Some(runtime) })
    }

    /// `127.0.0.1:PORT`: the registry address pullbox should use.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Applies `fault` to the next `times` requests whose path contains `path_contains`.
    pub fn inject(&self, path_contains: &str, fault: Fault, times: usize) {
        self.state.rules.lock().unwrap().push(Rule { needle: path_contains.to_owned(), fault, remaining: times });
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    /// The most blob `GET`s that were ever in flight at once.
    pub fn max_blob_gets_in_flight(&self) -> usize {
        self.state.blob_gets.lock().unwrap().1
    }

    /// The requests whose path contains `needle`.
    pub fn requests_for(&self, needle: &str) -> Vec<Logged> {
        self.requests().into_iter().filter(|r| r.path.contains(needle)).collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads an HTTP head (up to and including the blank line); returns it and any bytes read
/// after it. `None` when the peer closed before sending anything.
pub(crate) async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok(Some((String::from_utf8_lossy(&buf).into_owned(), rest)));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
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

/// The head without `Connection`/`Keep-Alive` headers, with `Connection: close`.
fn closing(head: &str) -> String {
    let mut out = String::new();
    for line in head.trim_end_matches("\r\n").split("\r\n") {
        let name = line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
        if name == "connection" || name == "keep-alive" || name == "proxy-connection" {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn handle(mut client: TcpStream, upstream: &str, state: &State) -> io::Result<()> {
    let Some((head, rest)) = read_head(&mut client).await? else { return Ok(()) };
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let path = words.next().unwrap_or_default().to_owned();
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
        path,
        range: header(&head, "range").map(str::to_owned),
        authorized: header(&head, "authorization").is_some(),
        headers: head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':').map(|(k, _)| k.trim().to_ascii_lowercase()))
            .collect(),
        fault,
    });
    if let Some(Fault::Status(code)) = fault {
        let answer = format!("HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        client.write_all(answer.as_bytes()).await?;
        return client.shutdown().await;
    }
    if let Some(Fault::Delay(ms)) = fault {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(closing(&head).as_bytes()).await?;
    up.write_all(&rest).await?;
    let Some((response, mut pending)) = read_head(&mut up).await? else { return Ok(()) };
    client.write_all(closing(&response).as_bytes()).await?;

    let mut sent: u64 = 0;
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
            Some(Fault::CorruptAt(at)) if (sent..sent + len).contains(&at) => {
                pending[(at - sent) as usize] ^= 0xff;
            }
            Some(Fault::ResetAfter(at)) | Some(Fault::StallAfter(at)) if sent + len > at => {
                client.write_all(&pending[..(at - sent) as usize]).await?;
                client.flush().await?;
                if let Some(Fault::StallAfter(_)) = fault {
                    // Hold both connections until the proxy is dropped.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return Ok(());
                }
                // Let the client read what was sent, then reset: an RST, not an orderly close.
                tokio::time::sleep(Duration::from_millis(300)).await;
                client.set_zero_linger()?;
                drop(client);
                return Ok(());
            }
            _ => {}
        }
        client.write_all(&pending).await?;
        sent += len;
        pending.clear();
    }
    client.shutdown().await
}

//! A gated HTTP proxy on 127.0.0.1, between pullbox and a registry: it holds chosen
//! downloads part-way until the test lets them go, so a pull can be held in a known state
//! (half a layer written, its snapshot prepared) and then completed, with no timeout involved.
//!
//! Key type: [`GateProxy`]. [`GateProxy::hold`] arms a gate for requests whose path contains a
//! string (a blob digest): their response bodies stop after a number of bytes until
//! [`GateProxy::release`]. [`GateProxy::requests`] lists every request seen, to count
//! downloads. One request per connection (`Connection: close` both ways), plain threads, no
//! runtime; dropping the proxy releases every gate and stops accepting.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::Result;

/// One request the proxy saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The `Range` header, if any (a resumed download).
    pub range: Option<String>,
}

#[derive(Debug)]
struct Gate {
    needle: String,
    after: u64,
    open: bool,
}

#[derive(Debug, Default)]
struct State {
    gates: Mutex<Vec<Gate>>,
    changed: Condvar,
    held: Mutex<usize>,
    log: Mutex<Vec<Request>>,
    stop: AtomicBool,
}

/// A running proxy. See the module docs.
#[derive(Debug)]
pub struct GateProxy {
    addr: String,
    state: Arc<State>,
}

impl GateProxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Result<GateProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State::default());
        let (s, upstream) = (state.clone(), upstream.to_owned());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (s, upstream) = (s.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &upstream, &s);
                });
            }
        });
        Ok(GateProxy { addr, state })
    }

    /// `127.0.0.1:PORT`: the registry address to pull from.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Holds the response bodies of requests whose path contains `needle` after `after`
    /// bytes, until [`GateProxy::release`].
    pub fn hold(&self, needle: &str, after: u64) {
        self.state.gates.lock().unwrap().push(Gate { needle: needle.to_owned(), after, open: false });
    }

    /// Lets the responses held for `needle` go on (and those to come pass).
    pub fn release(&self, needle: &str) {
        for gate in self.state.gates.lock().unwrap().iter_mut().filter(|g| g.needle == needle) {
            gate.open = true;
        }
        self.state.changed.notify_all();
    }

    /// How many responses are being held right now.
    pub fn held(&self) -> usize {
        *self.state.held.lock().unwrap()
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.log.lock().unwrap().clone()
    }

    /// The GETs whose path contains `needle` that started a download (no `Range`).
    pub fn downloads(&self, needle: &str) -> usize {
        self.requests().iter().filter(|r| r.method == "GET" && r.range.is_none() && r.path.contains(needle)).count()
    }
}

impl Drop for GateProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        for gate in self.state.gates.lock().unwrap().iter_mut() {
            gate.open = true;
        }
        self.state.changed.notify_all();
        let _ = TcpStream::connect(&self.addr);
    }
}

/// Reads an HTTP head (through the blank line).
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(if lines.is_empty() { None } else { Some(lines) });
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The head with `Connection: close` instead of any connection header.
fn closing(head: &[String]) -> Vec<u8> {
    let mut out = String::new();
    for line in head.iter().filter(|l| {
        let name = l.split(':').next().unwrap_or_default().trim();
        !(name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive"))
    }) {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

fn handle(client: TcpStream, upstream: &str, state: &State) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    let Some(head) = read_head(&mut reader)? else { return Ok(()) };
    let mut parts = head[0].split_whitespace();
    let request = Request {
        method: parts.next().unwrap_or_default().to_owned(),
        path: parts.next().unwrap_or_default().to_owned(),
        range: header(&head, "range").map(str::to_owned),
    };
    state.log.lock().unwrap().push(request.clone());
    let body_len: u64 = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);

    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&closing(&head))?;
    io::copy(&mut (&mut reader).take(body_len), &mut up)?;
    let mut up_reader = BufReader::new(up);
    let Some(response) = read_head(&mut up_reader)? else { return Ok(()) };
    client.write_all(&closing(&response))?;

    let mut sent = 0u64;
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = up_reader.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut chunk = &buf[..n];
        let gate_at = {
            let gates = state.gates.lock().unwrap();
            gates.iter().find(|g| !g.open && request.path.contains(&g.needle)).map(|g| g.after)
        };
        if let Some(at) = gate_at.filter(|&at| sent + chunk.len() as u64 > at) {
            let before = (at.saturating_sub(sent)) as usize;
            client.write_all(&chunk[..before])?;
            client.flush()?;
            sent += before as u64;
            chunk = &chunk[before..];
            wait_open(state, &request.path);
        }
        client.write_all(chunk)?;
        sent += chunk.len() as u64;
    }
}

/// Blocks until no closed gate matches `path` (or the proxy stops).
fn wait_open(state: &State, path: &str) {
    *state.held.lock().unwrap() += 1;
    let mut gates = state.gates.lock().unwrap();
    while !state.stop.load(Ordering::SeqCst) && gates.iter().any(|g| !g.open && path.contains(&g.needle)) {
        gates = state.changed.wait_timeout(gates, Duration::from_millis(200)).unwrap().0;
    }
    drop(gates);
    *state.held.lock().unwrap() -= 1;
}

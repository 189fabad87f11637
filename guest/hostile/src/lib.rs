//! `pullbox-hostile`: a puller that misbehaves on purpose, for pullbox's sandbox tests
//! (`tests/all/sandbox/`).
//!
//! Operators run pullers written by others, so the host must survive whatever a component
//! does. This component does the bad things, one per request, chosen by its settings
//! document: `{"behavior": "<name>", ...}` (an empty document or `{}` means `idle`).
//!
//! | behavior | what it does |
//! |---|---|
//! | `idle` | behaves: refuses pulls with `permission-denied`, answers the rest normally |
//! | `loop-in-pull` | spins forever in the export call (the CPU limit must stop it) |
//! | `loop-in-configure` | spins forever in `configure` |
//! | `grow-memory` | allocates (and touches) 1 MiB after 1 MiB until allocation fails |
//! | `recursion` | recurses without bound (the wasm stack limit must stop it) |
//! | `huge-argument` | hands an import an oversized argument; `variant` picks which (below) |
//! | `bad-abi` | calls an import with a malformed canonical-ABI argument; `variant` picks which |
//! | `bad-digests` | after a real resolve and fetch, throws garbage digests, `../` paths, foreign mounts and absurd offsets at every import |
//! | `trap-in-configure` | panics in `configure` |
//! | `trap-mid-pull` | does a real partial pull (resolve, fetch config and layers, prepare, apply, commit, prepare again), then does `then` (default `trap`) |
//! | `sleepy` | behaves, but spends its time in host imports: resolves the image, then each of `resolve`, then reads the image's manifest `reads` times, then answers the image |
//! | `log-flood` | logs `count` (default 1,000,000) error messages and as many progress events, then refuses the pull |
//! | `import-loop` | calls one import without end, ignoring its answers; `variant` picks it: `stat-missing` (`snapshots.stat` of fresh missing keys), `prepare-fresh` (`snapshots.prepare` of fresh keys), `max-read` (`content.max-read`), `stats` (`snapshots.stats` of 1024 keys) — the import budget, creation caps and deadline must end it |
//! | `write-in-read` | tries every write import (records, blobs, labels, snapshots, the registry) on what the store holds; fails with `failed-precondition` when all were refused, with `internal` naming the accepted ones otherwise (for `image-status`, `list-images`, `remove-image`) |
//! | `hold-key` | prepares the active snapshot `foreign-key`, then resolves each of `resolve` (a slow registry keeps the request alive), then refuses the pull |
//! | `fetch-flood` | asks `registry.fetch` for `count` (default 1,000,000) made-up blobs of the requested repository, 1024 per call: host tasks and bookkeeping the guest holds without using memory of its own |
//!
//! `overrides` maps a pull's reference to the settings for that pull alone (so that one
//! request misbehaves while another, of the same puller, behaves).
//!
//! The in-call behaviors act in the export named by `export` (`pull-image`, the default;
//! `image-status`, `list-images` or `remove-image`); the other exports answer normally.
//! `then` (for `trap-mid-pull`) is one of `trap`, `loop`, `grow-memory`, `recursion`.
//!
//! `huge-argument` variants (`bytes` default 100 MiB, `count` default 1,000,000):
//! - `string`: `content.info` with a `bytes`-long digest;
//! - `log`: `log.log` with a `bytes`-long message;
//! - `list`: `registry.fetch` with `count` well-formed descriptors (sharing their strings);
//! - `aliased`: `content.set-labels` with `count` label pairs whose keys and values all point
//!   at one `bytes`-long string: `count * bytes * 2` bytes once lifted into host strings, from
//!   `bytes` of guest memory.
//!
//! `bad-abi` variants: `oob-string` (a string whose pointer plus length is past the end of
//! memory), `oob-list` (likewise a list), `misaligned` (a list of 8-aligned records at an odd
//! address), `utf8` (a string that is not UTF-8), `discriminant` (an `option` discriminant of
//! 7 in a descriptor), `enum` (log level 99). Each must trap the call, never the host.
//!
//! `image-status` of `pullbox-hostile/whoami` answers an image whose repo tags are
//! `pullbox-hostile/<behavior>` and the settings document as given, so a test can see which
//! puller and settings a daemon runs.
//! `bad-digests` takes `victim`, an absolute directory the host must never write to; it
//! fails its request with `failed-precondition` when every probe was refused, and with
//! `internal` listing what the host accepted otherwise.

use std::hint::black_box;
use std::sync::Mutex;

use serde::Deserialize;

wit_bindgen::generate!({
    path: "../../wit",
    world: "puller-world",
});

use exports::pullbox::image::puller::{Guest, ImageInfo, PullRequest};
use pullbox::image::types::{Descriptor, Error, Image};
use pullbox::image::{content, diff, images, log, registry, snapshots};

/// The reference `image-status` answers with the current behavior.
pub const WHOAMI: &str = "pullbox-hostile/whoami";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Behavior {
    #[default]
    Idle,
    LoopInPull,
    LoopInConfigure,
    GrowMemory,
    Recursion,
    HugeArgument,
    BadAbi,
    BadDigests,
    TrapInConfigure,
    TrapMidPull,
    Sleepy,
    FetchFlood,
    LogFlood,
    ImportLoop,
    WriteInRead,
    HoldKey,
}

impl Behavior {
    fn name(self) -> &'static str {
        match self {
            Behavior::Idle => "idle",
            Behavior::LoopInPull => "loop-in-pull",
            Behavior::LoopInConfigure => "loop-in-configure",
            Behavior::GrowMemory => "grow-memory",
            Behavior::Recursion => "recursion",
            Behavior::HugeArgument => "huge-argument",
            Behavior::BadAbi => "bad-abi",
            Behavior::BadDigests => "bad-digests",
            Behavior::TrapInConfigure => "trap-in-configure",
            Behavior::TrapMidPull => "trap-mid-pull",
            Behavior::Sleepy => "sleepy",
            Behavior::FetchFlood => "fetch-flood",
            Behavior::LogFlood => "log-flood",
            Behavior::ImportLoop => "import-loop",
            Behavior::WriteInRead => "write-in-read",
            Behavior::HoldKey => "hold-key",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Export {
    #[default]
    PullImage,
    ImageStatus,
    ListImages,
    RemoveImage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Then {
    #[default]
    Trap,
    Loop,
    GrowMemory,
    Recursion,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    behavior: Behavior,
    #[serde(default)]
    export: Export,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    bytes: Option<u64>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    reads: Option<u32>,
    #[serde(default)]
    resolve: Vec<String>,
    #[serde(default)]
    then: Then,
    #[serde(default)]
    victim: Option<String>,
    /// `bad-digests`: an active snapshot key another request prepared; `hold-key`: the key
    /// to prepare and hold.
    #[serde(default)]
    foreign_key: Option<String>,
    /// Settings for pulls of particular references, so that one puller can misbehave in
    /// one request and behave in another at the same time.
    #[serde(default)]
    overrides: std::collections::BTreeMap<String, Settings>,
}

static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);
/// The settings document as given, for `whoami`.
static DOCUMENT: Mutex<String> = Mutex::new(String::new());

fn settings() -> Settings {
    SETTINGS.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default()
}

fn info(message: &str) {
    log::log(log::Level::Info, &format!("pullbox-hostile: {message}"));
}

struct Hostile;

impl Guest for Hostile {
    fn configure(doc: String) -> Result<(), Error> {
        // Panics show up in the daemon's log before the trap.
        std::panic::set_hook(Box::new(|p| log::log(log::Level::Error, &format!("pullbox-hostile: {p}"))));
        let s: Settings = if doc.trim().is_empty() {
            Settings::default()
        } else {
            serde_json::from_str(&doc).map_err(|e| Error::InvalidArgument(format!("pullbox-hostile settings: {e}")))?
        };
        match s.behavior {
            Behavior::LoopInConfigure => spin(),
            Behavior::TrapInConfigure => panic!("trap-in-configure: panicking in configure"),
            _ => {}
        }
        *SETTINGS.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        *DOCUMENT.lock().unwrap_or_else(|e| e.into_inner()) = doc;
        Ok(())
    }

    fn pull_image(request: PullRequest) -> Result<ImageInfo, Error> {
        let mut s = settings();
        if let Some(o) = s.overrides.remove(&request.reference) {
            s = o;
        }
        match s.behavior {
            Behavior::Idle => Err(Error::PermissionDenied("pullbox-hostile: behavior idle refuses pulls".into())),
            Behavior::TrapMidPull => trap_mid_pull(&s, &request.reference),
            Behavior::BadDigests => bad_digests(&s, &request.reference),
            Behavior::Sleepy => sleepy(&s, &request.reference),
            Behavior::FetchFlood => fetch_flood(&s, &request.reference),
            Behavior::HoldKey => hold_key(&s),
            _ if s.export == Export::PullImage => Err(misbehave(&s)),
            b => Err(Error::PermissionDenied(format!("pullbox-hostile: behavior {} refuses pulls", b.name()))),
        }
    }

    fn image_status(reference: String) -> Result<Option<ImageInfo>, Error> {
        let s = settings();
        if reference == WHOAMI {
            return Ok(Some(ImageInfo {
                id: format!("sha256:{}", "0".repeat(64)),
                repo_tags: vec![
                    format!("pullbox-hostile/{}", s.behavior.name()),
                    DOCUMENT.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                ],
                repo_digests: Vec::new(),
                size: 0,
                chain_id: String::new(),
                manifest_digest: String::new(),
                user: String::new(),
                pinned: false,
            }));
        }
        if s.export == Export::ImageStatus && in_call(s.behavior) {
            return Err(misbehave(&s));
        }
        Ok(None)
    }

    fn list_images() -> Result<Vec<ImageInfo>, Error> {
        let s = settings();
        if s.export == Export::ListImages && in_call(s.behavior) {
            return Err(misbehave(&s));
        }
        // One import, so that a liveness check exercises the host too.
        images::list()?;
        Ok(Vec::new())
    }

    fn remove_image(_reference: String) -> Result<(), Error> {
        let s = settings();
        if s.export == Export::RemoveImage && in_call(s.behavior) {
            return Err(misbehave(&s));
        }
        Ok(())
    }
}

export!(Hostile);

/// Whether `b` misbehaves inside the export named by `export`.
fn in_call(b: Behavior) -> bool {
    matches!(
        b,
        Behavior::LoopInPull
            | Behavior::GrowMemory
            | Behavior::Recursion
            | Behavior::HugeArgument
            | Behavior::BadAbi
            | Behavior::LogFlood
            | Behavior::ImportLoop
            | Behavior::WriteInRead
    )
}

/// Does the in-call misbehavior of `s`; returns only when the host answered an import.
fn misbehave(s: &Settings) -> Error {
    match s.behavior {
        Behavior::LoopInPull => spin(),
        Behavior::GrowMemory => grow_memory(),
        Behavior::Recursion => Error::Internal(format!("recursion returned {}", recurse(black_box(u64::MAX)))),
        Behavior::HugeArgument => huge_argument(s),
        Behavior::BadAbi => bad_abi(s),
        Behavior::LogFlood => log_flood(s),
        Behavior::ImportLoop => import_loop(s),
        Behavior::WriteInRead => write_in_read(s.export == Export::RemoveImage),
        b => Error::Internal(format!("behavior {} does not act in a call", b.name())),
    }
}

fn then(t: Then, what: &str) -> ! {
    info(&format!("{what}; now: {t:?}"));
    match t {
        Then::Trap => panic!("trap-mid-pull: panicking after {what}"),
        Then::Loop => spin(),
        Then::GrowMemory => {
            grow_memory();
            panic!("grow-memory returned")
        }
        Then::Recursion => panic!("recursion returned {}", recurse(black_box(u64::MAX))),
    }
}

/// An infinite loop the optimizer cannot remove.
fn spin() -> ! {
    info("spinning forever");
    let mut i = 0u64;
    loop {
        i = black_box(i.wrapping_add(1));
    }
}

/// Allocates and touches 1 MiB after 1 MiB, keeping all of it. Aborts (traps) when an
/// allocation fails, as a runaway Rust program does.
fn grow_memory() -> Error {
    const MIB: usize = 1 << 20;
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        // Non-zero bytes: every page is written, none is left to the allocator's zeroing.
        kept.push(black_box(vec![1u8; MIB]));
        if kept.len().is_multiple_of(16) {
            info(&format!("grow-memory: holding {} MiB", kept.len()));
        }
    }
}

/// Recursion that is not a tail call, so every level keeps a wasm frame.
#[inline(never)]
fn recurse(n: u64) -> u64 {
    if black_box(n) == 0 {
        return 0;
    }
    recurse(black_box(n - 1)).wrapping_mul(3).wrapping_add(n)
}

/// The WIT error cases in the order of their discriminants, by name.
const CODES: [&str; 9] = [
    "not-found",
    "already-exists",
    "invalid-argument",
    "failed-precondition",
    "permission-denied",
    "resource-exhausted",
    "unavailable",
    "cancelled",
    "internal",
];

/// Splits an error into its case's discriminant and its message (one direction).
fn split(e: Error) -> (u8, String) {
    match e {
        Error::NotFound(m) => (0, m),
        Error::AlreadyExists(m) => (1, m),
        Error::InvalidArgument(m) => (2, m),
        Error::FailedPrecondition(m) => (3, m),
        Error::PermissionDenied(m) => (4, m),
        Error::ResourceExhausted(m) => (5, m),
        Error::Unavailable(m) => (6, m),
        Error::Cancelled(m) => (7, m),
        Error::Internal(m) => (8, m),
    }
}

/// The error of the case with discriminant `d` (an unknown one is `internal`) and message
/// `m` (the other direction).
fn case(d: u8, m: String) -> Error {
    match d {
        0 => Error::NotFound(m),
        1 => Error::AlreadyExists(m),
        2 => Error::InvalidArgument(m),
        3 => Error::FailedPrecondition(m),
        4 => Error::PermissionDenied(m),
        5 => Error::ResourceExhausted(m),
        6 => Error::Unavailable(m),
        7 => Error::Cancelled(m),
        _ => Error::Internal(m),
    }
}

/// The error `e` with `prefix` in front of its message, same case.
fn with_prefix(prefix: &str, e: Error) -> Error {
    let (d, m) = split(e);
    case(d, format!("{prefix}: {m}"))
}

fn code(e: &Error) -> &'static str {
    CODES[usize::from(split(e.clone()).0)]
}

/// Many small messages: the host caps their rate, not only their size.
fn log_flood(s: &Settings) -> Error {
    let n = s.count.unwrap_or(1_000_000);
    for i in 0..n {
        log::log(log::Level::Error, &format!("pullbox-hostile: log-flood message {i} of {n}"));
        log::progress("log-flood", &format!("{i}"));
    }
    Error::PermissionDenied(format!("log-flood: logged {n} messages"))
}

// ---- huge arguments ----------------------------------------------------------------------

const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn zero_digest() -> String {
    format!("sha256:{}", "0".repeat(64))
}

fn huge_argument(s: &Settings) -> Error {
    let bytes = s.bytes.unwrap_or(100 << 20) as usize;
    let count = s.count.unwrap_or(1_000_000) as usize;
    let variant = s.variant.as_deref().unwrap_or("string");
    info(&format!("huge-argument {variant}: bytes={bytes} count={count}"));
    match variant {
        "string" => {
            let huge = "a".repeat(bytes);
            match content::info(&huge) {
                Ok(_) => Error::Internal(format!("huge-argument string: the host ACCEPTED a {bytes}-byte digest")),
                Err(e) => with_prefix("huge-argument string: the host answered", e),
            }
        }
        "log" => {
            let huge = "a".repeat(bytes);
            log::log(log::Level::Info, &huge);
            Error::PermissionDenied(format!("huge-argument log: the host took a {bytes}-byte message"))
        }
        "list" => raw::fetch_aliased(count),
        "aliased" => raw::set_labels_aliased(count, bytes),
        other => Error::InvalidArgument(format!("unknown huge-argument variant {other:?}")),
    }
}

fn bad_abi(s: &Settings) -> Error {
    let variant = s.variant.as_deref().unwrap_or("oob-string");
    info(&format!("bad-abi {variant}"));
    raw::bad_abi(variant)
}

/// Direct calls of the imports with hand-built canonical-ABI arguments: what a component
/// written in another language, or hand-written, can do. Signatures as wit-bindgen lowers
/// them (`string` and `list` are pointer plus length; a result with a payload goes through
/// a return area whose address is the last argument).
#[cfg(target_arch = "wasm32")]
mod raw {
    use super::{zero_digest, Error, LAYER_GZIP};

    #[link(wasm_import_module = "pullbox:image/content@0.2.0")]
    extern "C" {
        #[link_name = "info"]
        fn content_info(ptr: *const u8, len: usize, ret: *mut u8);
        #[link_name = "set-labels"]
        fn content_set_labels(dptr: *const u8, dlen: usize, lptr: *const u8, llen: usize, ret: *mut u8);
    }

    #[link(wasm_import_module = "pullbox:image/registry@0.2.0")]
    extern "C" {
        #[link_name = "fetch"]
        fn registry_fetch(nptr: *const u8, nlen: usize, lptr: *const u8, llen: usize, ret: *mut u8);
    }

    #[link(wasm_import_module = "pullbox:image/log@0.2.0")]
    extern "C" {
        #[link_name = "log"]
        fn log_log(level: i32, ptr: *const u8, len: usize);
    }

    #[repr(C, align(8))]
    struct RetArea([u8; 64]);

    /// Size and alignment of a `descriptor` in the canonical ABI: media-type 0, digest 8,
    /// size 16, annotations 24, option<platform> 32 (discriminant) / 36 (payload, 40 bytes),
    /// urls 76; 84 rounded up to the alignment 8.
    const DESCRIPTOR_SIZE: usize = 88;

    fn put32(buf: &mut [u8], at: usize, v: u32) {
        buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Decodes `result<_, error>` (error at offset `at`: discriminant, then string at +4).
    fn decode(ret: &RetArea, at: usize, what: &str) -> Error {
        if ret.0[0] == 0 {
            return Error::Internal(format!("{what}: the host ACCEPTED it"));
        }
        let d = ret.0[at];
        let ptr = u32::from_le_bytes(ret.0[at + 4..at + 8].try_into().unwrap()) as usize as *const u8;
        let len = u32::from_le_bytes(ret.0[at + 8..at + 12].try_into().unwrap()) as usize;
        // SAFETY: the host wrote a string of `len` bytes at `ptr` through cabi_realloc.
        let m = String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(ptr, len) }).into_owned();
        super::case(d, format!("{what}: the host answered: {m}"))
    }

    /// `count` descriptors in one `registry.fetch`, every one well-formed and sharing the
    /// same two strings.
    pub fn fetch_aliased(count: usize) -> Error {
        let media = LAYER_GZIP.as_bytes();
        let digest = zero_digest();
        let name = b"127.0.0.1:1/pullbox-hostile/list";
        let mut list = vec![0u64; count * DESCRIPTOR_SIZE / 8];
        // SAFETY: a u64 buffer viewed as bytes (8-aligned, as a descriptor list must be).
        let bytes = unsafe { std::slice::from_raw_parts_mut(list.as_mut_ptr() as *mut u8, count * DESCRIPTOR_SIZE) };
        let base = bytes.as_ptr() as u32;
        for i in 0..count {
            let r = &mut bytes[i * DESCRIPTOR_SIZE..(i + 1) * DESCRIPTOR_SIZE];
            put32(r, 0, media.as_ptr() as u32);
            put32(r, 4, media.len() as u32);
            put32(r, 8, digest.as_ptr() as u32);
            put32(r, 12, digest.len() as u32);
            r[16..24].copy_from_slice(&1u64.to_le_bytes());
            put32(r, 24, base); // annotations: empty
            r[32] = 0; // platform: none
            put32(r, 76, base); // urls: empty
        }
        let mut ret = RetArea([0; 64]);
        // SAFETY: every pointer names memory of this instance; the host reads, and writes
        // the return area.
        unsafe { registry_fetch(name.as_ptr(), name.len(), bytes.as_ptr(), count, ret.0.as_mut_ptr()) };
        decode(&ret, 4, &format!("huge-argument list of {count} descriptors"))
    }

    /// `count` label pairs whose keys and values all point at one `bytes`-long string.
    pub fn set_labels_aliased(count: usize, bytes: usize) -> Error {
        let big = vec![b'k'; bytes];
        let digest = zero_digest();
        let mut pairs = vec![0u32; count * 4];
        for p in pairs.chunks_mut(4) {
            p.copy_from_slice(&[big.as_ptr() as u32, bytes as u32, big.as_ptr() as u32, bytes as u32]);
        }
        let mut ret = RetArea([0; 64]);
        // SAFETY: as in `fetch_aliased`.
        unsafe {
            content_set_labels(digest.as_ptr(), digest.len(), pairs.as_ptr() as *const u8, count, ret.0.as_mut_ptr())
        };
        decode(&ret, 4, &format!("huge-argument aliased: {count} label pairs of one {bytes}-byte string"))
    }

    /// One malformed call; the host must trap it.
    pub fn bad_abi(variant: &str) -> Error {
        let mut ret = RetArea([0; 64]);
        let digest = zero_digest();
        let name = b"127.0.0.1:1/pullbox-hostile/abi";
        let memory_end = core::arch::wasm32::memory_size(0) * 65536;
        // SAFETY: none, on purpose: each call hands the host arguments that break the
        // canonical ABI's rules. The host must trap before it reads out of bounds.
        unsafe {
            match variant {
                "oob-string" => content_info((memory_end - 16) as *const u8, 100 << 20, ret.0.as_mut_ptr()),
                "oob-list" => registry_fetch(
                    name.as_ptr(),
                    name.len(),
                    (memory_end - 64) as *const u8,
                    1 << 20,
                    ret.0.as_mut_ptr(),
                ),
                "misaligned" => {
                    let buf = vec![0u64; 2 * DESCRIPTOR_SIZE / 8];
                    registry_fetch(name.as_ptr(), name.len(), (buf.as_ptr() as *const u8).add(1), 1, ret.0.as_mut_ptr())
                }
                "utf8" => {
                    let bad = [b's', b'h', 0xff, 0xfe, 0xc0, 0x80];
                    content_info(bad.as_ptr(), bad.len(), ret.0.as_mut_ptr())
                }
                "discriminant" => {
                    let mut list = vec![0u64; DESCRIPTOR_SIZE / 8];
                    let r = std::slice::from_raw_parts_mut(list.as_mut_ptr() as *mut u8, DESCRIPTOR_SIZE);
                    put32(r, 0, LAYER_GZIP.as_ptr() as u32);
                    put32(r, 4, LAYER_GZIP.len() as u32);
                    put32(r, 8, digest.as_ptr() as u32);
                    put32(r, 12, digest.len() as u32);
                    r[32] = 7; // option<platform>: neither none (0) nor some (1)
                    registry_fetch(name.as_ptr(), name.len(), r.as_ptr(), 1, ret.0.as_mut_ptr())
                }
                "enum" => {
                    let m = b"log level 99";
                    log_log(99, m.as_ptr(), m.len());
                    return Error::Internal("bad-abi enum: the host ACCEPTED log level 99".into());
                }
                other => return Error::InvalidArgument(format!("unknown bad-abi variant {other:?}")),
            }
        }
        decode(&ret, 4, &format!("bad-abi {variant}"))
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod raw {
    use super::Error;
    fn native() -> Error {
        Error::Internal("raw ABI calls exist only in the wasm32 component".into())
    }
    pub fn fetch_aliased(_: usize) -> Error {
        native()
    }
    pub fn set_labels_aliased(_: usize, _: usize) -> Error {
        native()
    }
    pub fn bad_abi(_: &str) -> Error {
        native()
    }
}

// ---- real work: resolving, reading, fetching --------------------------------------------

/// `host/path:tag` or `host/path@digest` split into repository name and tag or digest.
fn split_reference(reference: &str) -> Result<(String, String), Error> {
    if let Some((name, digest)) = reference.split_once('@') {
        return Ok((name.to_owned(), digest.to_owned()));
    }
    let slash = reference.rfind('/').unwrap_or(0);
    match reference[slash..].rfind(':') {
        Some(i) => Ok((reference[..slash + i].to_owned(), reference[slash + i + 1..].to_owned())),
        None => Ok((reference.to_owned(), "latest".to_owned())),
    }
}

/// Reads a whole (small) blob.
fn read_all(digest: &str, size: u64) -> Result<Vec<u8>, Error> {
    let max = u64::from(content::max_read());
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let n = (size - out.len() as u64).min(max) as u32;
        let chunk = content::read(digest, out.len() as u64, n)?;
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[derive(Deserialize)]
struct OciDescriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
}

fn wit_descriptor(d: &OciDescriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: Vec::new(),
        platform: None,
        urls: Vec::new(),
    }
}

/// What a partial pull got: the repository, root and the manifest's blobs.
struct Partial {
    name: String,
    root: Descriptor,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// Resolves `reference` (a single-platform manifest), reads the manifest and starts
/// fetching its config and layers.
fn resolve_and_fetch(reference: &str) -> Result<Partial, Error> {
    let (name, tag) = split_reference(reference)?;
    let root = registry::resolve(&name, &tag)?;
    let manifest = read_all(&root.digest, root.size)?;
    let m: OciManifest = serde_json::from_slice(&manifest)
        .map_err(|e| Error::InvalidArgument(format!("pullbox-hostile reads single-platform manifests only: {e}")))?;
    let config = wit_descriptor(&m.config);
    let layers: Vec<Descriptor> = m.layers.iter().map(wit_descriptor).collect();
    let mut blobs = vec![config.clone()];
    blobs.extend(layers.iter().cloned());
    registry::fetch(&name, &blobs)?;
    info(&format!("resolved {reference} to {}; fetching {} blobs", root.digest, blobs.len()));
    Ok(Partial { name, root, config, layers })
}

// ---- trap-mid-pull -----------------------------------------------------------------------

/// Writes what a pull writes (blobs, an ingest or two in flight, an applied and committed
/// snapshot, an active one on top of it), then misbehaves with `then`. Nothing of it may
/// survive the request.
fn trap_mid_pull(s: &Settings, reference: &str) -> Result<ImageInfo, Error> {
    let p = resolve_and_fetch(reference)?;
    let config = read_all(&p.config.digest, p.config.size)?;
    info(&format!("read the config ({} bytes)", config.len()));
    let first = p.layers.first().ok_or_else(|| Error::InvalidArgument("image has no layers".into()))?;
    let key = format!("pullbox-hostile/active/{}", &p.root.digest);
    snapshots::prepare(&key, "")?;
    let diff_id = diff::apply(first, &key)?;
    info(&format!("applied {} ({diff_id})", first.digest));
    let committed = format!("pullbox-hostile/committed/{diff_id}");
    snapshots::commit(&committed, &key)?;
    snapshots::prepare(&format!("{key}/2"), &committed)?;
    // Labels that would keep content alive if the lease did not go.
    content::set_labels(
        &p.root.digest,
        &[
            ("containerd.io/gc.ref.content.config".into(), p.config.digest.clone()),
            (format!("containerd.io/gc.ref.snapshot.{}", snapshots::name()), committed.clone()),
        ],
    )?;
    then(s.then, &format!("a partial pull of {} from {}", p.root.digest, p.name))
}

// ---- sleepy ------------------------------------------------------------------------------

/// Behaves, but waits on the host: resolves the image, then each reference in `resolve`
/// (whatever the answer), then reads the image's manifest `reads` times (default 10,000).
fn sleepy(s: &Settings, reference: &str) -> Result<ImageInfo, Error> {
    let (name, tag) = split_reference(reference)?;
    let root = registry::resolve(&name, &tag)?;
    for r in &s.resolve {
        let (name, tag) = split_reference(r)?;
        let answer = registry::resolve(&name, &tag);
        let outcome = match &answer {
            Ok(d) => d.digest.clone(),
            Err(e) => code(e).to_owned(),
        };
        info(&format!("sleepy: resolve {r}: {outcome}"));
    }
    let reads = s.reads.unwrap_or(10_000);
    let n = root.size.min(u64::from(content::max_read())) as u32;
    let mut total = 0u64;
    for _ in 0..reads {
        total += content::read(&root.digest, 0, n)?.len() as u64;
    }
    info(&format!("sleepy: {reads} reads of {}, {total} bytes", root.digest));
    Ok(ImageInfo {
        id: root.digest.clone(),
        repo_tags: vec![reference.to_owned()],
        repo_digests: vec![format!("{name}@{}", root.digest)],
        size: root.size,
        chain_id: String::new(),
        manifest_digest: root.digest,
        user: String::new(),
        pinned: false,
    })
}

// ---- fetch-flood -------------------------------------------------------------------------

/// Starts fetches of `count` made-up blobs (each a download that will fail), 1024 per call.
/// Fails with the host's error, prefixed with how many the host had taken, when it refuses
/// one; with `internal` ("ACCEPTED") when it takes them all. Either way the request fails,
/// so the host cancels what it started.
fn fetch_flood(s: &Settings, reference: &str) -> Result<ImageInfo, Error> {
    let (name, _) = split_reference(reference)?;
    let count = s.count.unwrap_or(1_000_000);
    let mut started = 0u64;
    while started < count {
        let n = (count - started).min(1024);
        let batch: Vec<Descriptor> = (started..started + n)
            .map(|i| Descriptor {
                media_type: LAYER_GZIP.into(),
                digest: format!("sha256:{i:064x}"),
                size: 1,
                annotations: Vec::new(),
                platform: None,
                urls: Vec::new(),
            })
            .collect();
        if let Err(e) = registry::fetch(&name, &batch) {
            return Err(with_prefix(&format!("fetch-flood: refused after {started} fetches"), e));
        }
        started += n;
    }
    Err(Error::Internal(format!("fetch-flood: the host ACCEPTED {started} fetches in one request")))
}

// ---- import-loop, write-in-read, hold-key --------------------------------------------------

/// Calls one import without end; returns only if the host stops answering with a trap.
fn import_loop(s: &Settings) -> Error {
    let variant = s.variant.as_deref().unwrap_or("stat-missing");
    info(&format!("import-loop {variant}"));
    let keys: Vec<String> = (0..1024).map(|i| format!("pullbox-hostile/missing/{i}")).collect();
    let mut n: u64 = 0;
    loop {
        n += 1;
        match variant {
            "stat-missing" => drop(black_box(snapshots::stat(&format!("pullbox-hostile/missing/{n}")))),
            "prepare-fresh" => drop(black_box(snapshots::prepare(&format!("pullbox-hostile/fresh/{n}"), ""))),
            "max-read" => drop(black_box(content::max_read())),
            "stats" => drop(black_box(snapshots::stats(&keys))),
            other => return Error::InvalidArgument(format!("unknown import-loop variant {other:?}")),
        }
    }
}

/// Every write import, aimed at what the store holds; in `remove-image` (`deletes_allowed`)
/// only the writes that are not deletes.
fn write_in_read(deletes_allowed: bool) -> Error {
    let mut pr = Probes::default();
    let records = match images::list() {
        Ok(r) => r,
        Err(e) => return Error::Internal(format!("write-in-read: images.list failed: {e:?}")),
    };
    let Some(record) = records.first().cloned() else {
        return Error::Internal("write-in-read: the store holds no image".into());
    };
    let digest = record.target.digest.clone();
    let chain =
        record.labels.iter().find(|(k, _)| k.starts_with("containerd.io/gc.ref.snapshot")).map(|(_, v)| v.clone());
    if !deletes_allowed {
        pr.must_refuse("images.delete(record)", images::delete(&record.name));
        pr.must_refuse("content.delete(target)", content::delete(&digest));
    }
    pr.must_refuse(
        "images.update(record)",
        images::update(&Image { labels: vec![("x".into(), "y".into())], ..record.clone() }),
    );
    pr.must_refuse(
        "images.create(copy)",
        images::create(&Image { name: format!("{}-copy", record.name), ..record.clone() }),
    );
    pr.must_refuse("content.set-labels(target)", content::set_labels(&digest, &[("x".into(), "y".into())]));
    pr.must_refuse("snapshots.prepare(fresh)", snapshots::prepare("pullbox-hostile/w", ""));
    if let (Some(chain), false) = (&chain, deletes_allowed) {
        pr.must_refuse("snapshots.remove(top snapshot)", snapshots::remove(chain));
    }
    let repo = record.name.split(['@', ':']).next().unwrap_or_default().to_owned();
    pr.must_refuse("registry.resolve", registry::resolve(&repo, "latest"));
    pr.must_refuse("registry.fetch(target)", registry::fetch(&repo, std::slice::from_ref(&record.target)));
    pr.must_refuse("registry.referrers(target)", registry::referrers(&repo, &record.target.digest, ""));
    let summary = format!("{} refused [{}]", pr.refused.len(), pr.refused.join("; "));
    if pr.accepted.is_empty() {
        Error::FailedPrecondition(format!("write-in-read: every write refused: {summary}"))
    } else {
        Error::Internal(format!("write-in-read: the host ACCEPTED [{}]; {summary}", pr.accepted.join("; ")))
    }
}

/// Prepares `foreign-key` and keeps the request alive in slow host imports.
fn hold_key(s: &Settings) -> Result<ImageInfo, Error> {
    let key = s.foreign_key.clone().unwrap_or_else(|| "pullbox-hostile/held".into());
    snapshots::prepare(&key, "")?;
    info(&format!("hold-key: prepared {key}"));
    for r in &s.resolve {
        let (name, tag) = split_reference(r)?;
        let _ = registry::resolve(&name, &tag);
    }
    Err(Error::PermissionDenied("pullbox-hostile: hold-key refuses the pull".into()))
}

// ---- bad-digests -------------------------------------------------------------------------

/// The outcome of the probes.
#[derive(Default)]
struct Probes {
    refused: Vec<String>,
    accepted: Vec<String>,
    tolerated: Vec<String>,
}

impl Probes {
    /// A call the host must refuse.
    fn must_refuse<T>(&mut self, what: &str, r: Result<T, Error>) {
        match r {
            Ok(_) => self.accepted.push(what.to_owned()),
            Err(e) => self.refused.push(format!("{what} -> {}", code(&e))),
        }
    }

    /// A call the host may accept (names are opaque), as long as it writes nothing outside
    /// its store (the test checks the victim directory).
    fn may_accept<T>(&mut self, what: &str, r: Result<T, Error>) {
        let outcome = match r {
            Ok(_) => "ok",
            Err(e) => code(&e),
        };
        self.tolerated.push(format!("{what} -> {outcome}"));
    }
}

fn layer_at(layer: &Descriptor, digest: &str) -> Descriptor {
    Descriptor { digest: digest.to_owned(), ..layer.clone() }
}

/// Garbage at every import, after a real resolve and fetch so that the digests and layers it
/// mixes in exist. Fails with `failed-precondition` when the host refused every probe it
/// must refuse, with `internal` naming the accepted ones otherwise.
fn bad_digests(s: &Settings, reference: &str) -> Result<ImageInfo, Error> {
    let p = resolve_and_fetch(reference)?;
    // The config arriving means the fetch works; the layer is waited for by the probes.
    read_all(&p.config.digest, p.config.size)?;
    let layer = p.layers.first().ok_or_else(|| Error::InvalidArgument("image has no layers".into()))?.clone();
    let real = p.root.digest.clone();
    let up = "../".repeat(24);
    let victim = s.victim.clone().unwrap_or_else(|| "/nonexistent/pullbox-hostile-victim".into());
    let victim_rel = victim.trim_start_matches('/').to_owned();
    let mut pr = Probes::default();

    // Digests that are paths.
    for d in [
        "../../etc/passwd".to_owned(),
        "/etc/passwd".to_owned(),
        "sha256:../../../../../../etc/passwd".to_owned(),
        format!("sha256:{up}etc/passwd"),
        format!("sha256:{}/../../../../../etc/passwd", "0".repeat(64)),
        format!("sha256:{}\0", "0".repeat(64)),
        format!("sha256:{}", "0".repeat(63)),
        format!("sha256:{}", "0".repeat(65)),
        format!("sha256:{}", "G".repeat(64)),
        format!("md5:{}", "0".repeat(32)),
        format!("sha256:{}", "0".repeat(64)),
        String::new(),
        "sha256:".to_owned(),
        ":".to_owned(),
    ] {
        pr.must_refuse(&format!("content.info({d:?})"), content::info(&d));
        pr.must_refuse(&format!("content.read({d:?})"), content::read(&d, 0, 4096));
        pr.must_refuse(&format!("content.set-labels({d:?})"), content::set_labels(&d, &[("a".into(), "b".into())]));
        pr.must_refuse(
            &format!("diff.apply(layer {d:?})"),
            diff::apply(&layer_at(&layer, &d), "pullbox-hostile/probe/none"),
        );
    }
    // Deletes aimed at the victim's file, through the content store's paths.
    for d in [
        format!("sha256:{up}{victim_rel}/file"),
        format!("{up}{victim_rel}/file"),
        format!("sha256:../../../../{}", "0".repeat(64)),
    ] {
        pr.must_refuse(&format!("content.delete({d:?})"), content::delete(&d));
    }
    // Absurd offsets and lengths on a real blob.
    pr.must_refuse("content.read(real, offset u64::MAX)", content::read(&real, u64::MAX, 1));
    pr.must_refuse("content.read(real, offset u64::MAX - 1, 1 MiB)", content::read(&real, u64::MAX - 1, 1 << 20));
    pr.must_refuse("content.read(real, offset size + 1)", content::read(&real, p.root.size + 1, 1));
    pr.must_refuse("content.read(real, length u32::MAX)", content::read(&real, 0, u32::MAX));
    // Labels no store should take.
    pr.must_refuse("content.set-labels(real, empty key)", content::set_labels(&real, &[(String::new(), "v".into())]));
    pr.must_refuse(
        "content.set-labels(real, 5000-byte value)",
        content::set_labels(&real, &[("k".into(), "v".repeat(5000))]),
    );
    // The registry, with paths for names and references.
    pr.must_refuse("registry.resolve(\"../../etc/passwd\", latest)", registry::resolve("../../etc/passwd", "latest"));
    pr.must_refuse(
        "registry.resolve(name, \"../../../etc/passwd\")",
        registry::resolve(&p.name, "../../../etc/passwd"),
    );
    pr.must_refuse(
        "registry.resolve(name, \"sha256:../../etc/passwd\")",
        registry::resolve(&p.name, "sha256:../../etc/passwd"),
    );
    pr.must_refuse("registry.resolve(\"\", \"\")", registry::resolve("", ""));
    pr.must_refuse(
        "registry.fetch(name, [digest \"sha256:../../etc/passwd\"])",
        registry::fetch(&p.name, &[layer_at(&layer, "sha256:../../etc/passwd")]),
    );
    pr.must_refuse(
        "registry.fetch(name, [size u64::MAX])",
        registry::fetch(&p.name, &[Descriptor { digest: zero_digest(), size: u64::MAX, ..layer.clone() }]),
    );
    pr.must_refuse(
        "registry.fetch(\"../../etc\", [layer])",
        registry::fetch("../../etc", std::slice::from_ref(&layer)),
    );
    pr.must_refuse(
        "registry.referrers(\"../../etc/passwd\", root, \"\")",
        registry::referrers("../../etc/passwd", &real, ""),
    );
    pr.must_refuse(
        "registry.referrers(name, \"sha256:../../etc/passwd\", \"\")",
        registry::referrers(&p.name, "sha256:../../etc/passwd", ""),
    );
    pr.must_refuse(
        "registry.referrers(name, root, \"a/b&x=../../\")",
        registry::referrers(&p.name, &real, "a/b&x=../../"),
    );

    // Snapshots: a real active one and a committed one; then applies of the real layer onto
    // keys that are not active snapshots this request prepared (since WIT 0.2.0 a guest names
    // a key, never a mount: host paths, binds and overlays cannot even be expressed).
    snapshots::prepare("pullbox-hostile/probe/active", "")?;
    snapshots::prepare("pullbox-hostile/probe/to-commit", "")?;
    snapshots::commit("pullbox-hostile/probe/committed", "pullbox-hostile/probe/to-commit")?;
    pr.must_refuse("snapshots.prepare(existing key)", snapshots::prepare("pullbox-hostile/probe/committed", ""));
    let foreign = s.foreign_key.clone().unwrap_or_default();
    for key in [
        victim.clone(),
        format!("{up}{victim_rel}"),
        "../../../etc".to_owned(),
        String::new(),
        "pullbox-hostile/probe/committed".to_owned(),
        "pullbox-hostile/probe/to-commit".to_owned(),
        "pullbox-hostile/probe/unknown".to_owned(),
        foreign.clone(),
    ] {
        pr.must_refuse(&format!("diff.apply(real layer, {key:?})"), diff::apply(&layer, &key));
        pr.must_refuse(&format!("snapshots.commit(x, {key:?})"), snapshots::commit("pullbox-hostile/probe/x", &key));
        pr.must_refuse(&format!("snapshots.remove({key:?})"), snapshots::remove(&key));
    }
    pr.must_refuse(
        "diff.apply(real layer with a config media type, active)",
        diff::apply(
            &Descriptor { media_type: "application/vnd.oci.image.config.v1+json".into(), ..layer.clone() },
            "pullbox-hostile/probe/active",
        ),
    );
    pr.must_refuse(
        "diff.apply(real layer with a wrong size, active)",
        diff::apply(&Descriptor { size: layer.size + 1, ..layer.clone() }, "pullbox-hostile/probe/active"),
    );
    pr.must_refuse(
        "diff.apply(the config as a gzip layer, active)",
        diff::apply(&Descriptor { media_type: LAYER_GZIP.into(), ..p.config.clone() }, "pullbox-hostile/probe/active"),
    );
    // Snapshot names that look like paths: opaque names, so the host may take them, but it
    // must not create anything outside its store.
    pr.may_accept(
        &format!("snapshots.prepare(\"{up}{victim_rel}/snap\", \"\")"),
        snapshots::prepare(&format!("{up}{victim_rel}/snap"), ""),
    );
    pr.may_accept(
        &format!("snapshots.commit(\"{up}{victim_rel}/committed\", active)"),
        snapshots::commit(&format!("{up}{victim_rel}/committed"), "pullbox-hostile/probe/active"),
    );
    pr.must_refuse(
        "snapshots.prepare(k, parent \"../../../etc\")",
        snapshots::prepare("pullbox-hostile/probe/k", "../../../etc"),
    );
    pr.must_refuse(
        "snapshots.prepare(k, parent: an active snapshot)",
        snapshots::prepare("pullbox-hostile/probe/k2", "pullbox-hostile/probe/k3-none"),
    );
    pr.must_refuse("snapshots.stat(\"\")", snapshots::stat(""));
    pr.must_refuse("snapshots.usage(\"/etc\")", snapshots::usage("/etc"));
    // Image records with malformed targets, and names that are not there.
    let record = |name: &str, digest: &str| Image {
        name: name.to_owned(),
        target: Descriptor { digest: digest.to_owned(), ..p.root.clone() },
        labels: Vec::new(),
        created_at: 0,
        updated_at: 0,
    };
    pr.must_refuse(
        "images.create(target \"sha256:../../etc/passwd\")",
        images::create(&record("pullbox-hostile/bad", "sha256:../../etc/passwd")),
    );
    pr.must_refuse("images.create(empty name)", images::create(&record("", &real)));
    pr.must_refuse("images.update(absent)", images::update(&record("pullbox-hostile/absent", &real)));
    pr.must_refuse("images.get(\"../../etc/passwd\")", images::get("../../etc/passwd"));
    pr.must_refuse("images.delete(\"../../..\")", images::delete("../../.."));

    let summary =
        format!("{} refused [{}]; tolerated [{}]", pr.refused.len(), pr.refused.join("; "), pr.tolerated.join("; "));
    info(&format!("bad-digests: {summary}"));
    if pr.accepted.is_empty() {
        Err(Error::FailedPrecondition(format!("bad-digests: every probe refused: {summary}")))
    } else {
        Err(Error::Internal(format!("bad-digests: the host ACCEPTED [{}]; {summary}", pr.accepted.join("; "))))
    }
}

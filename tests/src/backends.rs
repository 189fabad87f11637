//! The two backends a test's pullbox can store images in, and what such a store holds.
//!
//! Key types: [`Backend`] (embedded or containerd) and [`Store`], one test's store on it: for
//! the embedded backend, the root directory the daemon or CLI is given; for containerd, a
//! fresh namespace of the test process's [`containerd::shared`] containerd. A [`Store`] says
//! how to point pullbox at it ([`Store::daemon_config`] for `pullbox serve`,
//! [`Store::cli_args`] for the CLI) and what it holds ([`Store::leftovers`],
//! [`Store::assert_clean`]), so that one test body checks either backend.
//!
//! What "holds nothing" means:
//! - embedded: no blob, no ingest, no snapshot directory under the root;
//! - containerd: no blob, no active ingest, no snapshot, no lease and no image in the
//!   namespace (`ctr content ls`, `ctr content active`, `ctr snapshots ls`, `ctr leases ls`,
//!   `ctr images ls`). The containerd backend leaves collection to containerd, whose collector
//!   also runs on a schedule: what is still there is collected explicitly
//!   ([`Containerd::collect`]) and looked at again, for at most [`COLLECT_TIMEOUT`]. A leftover
//!   that survives a collection is held by something (a lease, an image): a leak.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::containerd::{self, Containerd};

/// How long [`Store::assert_clean`] keeps collecting a containerd namespace before it calls
/// what is left a leak. One collection of a test's namespace takes milliseconds; a second
/// covers a pull's cleanup that finishes just after its answer.
pub const COLLECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The kinds of object [`Store::leftovers`] lists for a containerd namespace: the `ctr`
/// command's words, as the prefix of each listed item.
const CONTAINERD_KINDS: &[(&str, &[&str])] = &[
    ("content", &["content", "ls"]),
    ("ingest", &["content", "active"]),
    ("snapshot", &["snapshots", "ls"]),
    ("lease", &["leases", "ls"]),
    ("image", &["images", "ls"]),
];

/// Which backend stores a test's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// pullbox's own store under a root directory (the default).
    Embedded,
    /// containerd's services (`backend = "containerd"`), on a real containerd.
    Containerd,
}

/// One test's store on a backend. See the module docs.
#[derive(Debug)]
pub struct Store {
    backend: Backend,
    /// The containerd and namespace of a containerd store.
    containerd: Option<(&'static Containerd, String)>,
}

impl Store {
    /// A store on `backend`; for containerd a fresh namespace (starting the shared
    /// containerd on first use).
    pub fn new(backend: Backend) -> Result<Store> {
        let containerd = match backend {
            Backend::Embedded => None,
            Backend::Containerd => Some((containerd::shared()?, containerd::fresh_namespace())),
        };
        Ok(Store { backend, containerd })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The containerd and the namespace of a containerd store.
    pub fn containerd(&self) -> Option<(&'static Containerd, &str)> {
        self.containerd.as_ref().map(|(c, ns)| (*c, ns.as_str()))
    }

    /// A daemon config's TOML around `extra` (top-level keys, then tables): for containerd,
    /// `backend` before it and the `[containerd]` table (socket, namespace, root) after it.
    pub fn daemon_config(&self, extra: &str) -> String {
        match self.containerd() {
            None => extra.to_owned(),
            Some((ctd, ns)) => format!(
                "backend = \"containerd\"\n{extra}\n[containerd]\naddress = {:?}\nnamespace = {ns:?}\nroot = {:?}\n",
                ctd.socket().display().to_string(),
                ctd.root().display().to_string(),
            ),
        }
    }

    /// The CLI's arguments that select this store (besides `--root`, which every store
    /// command gets: it also holds the compiled-puller cache).
    pub fn cli_args(&self) -> Vec<OsString> {
        match self.containerd() {
            None => Vec::new(),
            Some((ctd, ns)) => vec![
                "--backend".into(),
                "containerd".into(),
                "--containerd-address".into(),
                ctd.socket().into(),
                "--containerd-namespace".into(),
                ns.into(),
            ],
        }
    }

    /// What the store holds, sorted, each as `<kind>/<name>`: under `root` for the embedded
    /// backend (see [`embedded_leftovers`]), in the namespace for containerd. Empty for an
    /// empty store.
    pub fn leftovers(&self, root: &Path) -> Result<Vec<String>> {
        let Some((ctd, ns)) = self.containerd() else {
            return Ok(embedded_leftovers(root));
        };
        let mut out = Vec::new();
        for (kind, command) in CONTAINERD_KINDS {
            let listing = ctd.ctr_ok(ns, command)?;
            out.extend(
                listing
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().next())
                    .map(|name| format!("{kind}/{name}")),
            );
        }
        out.sort();
        Ok(out)
    }

    /// Fails the test when the store holds anything (`after` says after what); a containerd
    /// namespace is collected first (see the module docs). `root` is the embedded store's.
    #[track_caller]
    pub fn assert_clean(&self, root: &Path, after: &str) {
        let leftovers =
            |s: &Store| s.leftovers(root).unwrap_or_else(|e| panic!("{after}: cannot list the store: {e:#}"));
        let mut left = leftovers(self);
        let Some((ctd, ns)) = self.containerd() else {
            assert!(left.is_empty(), "{after} left behind in {}: {left:#?}", root.display());
            return;
        };
        if left.is_empty() {
            return;
        }
        let first = left.clone();
        let t = Instant::now();
        while !left.is_empty() && t.elapsed() < COLLECT_TIMEOUT {
            ctd.collect(ns).unwrap_or_else(|e| panic!("{after}: collecting {ns} failed: {e:#}"));
            left = leftovers(self);
            if !left.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        assert!(
            left.is_empty(),
            "{after} left behind in containerd namespace {ns}, collected for {:?}: {left:#?}",
            t.elapsed()
        );
        eprintln!(
            "{after}: containerd namespace {ns} was clean after a collection ({:?}); before it held {first:?}",
            t.elapsed()
        );
    }
}

/// Everything under the embedded store `root`'s blobs, ingests and snapshots, as paths
/// relative to `root`, sorted. Empty for an empty store.
pub fn embedded_leftovers(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["content/blobs/sha256", "content/ingest", "snapshots"] {
        let d = root.join(dir);
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            out.push(format!("{dir}/{}", e.file_name().to_string_lossy()));
        }
    }
    out.sort();
    out
}

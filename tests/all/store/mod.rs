//! The embedded store against real images: exact root filesystems (compared with `umoci
//! unpack` through `pullbox mount`), hostile archives, READY-only answers after damage, crash
//! safety (`kill -9` mid-pull) and concurrent pulls and removes.
//!
//! Needs `make build` first. Tests that mount need root: they are `#[ignore = "needs root: ..."]`,
//! so that an ordinary user's run lists them as ignored; `make test-integration` run as root
//! (as CI runs) includes them (`--include-ignored`). A few tests that also run unprivileged
//! compare mounted root filesystems only when run as root. Images: the shared fixture's `team/app`, the umoci-built corpus
//! of [`pullbox_tests::corpus`] and hand-made hostile layers ([`pullbox_tests::hostile`]).
//! Pulls are held in a known state with the tests' HTTP server ([`pullbox_tests::fault_server`]): a download
//! held after some bytes, until the test releases it.
//!
//! The suite's sections are the parts of this folder; this file holds what they share.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pullbox_tests::corpus::{corpus, LAYERS};
use pullbox_tests::fault_server::FaultServer;
use pullbox_tests::hostile::{nonce, push_image, HostileTar};
use pullbox_tests::mounts::{compare_rootfs, find_named, require_root, Inventory, Mounted};
use pullbox_tests::oci::{file_digest, is_root, MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_TAR, MEDIA_TYPE_LAYER_ZSTD};
use pullbox_tests::tree::{diff, scan};
use pullbox_tests::{app, fixture, Captured, Pullbox};

mod concurrency;
mod hostile_archives;
mod layer_bombs;
mod leases_and_gc;
mod permissions;
mod ready_only;
mod rootfs;

const NO_ARGS: [&str; 0] = [];

/// How long a test waits for a background pull to reach a state.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// A fresh store whose compiled-puller cache is shared with every other store of this test
/// binary: compiling the puller takes a second, the rest of a pull milliseconds. (Cache
/// entries are written atomically, so sharing them between processes is safe.)
fn pullbox() -> Pullbox {
    let pb = Pullbox::new().unwrap_or_else(|e| panic!("{e:#}"));
    let shared = fixture().registry.dir().join("store-puller-cache");
    fs::create_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(&shared, pb.root().join("cache")).unwrap();
    pb
}

/// The IDs `images --json` lists.
fn listed(pb: &Pullbox) -> Vec<String> {
    pb.images_json().iter().map(|i| i["id"].as_str().unwrap_or_default().to_owned()).collect()
}

fn inventory(pb: &Pullbox) -> Inventory {
    Inventory::of(pb.root()).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until `cond` holds, failing the test (with `what`) after [`STATE_TIMEOUT`] or when
/// `child` exits first.
#[track_caller]
fn wait_for(child: &mut Child, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + STATE_TIMEOUT;
    while !cond() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the pull exited ({status}) before {what}");
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pull running in the background, its stderr in a file the test can read meanwhile.
struct Background {
    child: Child,
    stderr: tempfile::NamedTempFile,
}

impl Background {
    /// `pullbox pull --log pullbox=info ARGS REF` in the background.
    fn pull(pb: &Pullbox, args: &[&str], reference: &str) -> Background {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let child = pb
            .command("pull", ["--log", "pullbox=info"].iter().chain(args).copied().chain([reference]))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap();
        Background { child, stderr }
    }

    /// Waits for the pull to end and captures its output.
    fn finish(self) -> Captured {
        let out = self.child.wait_with_output().unwrap();
        Captured {
            command: "background pull".to_owned(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: fs::read_to_string(self.stderr.path()).unwrap_or_default(),
        }
    }
}

/// The blob digests of the fixture's `team/app`.
fn app_blobs() -> BTreeSet<String> {
    fixture().app.blobs().into_iter().collect()
}

/// A gated proxy in front of the fixture's registry.
fn proxy() -> FaultServer {
    FaultServer::proxy(fixture().registry.addr()).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The GETs of blob `digest` through `proxy` that started a download (not a resumption).
fn downloads(proxy: &FaultServer, digest: &str) -> usize {
    proxy.downloads(&format!("/blobs/{digest}"))
}

/// The store holds exactly `app`, pulled once: its blobs, three snapshots, nothing in progress.
#[track_caller]
fn assert_only_app(pb: &Pullbox) -> Inventory {
    let inv = inventory(pb);
    assert_eq!(inv.blobs, app_blobs(), "{inv:#?}");
    assert_eq!(inv.snapshots.len(), app::LAYERS, "{inv:#?}");
    assert!(
        inv.ingests.is_empty() && inv.snapshot_strays.is_empty() && inv.mounts.is_empty() && inv.staging.is_empty(),
        "{inv:#?}"
    );
    inv
}

/// When this process may mount: `image`'s root filesystem through `pullbox mount` equals
/// `app`'s as umoci unpacks it.
#[track_caller]
fn assert_app_mounts(pb: &Pullbox, image: &str) {
    if !is_root() {
        return;
    }
    let mounted = Mounted::new(pb, image).unwrap_or_else(|e| panic!("{e:#}"));
    let differences = diff(&fixture().rootfs, &scan(mounted.path()).unwrap());
    assert!(differences.is_empty(), "the mounted root filesystem differs from umoci's:\n{}", differences.join("\n"));
}

//! Running the `pullbox` binary against a private store.
//!
//! Key type: [`Pullbox`], one store root (a temporary directory) plus the binary. Every
//! store command is run as `pullbox SUBCOMMAND --root ROOT ARGS...`, so `--root` works
//! whether the CLI defines it on each subcommand or globally. [`Pullbox::on`] puts the store
//! on a backend of the test's choice ([`Backend`]): with containerd, every command also gets
//! the arguments that select a fresh namespace of the shared containerd. The environment variables
//! that select a store or a puller (`PULLBOX_ROOT`, `PULLBOX_PULLER`, `PULLBOX_SETTINGS`)
//! are removed from every command so that the developer's shell cannot change a test;
//! tests that exercise them set them explicitly.
//!
//! Locations, each overridable for a build elsewhere:
//! - the binary: `$PULLBOX_BIN`, else `$CARGO_TARGET_DIR/release/pullbox`, else
//!   `<workspace>/target/release/pullbox` (what `make build` produces);
//! - the pullers: next to the binary (`pullbox-puller.wasm`, `pullbox-refuse.wasm`).
//!
//! `PULLBOX_TEST_KEEP=1` keeps every store root and prints where it is.
//! `PULLBOX_TEST_TIMEOUT=SECONDS` changes how long one command may run (default 120 s).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::backends::{Backend, Store};
use crate::oci::{digest_hex, is_sha256_digest};
use crate::process::{run, Captured};

/// Environment variables the CLI reads; cleared for every command (see the module docs).
pub const PULLBOX_ENV: &[&str] = &[
    "PULLBOX_ROOT",
    "PULLBOX_PULLER",
    "PULLBOX_SETTINGS",
    "PULLBOX_PLATFORM",
    "PULLBOX_HOSTS_DIR",
    "PULLBOX_DOCKER_CONFIG",
    "PULLBOX_STALL_TIMEOUT",
    "PULLBOX_BACKEND",
    "PULLBOX_CONTAINERD_ADDRESS",
    "PULLBOX_CONTAINERD_NAMESPACE",
    "PULLBOX_MAX_LAYER_BYTES",
];

/// A store root and the binary that works on it.
#[derive(Debug)]
pub struct Pullbox {
    bin: PathBuf,
    root: tempfile::TempDir,
    store: Store,
    timeout: Duration,
}

impl Pullbox {
    /// A fresh, empty store root (embedded backend). Fails when the binary is missing.
    pub fn new() -> Result<Self> {
        Self::on(Backend::Embedded)
    }

    /// A fresh, empty store on `backend`; the root also holds the compiled-puller cache.
    pub fn on(backend: Backend) -> Result<Self> {
        let bin = Self::bin()?;
        let mut root = tempfile::Builder::new().prefix("pullbox-root-").tempdir()?;
        if std::env::var_os("PULLBOX_TEST_KEEP").is_some_and(|v| v == "1") {
            root.disable_cleanup(true);
            eprintln!("keeping pullbox root {}", root.path().display());
        }
        let timeout = std::env::var("PULLBOX_TEST_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(120));
        let store = Store::new(backend)?;
        Ok(Pullbox { bin, root, store, timeout })
    }

    /// Where the commands store images.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Fails the test when the store holds anything (see [`Store::assert_clean`]); `after`
    /// says after what.
    #[track_caller]
    pub fn assert_clean(&self, after: &str) {
        self.store.assert_clean(self.root(), after);
    }

    /// The workspace root (the parent of this crate).
    pub fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
    }

    /// The binary; see the module docs for where it is looked for.
    pub fn bin() -> Result<PathBuf> {
        let workspace = Self::workspace();
        let bin = match (std::env::var_os("PULLBOX_BIN"), std::env::var_os("CARGO_TARGET_DIR")) {
            (Some(bin), _) => PathBuf::from(bin),
            (None, Some(target)) => workspace.join(target).join("release/pullbox"),
            (None, None) => workspace.join("target/release/pullbox"),
        };
        ensure!(bin.is_file(), "pullbox binary not found at {}: run `make build` (or set PULLBOX_BIN)", bin.display());
        Ok(bin)
    }

    /// A puller component next to the binary, for example `pullbox-refuse.wasm`.
    pub fn puller(name: &str) -> Result<PathBuf> {
        let path = Self::bin()?.parent().unwrap().join(name);
        ensure!(path.is_file(), "puller {} not found: run `make build`", path.display());
        Ok(path)
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `pullbox SUBCOMMAND --root ROOT ARGS...`, with the pullbox environment cleared.
    pub fn command<S: AsRef<OsStr>>(&self, subcommand: &str, args: impl IntoIterator<Item = S>) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(subcommand).arg("--root").arg(self.root()).args(self.store.cli_args()).args(args);
        for var in PULLBOX_ENV {
            cmd.env_remove(var);
        }
        cmd
    }

    /// `pullbox SUBCOMMAND ARGS...` with the store root in `PULLBOX_ROOT` instead of
    /// `--root` (the other pullbox variables cleared).
    pub fn command_with_root_env<S: AsRef<OsStr>>(
        &self,
        subcommand: &str,
        args: impl IntoIterator<Item = S>,
    ) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(subcommand).args(self.store.cli_args()).args(args);
        for var in PULLBOX_ENV {
            cmd.env_remove(var);
        }
        cmd.env("PULLBOX_ROOT", self.root());
        cmd
    }

    /// Runs a command made by [`Pullbox::command`] (perhaps with more environment).
    pub fn run_command(&self, cmd: Command) -> Captured {
        run(cmd, self.timeout).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs `pullbox SUBCOMMAND --root ROOT ARGS...`; success or failure is the caller's to
    /// check.
    pub fn run<S: AsRef<OsStr>>(&self, subcommand: &str, args: impl IntoIterator<Item = S>) -> Captured {
        self.run_command(self.command(subcommand, args))
    }

    /// `pull ARGS... REF` that must succeed; returns the image ID, the last line of stdout,
    /// after checking that it is `sha256:<64 hex>`.
    #[track_caller]
    pub fn pull(&self, args: &[&str], reference: &str) -> String {
        let out = self.run("pull", args.iter().copied().chain([reference]));
        out.assert_success();
        let id = out.last_line().unwrap_or_default().to_owned();
        assert!(is_sha256_digest(&id), "the last line of stdout is not an image ID:\n{out}");
        id
    }

    /// `inspect REF` that must succeed, parsed.
    #[track_caller]
    pub fn inspect(&self, reference: &str) -> Value {
        let out = self.run("inspect", [reference]);
        out.assert_success();
        let v = out.json().unwrap_or_else(|e| panic!("{e:#}"));
        assert!(v.is_object(), "inspect did not print a JSON object:\n{out}");
        v
    }

    /// `images --json` that must succeed, parsed.
    #[track_caller]
    pub fn images_json(&self) -> Vec<Value> {
        let out = self.run("images", ["--json"]);
        out.assert_success();
        match out.json().unwrap_or_else(|e| panic!("{e:#}")) {
            Value::Array(images) => images,
            other => panic!("images --json printed {other}, not an array:\n{out}"),
        }
    }

    /// Where the store keeps blob `digest`: `<root>/content/blobs/sha256/<hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root().join("content/blobs/sha256").join(digest_hex(digest))
    }

    /// Every snapshot's `fs` directory, `<root>/snapshots/<id>/fs`, sorted.
    pub fn snapshot_fs_dirs(&self) -> Result<Vec<PathBuf>> {
        let dir = self.root().join("snapshots");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut dirs = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let fs_dir = entry?.path().join("fs");
            if fs_dir.is_dir() {
                dirs.push(fs_dir);
            }
        }
        dirs.sort();
        Ok(dirs)
    }

    /// Every blob file under `<root>/content/blobs/sha256/`, as `sha256:<hex>`.
    pub fn blob_digests(&self) -> Result<Vec<String>> {
        let dir = self.root().join("content/blobs/sha256");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut digests = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.len() == 64 {
                digests.push(format!("sha256:{name}"));
            } else {
                bail!("unexpected file {name} in {}", dir.display());
            }
        }
        digests.sort();
        Ok(digests)
    }
}

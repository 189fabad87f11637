//! pullbox's integration tests, in one test binary (as wasmtime's `tests/all`): one module per
//! suite, so the shared parts — the fixture's images and registry ([`pullbox_tests::fixture`]),
//! the umoci-built corpus ([`pullbox_tests::corpus`]), the shared containerd
//! ([`pullbox_tests::containerd::shared`]) — are built once per test process instead of once
//! per suite, and cargo links one binary instead of fourteen.
//!
//! Run one suite by its module path: `cargo test --release -p pullbox-tests --test all --
//! sandbox::` (needs `make build` first). Tests that need root are
//! `#[ignore = "needs root: ..."]`, so an ordinary user's run lists them as ignored instead of
//! passing them unchecked; `make test-integration` run as root (as CI runs) adds
//! `--include-ignored`.

mod backend_contract;
mod cli;
mod containerd_backend;
mod cosign;
mod cri;
mod cri_containerd;
mod cri_containerd_images;
mod harness;
mod kit;
mod policy;
mod proxy_snapshotter;
mod puller;
mod sandbox;
mod store;
mod transport;

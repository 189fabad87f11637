//! The integration-test harness for pullbox: real parts, started by the tests themselves.
//!
//! - [`registry::Registry`]: Debian's `docker-registry` on a free port of 127.0.0.1,
//!   stopped (and its files deleted) when dropped or when the test process ends.
//! - [`oci`]: building images with `umoci` ([`oci::Layout`]), pushing and reading them back
//!   with `skopeo` ([`oci::RemoteImage`], [`oci::RemoteIndex`]), [`oci::chain_id`].
//! - [`fixture::fixture`]: the shared images, built and pushed once per test process
//!   (about a second); [`fixture::app`] lists what the main image contains.
//! - [`pullbox::Pullbox`]: the `pullbox` binary with a private store root.
//! - [`cosign`]: cosign keys, payloads and signatures the tests make and push themselves.
//! - [`tree`]: scanning snapshot directories and comparing them with `umoci unpack`.
//! - [`process`]: running programs with captured output and a deadline.
//! - [`service`]: long-running programs (the registries, containerd) under a supervisor that
//!   stops them and deletes their files when the value is dropped or the test process ends.
//! - [`fault_server`]: the tests' one HTTP server: a proxy in front of a registry that injects
//!   faults (status, delay, reset, stall, corruption), holds downloads part-way until
//!   released and records every request; or a server of the test's own routes.
//! - [`corpus`], [`hostile`], [`bombs`], [`mounts`]: the store suite's images
//!   (umoci-built, hand-made hostile layers, and layer bombs made cheaply) and its views of a
//!   store (mounted root filesystems, what is on disk).
//! - [`configured_registry`], [`tls`], [`token_server`]: the transport tests' registry with
//!   htpasswd or token auth and TLS over the fixture's storage, test certificates, and a
//!   bearer-token endpoint (a route of the [`fault_server`]).
//! - [`sandbox`]: the hostile-puller suite's helpers (a daemon whose puller is swapped live,
//!   components built from WIT with `wasm-tools`); [`backends`]: a test's store on either
//!   backend (a root, or a namespace of one shared [`containerd`]) and what it holds.
//!
//! Needs, on `PATH` or where Debian installs them: `docker-registry`, `umoci`, `skopeo`,
//! `/bin/busybox` (busybox-static), `/bin/sh`. The CLI tests also need `make build`'s
//! output (see [`pullbox`] for where it is looked for). Errors are `anyhow` errors: this is
//! test code, and every message says which command failed and what it printed.

pub mod backends;
pub mod blobs;
pub mod bombs;
pub mod configured_registry;
pub mod containerd;
pub mod corpus;
pub mod cosign;
pub mod cri;
pub mod fault_server;
pub mod fixture;
pub mod hostile;
pub mod mounts;
pub mod oci;
pub mod policy;
pub mod process;
pub mod pullbox;
pub mod registry;
pub mod sandbox;
pub mod service;
pub mod tls;
pub mod token_server;
pub mod tree;

pub use fixture::{app, fixture, Fixture};
pub use oci::{chain_id, Platform, RemoteImage, RemoteIndex};
pub use process::Captured;
pub use pullbox::Pullbox;
pub use registry::Registry;

//! pullbox: pulls container images for Kubernetes nodes through a sandboxed WebAssembly
//! puller.
//!
//! The host is the data plane: registry transport ([`registry`]), the storage backends
//! ([`backend`]), the wasmtime embedding ([`engine`], its store data in [`call`]) and one
//! module per WIT interface ([`interfaces`]), which alone (with the private `bindings`) see
//! generated WIT types. Every decision about what to pull and how to record it is made by the
//! puller component the engine loads. [`snapshotter`] serves the embedded store to containerd
//! as its proxy snapshotter.

pub mod artifact;
pub mod backend;
mod bindings;
pub mod call;
pub mod config;
pub mod cri;
pub mod engine;
pub mod error;
pub mod image;
pub mod interfaces;
pub mod metrics;
pub mod oci;
pub mod registry;
pub mod service;
pub mod session;
pub mod snapshotter;
pub mod verdict;

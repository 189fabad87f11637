//! pullbox's default puller: the control plane of a pull, as a WebAssembly component.
//!
//! The host (pullbox's daemon) moves bytes; this crate decides: it normalizes references
//! ([`reference`]), picks the manifest for the platform ([`platform`]), reads the small
//! documents ([`oci`], [`blob`]), unpacks layers into snapshots named by chain ID
//! ([`digest`], [`pull`]), sets containerd's GC labels and writes the image records
//! ([`labels`]), and answers status, list and remove from those records ([`catalog`]).
//!
//! All of that is written against the [`host::Host`] trait and compiles natively, so
//! `cargo test -p pullbox-puller` runs it against an in-memory fake. Only the private
//! `bindings` module, compiled for `wasm32` alone, touches the generated WIT bindings: it
//! implements `Host` with the imports and exports the `puller` interface through the
//! functions at the root of this crate ([`configure`], [`pull_image`], [`image_status`],
//! [`list_images`], [`remove_image`]).

pub mod blob;
pub mod catalog;
pub mod digest;
pub mod error;
pub mod host;
pub mod labels;
pub mod oci;
pub mod platform;
pub mod pull;
pub mod reference;
pub mod settings;
pub mod types;

#[cfg(target_arch = "wasm32")]
mod bindings;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use error::Result;
use host::Host;
use types::{ImageInfo, Level, PullRequest};

/// `configure`: validates the settings document and makes it current for this instance.
///
/// Errors: `invalid-argument` naming the offending setting; the old settings stay.
pub fn configure(doc: &str) -> Result<()> {
    settings::configure(doc)
}

/// `pull-image`, with the instance's current settings.
pub fn pull_image<H: Host + ?Sized>(host: &H, request: &PullRequest) -> Result<ImageInfo> {
    pull::pull(host, &settings::current(), request).inspect_err(|e| {
        host.log(
            Level::Info,
            &format!("pull of {:?} failed: {e}", request.reference),
        );
    })
}

/// `image-status`.
pub fn image_status<H: Host + ?Sized>(host: &H, reference: &str) -> Result<Option<ImageInfo>> {
    catalog::status(host, reference)
}

/// `list-images`.
pub fn list_images<H: Host + ?Sized>(host: &H) -> Result<Vec<ImageInfo>> {
    catalog::list(host)
}

/// `remove-image`.
pub fn remove_image<H: Host + ?Sized>(host: &H, reference: &str) -> Result<()> {
    catalog::remove(host, reference)
}

//! pullbox's default puller, and the library other pullers are built on.
//!
//! The host (pullbox's daemon) moves bytes; this crate decides: it normalizes references
//! ([`reference`]), applies the pull policy ([`policy`], configured by [`settings`]), picks
//! the manifest for the platform ([`platform`]), reads the small documents ([`oci`],
//! [`blob`]), unpacks layers into snapshots named by chain ID ([`digest`], [`pull`]), sets
//! containerd's GC labels and writes the image records ([`labels`]), and answers status,
//! list and remove from those records ([`catalog`]).
//!
//! All of that is written against the [`host::Host`] trait and compiles natively, so
//! `cargo test -p pullbox-puller` runs it against an in-memory fake ([`fake`], public with
//! the `fake` feature so that other pullers can test with it too). Only the `bindings`
//! module, compiled for `wasm32` alone, touches the generated WIT bindings.
//!
//! ## Two uses
//!
//! - **The default puller** (`pullbox-puller.wasm`): with the `component` feature (on by
//!   default) this crate exports [`DefaultPuller`], whose settings are [`settings::Settings`]
//!   and whose policy is theirs.
//! - **A library for other pullers**: a crate that depends on this one with
//!   `default-features = false` implements [`Puller`] (usually with its own
//!   [`policy::Policy`] handed to [`pull::pull_with`]) and exports it with
//!   [`export_puller!`]. `guest/allowlist` is the example. The `component` feature must
//!   stay off there: two crates exporting the same WIT functions cannot link into one
//!   module.

pub mod blob;
pub mod catalog;
pub mod digest;
pub mod error;
pub mod host;
pub mod labels;
pub mod oci;
pub mod platform;
pub mod policy;
pub mod pull;
pub mod reference;
pub mod settings;
pub mod types;
pub mod unlabelled;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings;

#[cfg(any(test, feature = "fake"))]
pub mod fake;
#[cfg(test)]
mod tests;

use error::Result;
use host::Host;
use types::{ImageInfo, Level, PullRequest};

/// What a puller component does, in the plain types of this crate: one method per export
/// of interface `puller`. [`export_puller!`] turns an implementation into the component's
/// exports; the host creates a fresh instance for every call and calls
/// [`Puller::configure`] right before it, so settings kept in a `static` are the current
/// ones.
///
/// Only `configure` and `pull_image` must be written; status, list and remove default to
/// the [`catalog`] answers, which read the records that [`pull::pull_with`] writes and
/// derive the same from content for records anything else wrote ([`unlabelled`]).
pub trait Puller {
    /// `configure`: validates the settings document and makes it current.
    ///
    /// Errors: `invalid-argument` naming the offending setting; the old settings stay.
    fn configure(settings: &str) -> Result<()>;

    /// `pull-image`.
    fn pull_image(host: &dyn Host, request: &PullRequest) -> Result<ImageInfo>;

    /// `image-status` (no image is pinned but by its records' label).
    fn image_status(host: &dyn Host, reference: &str) -> Result<Option<ImageInfo>> {
        catalog::status(host, reference, &[])
    }

    /// `list-images` (no image is pinned but by its records' label).
    fn list_images(host: &dyn Host) -> Result<Vec<ImageInfo>> {
        catalog::list(host, &[])
    }

    /// `remove-image`.
    fn remove_image(host: &dyn Host, reference: &str) -> Result<()> {
        catalog::remove(host, reference)
    }
}

/// The default puller: [`settings::Settings`] as its settings and its policy.
pub struct DefaultPuller;

impl Puller for DefaultPuller {
    fn configure(doc: &str) -> Result<()> {
        settings::configure(doc)
    }

    fn pull_image(host: &dyn Host, request: &PullRequest) -> Result<ImageInfo> {
        pull::pull(host, &settings::current(), request).inspect_err(|e| {
            host.log(Level::Info, &format!("pull of {:?} failed: {e}", request.reference));
        })
    }

    fn image_status(host: &dyn Host, reference: &str) -> Result<Option<ImageInfo>> {
        catalog::status(host, reference, &settings::current().pinned_images)
    }

    fn list_images(host: &dyn Host) -> Result<Vec<ImageInfo>> {
        catalog::list(host, &settings::current().pinned_images)
    }
}

/// `configure` of the default puller.
pub fn configure(doc: &str) -> Result<()> {
    DefaultPuller::configure(doc)
}

/// `pull-image` of the default puller, with the instance's current settings.
pub fn pull_image(host: &dyn Host, request: &PullRequest) -> Result<ImageInfo> {
    DefaultPuller::pull_image(host, request)
}

/// `image-status`.
pub fn image_status(host: &dyn Host, reference: &str) -> Result<Option<ImageInfo>> {
    DefaultPuller::image_status(host, reference)
}

/// `list-images`.
pub fn list_images(host: &dyn Host) -> Result<Vec<ImageInfo>> {
    DefaultPuller::list_images(host)
}

/// `remove-image`.
pub fn remove_image(host: &dyn Host, reference: &str) -> Result<()> {
    DefaultPuller::remove_image(host, reference)
}

/// Exports a [`Puller`] as the component's implementation of interface `puller`.
///
/// Use it once, at the root of a `cdylib` crate built for `wasm32-unknown-unknown`, on a
/// unit struct that implements [`Puller`]:
///
/// ```ignore
/// struct MyPuller;
/// impl pullbox_puller::Puller for MyPuller { /* configure, pull_image */ }
/// #[cfg(target_arch = "wasm32")]
/// pullbox_puller::export_puller!(MyPuller);
/// ```
///
/// It only exists for `wasm32` targets (the WIT bindings do), hence the `cfg`.
#[macro_export]
macro_rules! export_puller {
    ($puller:ident) => {
        const _: () = {
            use $crate::bindings::exports::pullbox::image::puller as __exp;
            use $crate::bindings::pullbox::image::types as __wit;

            impl __exp::Guest for $puller {
                fn configure(settings: ::std::string::String) -> ::std::result::Result<(), __wit::Error> {
                    $crate::bindings::configure::<$puller>(settings)
                }

                fn pull_image(
                    request: __exp::PullRequest,
                ) -> ::std::result::Result<__exp::ImageInfo, __wit::Error> {
                    $crate::bindings::pull_image::<$puller>(request)
                }

                fn image_status(
                    reference: ::std::string::String,
                ) -> ::std::result::Result<::std::option::Option<__exp::ImageInfo>, __wit::Error> {
                    $crate::bindings::image_status::<$puller>(reference)
                }

                fn list_images() -> ::std::result::Result<::std::vec::Vec<__exp::ImageInfo>, __wit::Error> {
                    $crate::bindings::list_images::<$puller>()
                }

                fn remove_image(
                    reference: ::std::string::String,
                ) -> ::std::result::Result<(), __wit::Error> {
                    $crate::bindings::remove_image::<$puller>(reference)
                }
            }
        };
        $crate::bindings::export!($puller with_types_in $crate::bindings);
    };
}

#[cfg(all(target_arch = "wasm32", feature = "component"))]
export_puller!(DefaultPuller);

//! Platform matching: which manifest of an index runs on the requested platform.
//!
//! Both sides are normalized first, as containerd's `platforms.Normalize` does: OS and
//! architecture are lowercased, `x86_64` is `amd64`, `aarch64` is `arm64`, and arm64 `v8`
//! (or `8`, `v8.0`) is the same as no variant; 32-bit `arm` without a variant is `v7`.
//! Then [`rank`] scores a candidate (lower is better):
//!
//! - 0: same OS, architecture and variant;
//! - 1 + distance: `arm` with an older variant than asked for (`v7` runs `v6` and `v5`),
//!   as containerd's `platforms.Only` accepts;
//! - [`ANY_VARIANT`]: the request named no variant, so any variant of the architecture is
//!   accepted, behind the exact matches.
//!
//! [`select`] returns the best entry, the first of equals in index order. Entries without a
//! platform are never chosen: an index entry that names no platform cannot be matched.

use crate::types::{Descriptor, Platform};

/// Rank of a candidate whose variant differs from a request that named none.
pub const ANY_VARIANT: u32 = 100;

/// A platform reduced to what matching compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// Lowercased OS.
    pub os: String,
    /// Canonical GOARCH.
    pub architecture: String,
    /// Canonical variant; empty for the architecture's baseline.
    pub variant: String,
}

/// Normalizes `os/architecture/variant` as containerd does.
pub fn normalize(os: &str, architecture: &str, variant: &str) -> Normalized {
    let os = match os.to_ascii_lowercase().as_str() {
        "macos" => "darwin".to_string(),
        other => other.to_string(),
    };
    let arch = architecture.to_ascii_lowercase();
    let variant = variant.to_ascii_lowercase();
    let (arch, variant) = match arch.as_str() {
        "i386" => ("386".to_string(), String::new()),
        "x86_64" | "x86-64" | "amd64" => {
            let v = if variant == "v1" {
                String::new()
            } else {
                variant
            };
            ("amd64".to_string(), v)
        }
        "aarch64" | "arm64" => {
            let v = match variant.as_str() {
                "8" | "v8" | "v8.0" => String::new(),
                "9" | "9.0" | "v9.0" => "v9".to_string(),
                _ => variant,
            };
            ("arm64".to_string(), v)
        }
        "armhf" => ("arm".to_string(), "v7".to_string()),
        "armel" => ("arm".to_string(), "v6".to_string()),
        "arm" => {
            let v = match variant.as_str() {
                "" | "7" => "v7".to_string(),
                "5" | "6" | "8" => format!("v{variant}"),
                _ => variant,
            };
            ("arm".to_string(), v)
        }
        _ => (arch, variant),
    };
    Normalized {
        os,
        architecture: arch,
        variant,
    }
}

fn arm_level(variant: &str) -> Option<u32> {
    match variant {
        "v5" => Some(5),
        "v6" => Some(6),
        "v7" => Some(7),
        "v8" => Some(8),
        _ => None,
    }
}

/// Scores candidate `have` for request `want`; `None` when it does not run there.
pub fn rank(want: &Platform, have: &Platform) -> Option<u32> {
    let w = normalize(&want.os, &want.architecture, &want.variant);
    let h = normalize(&have.os, &have.architecture, &have.variant);
    if w.os != h.os || w.architecture != h.architecture {
        return None;
    }
    if w.variant == h.variant {
        return Some(0);
    }
    if w.architecture == "arm" {
        if let (Some(wl), Some(hl)) = (arm_level(&w.variant), arm_level(&h.variant)) {
            if hl < wl {
                return Some(1 + (wl - hl));
            }
        }
    }
    if want.variant.is_empty() {
        return Some(ANY_VARIANT);
    }
    None
}

/// The index of the best manifest for `want` among `manifests`, or `None`.
pub fn select(want: &Platform, manifests: &[Descriptor]) -> Option<usize> {
    manifests
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            d.platform
                .as_ref()
                .and_then(|p| rank(want, p))
                .map(|r| (r, i))
        })
        .min()
        .map(|(_, i)| i)
}

/// `os/architecture[/variant]`, for messages.
pub fn display(p: &Platform) -> String {
    if p.variant.is_empty() {
        format!("{}/{}", p.os, p.architecture)
    } else {
        format!("{}/{}/{}", p.os, p.architecture, p.variant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        let mut parts = s.split('/');
        Platform {
            os: parts.next().unwrap_or_default().into(),
            architecture: parts.next().unwrap_or_default().into(),
            variant: parts.next().unwrap_or_default().into(),
            ..Platform::default()
        }
    }

    fn entries(platforms: &[&str]) -> Vec<Descriptor> {
        platforms
            .iter()
            .map(|s| Descriptor {
                platform: if s.is_empty() { None } else { Some(p(s)) },
                ..Descriptor::default()
            })
            .collect()
    }

    #[test]
    fn rank_table() {
        let cases: &[(&str, &str, Option<u32>)] = &[
            ("linux/amd64", "linux/amd64", Some(0)),
            ("linux/amd64", "linux/x86_64", Some(0)),
            ("linux/amd64", "Linux/AMD64", Some(0)),
            ("linux/amd64", "linux/arm64", None),
            ("linux/amd64", "windows/amd64", None),
            ("linux/arm64", "linux/arm64/v8", Some(0)),
            ("linux/arm64/v8", "linux/arm64", Some(0)),
            ("linux/aarch64", "linux/arm64/v8", Some(0)),
            ("linux/arm64/v8", "linux/arm64/v9", None),
            ("linux/arm64", "linux/arm64/v9", Some(ANY_VARIANT)),
            ("linux/arm", "linux/arm/v7", Some(0)),
            ("linux/arm/v7", "linux/arm", Some(0)),
            ("linux/arm/v7", "linux/arm/v6", Some(2)),
            ("linux/arm/v7", "linux/arm/v5", Some(3)),
            ("linux/arm/v6", "linux/arm/v7", None),
            ("linux/arm", "linux/arm/v6", Some(2)),
            ("linux/arm", "linux/arm/v8", Some(ANY_VARIANT)),
            ("linux/amd64", "linux/amd64/v3", Some(ANY_VARIANT)),
            ("linux/amd64/v2", "linux/amd64/v3", None),
            ("linux/amd64", "unknown/unknown", None),
        ];
        for (want, have, expect) in cases {
            assert_eq!(rank(&p(want), &p(have)), *expect, "{want} <- {have}");
        }
    }

    #[test]
    fn select_prefers_the_best_then_the_first() {
        let idx = entries(&[
            "linux/amd64",
            "linux/arm64/v8",
            "linux/arm/v7",
            "linux/arm/v6",
        ]);
        assert_eq!(select(&p("linux/amd64"), &idx), Some(0));
        assert_eq!(select(&p("linux/arm64"), &idx), Some(1));
        assert_eq!(select(&p("linux/arm"), &idx), Some(2));
        assert_eq!(select(&p("linux/arm/v6"), &idx), Some(3));
        assert_eq!(select(&p("linux/s390x"), &idx), None);

        // Request without variant: exact beats any; among equals the first wins.
        let idx = entries(&["linux/arm64/v9", "linux/arm64", "linux/arm64/v8"]);
        assert_eq!(select(&p("linux/arm64"), &idx), Some(1));
        let idx = entries(&["linux/amd64/v3", "linux/amd64/v2"]);
        assert_eq!(select(&p("linux/amd64"), &idx), Some(0));

        // Entries without a platform and attestation entries are never chosen.
        let idx = entries(&["", "unknown/unknown", "linux/amd64"]);
        assert_eq!(select(&p("linux/amd64"), &idx), Some(2));
        assert_eq!(select(&p("linux/amd64"), &entries(&[""])), None);
    }
}

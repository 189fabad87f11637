//! Platform matching: which manifest of an index runs on the requested platform, as
//! containerd's `platforms.Only` decides it; and the platform patterns of the policy.
//!
//! Both sides are normalized first, as containerd's `platforms.Normalize` does: OS and
//! architecture are lowercased (an empty OS is `linux`, `macos` is `darwin`), `x86_64` is
//! `amd64` (`v1` is no variant), `aarch64` is `arm64` (`v8` is no variant, `v9.0` is
//! `v9`), 32-bit `arm` without a variant is `v7`, `armhf` is `arm/v7`, `armel` is
//! `arm/v6`, `i386` is `386`.
//!
//! [`candidates`] is containerd's `platformVector`: the platforms a request accepts, best
//! first. The request itself, then
//!
//! - `amd64/vN`: `amd64/vN-1` … `amd64` (v1), then `386`;
//! - `arm/vN`: `arm/vN-1` … `arm/v5`;
//! - `arm64/v8.x`: `arm64/v8.x-1` … `arm64`; `arm64/v9.x`: `arm64/v9.x-1` … `arm64/v9`, then
//!   `arm64/v8.(x+5)` … `arm64`; then for every `arm64`, 32-bit `arm/v8` … `arm/v5`.
//!
//! A candidate matches an index entry when OS, architecture and variant are equal after
//! normalization and the entry's `os.features` are a subset of the request's (a request
//! naming none matches only entries requiring none). The variant must match exactly: a
//! request for `linux/amd64` does not take an `amd64/v3`-only image, and one for
//! `linux/arm64` does not take `arm64/v9`, as in containerd. [`rank`] is the position of the
//! first matching candidate; [`select`] returns the best entry, the first of equals in index
//! order (containerd sorts stably). Entries without a platform are not ranked: the pull
//! considers them afterwards, by their config, as containerd's `images.Manifest` does.
//!
//! The host fills the request with its own platform when the user names none (a default per
//! host: `linux/arm64/v8` on aarch64, `linux/amd64` on x86_64), so that machine's fallbacks
//! apply.

use crate::types::{Descriptor, Platform};

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

impl Normalized {
    fn new(os: &str, architecture: &str, variant: &str) -> Normalized {
        normalize(os, architecture, variant)
    }
}

/// Normalizes `os/architecture/variant` as containerd does.
pub fn normalize(os: &str, architecture: &str, variant: &str) -> Normalized {
    let os = match os.to_ascii_lowercase().as_str() {
        "" => "linux".to_string(),
        "macos" => "darwin".to_string(),
        other => other.to_string(),
    };
    let arch = architecture.to_ascii_lowercase();
    let variant = variant.to_ascii_lowercase();
    let (arch, variant) = match arch.as_str() {
        "i386" => ("386".to_string(), String::new()),
        "x86_64" | "x86-64" | "amd64" => {
            let v = if variant == "v1" { String::new() } else { variant };
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
    Normalized { os, architecture: arch, variant }
}

/// `N` of a variant `vN` (or `N`).
fn variant_number(variant: &str) -> Option<u32> {
    variant.strip_prefix('v').unwrap_or(variant).parse().ok()
}

/// The platforms a request for `want` accepts, best first (containerd's `platformVector`
/// over the normalized request).
pub fn candidates(want: &Platform) -> Vec<Normalized> {
    let w = normalize(&want.os, &want.architecture, &want.variant);
    let mut out = Vec::new();
    vector(&w.os, &w.architecture, &w.variant, &mut out);
    out
}

fn vector(os: &str, arch: &str, variant: &str, out: &mut Vec<Normalized>) {
    out.push(Normalized::new(os, arch, variant));
    match arch {
        "amd64" => {
            if let Some(n) = variant_number(variant).filter(|&n| n > 1) {
                for k in (1..n).rev() {
                    out.push(Normalized::new(os, "amd64", &format!("v{k}")));
                }
            }
            out.push(Normalized::new(os, "386", ""));
        }
        "arm" => {
            if let Some(n) = variant_number(variant).filter(|&n| n > 5) {
                for k in (5..n).rev() {
                    out.push(Normalized::new(os, "arm", &format!("v{k}")));
                }
            }
        }
        "arm64" => {
            let mut variant = if variant.is_empty() { "v8" } else { variant }.to_string();
            let (major, minor) = match variant.split_once('.') {
                Some((ma, mi)) => (ma, Some(mi)),
                None => (variant.as_str(), None),
            };
            if let Some(mut major) = variant_number(major).filter(|&m| m >= 8) {
                let mut minor: u32 = match minor {
                    Some(mi) if variant.len() == 4 => mi.parse().unwrap_or(0),
                    _ => 0,
                };
                if major == 9 {
                    for m in (0..minor).rev() {
                        let v = if m == 0 { "v9".to_string() } else { format!("v9.{m}") };
                        out.push(Normalized::new(os, "arm64", &v));
                    }
                    // v9.x diverged from v8.(x+5).
                    minor += 5;
                    major = 8;
                    out.push(Normalized::new(os, "arm64", &format!("v8.{minor}")));
                }
                for m in (0..minor).rev() {
                    let v = if m == 0 { format!("v{major}") } else { format!("v{major}.{m}") };
                    out.push(Normalized::new(os, "arm64", &v));
                }
            }
            if variant.starts_with("v8.") || variant.starts_with("v9.") {
                variant = "v8".to_string();
            }
            vector(os, "arm", &variant, out);
        }
        _ => {}
    }
}

/// Whether `have` requires only OS features that `want` has.
fn features_ok(want: &Platform, have: &Platform) -> bool {
    have.os_features.iter().all(|f| want.os_features.iter().any(|w| w == f))
}

/// Scores candidate `have` for request `want` (its position in [`candidates`], lower is
/// better); `None` when it does not run there.
pub fn rank(want: &Platform, have: &Platform) -> Option<u32> {
    if !features_ok(want, have) {
        return None;
    }
    let h = normalize(&have.os, &have.architecture, &have.variant);
    candidates(want).iter().position(|c| *c == h).map(|i| i as u32)
}

/// The index of the best manifest for `want` among `manifests`, or `None`. Entries without
/// a platform are not considered.
pub fn select(want: &Platform, manifests: &[Descriptor]) -> Option<usize> {
    manifests
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.platform.as_ref().and_then(|p| rank(want, p)).map(|r| (r, i)))
        .min()
        .map(|(_, i)| i)
}

/// Whether a config's `os`/`architecture` run on `want`, as containerd checks index entries
/// without a platform: the config's variant is not compared (containerd reads only OS and
/// architecture from it).
pub fn config_matches(want: &Platform, os: &str, architecture: &str) -> bool {
    if architecture.is_empty() {
        return false;
    }
    let have = Platform { os: os.to_string(), architecture: architecture.to_string(), ..Platform::default() };
    rank(want, &have).is_some()
}

/// `os/architecture[/variant]`, for messages.
pub fn display(p: &Platform) -> String {
    if p.variant.is_empty() {
        format!("{}/{}", p.os, p.architecture)
    } else {
        format!("{}/{}/{}", p.os, p.architecture, p.variant)
    }
}

/// A platform the policy allows: `os/architecture[/variant]`. Without a variant it allows
/// every variant of the architecture; with one, that variant exactly (both normalized, so
/// `linux/arm64/v8` is `linux/arm64`'s baseline and `linux/arm/v7` is also `linux/arm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformPattern {
    /// As written, for messages.
    pub text: String,
    os: String,
    architecture: String,
    /// `None`: any variant.
    variant: Option<String>,
}

impl PlatformPattern {
    /// Parses `os/architecture[/variant]`.
    ///
    /// Errors (a message): not two or three non-empty parts of letters, digits, `_`, `.`,
    /// `-`.
    pub fn parse(text: &str) -> Result<PlatformPattern, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok) {
            return Err(format!(
                "{text:?} is not a platform (write os/architecture[/variant], for example linux/arm64)"
            ));
        }
        let n = normalize(parts[0], parts[1], parts.get(2).copied().unwrap_or(""));
        Ok(PlatformPattern {
            text: text.to_string(),
            os: n.os,
            architecture: n.architecture,
            variant: parts.get(2).map(|_| n.variant),
        })
    }

    /// The platform the pattern names, as written (`linux/arm64` → os `linux`, architecture
    /// `arm64`, no variant).
    pub fn platform(&self) -> Platform {
        let mut parts = self.text.split('/');
        Platform {
            os: parts.next().unwrap_or_default().into(),
            architecture: parts.next().unwrap_or_default().into(),
            variant: parts.next().unwrap_or_default().into(),
            ..Platform::default()
        }
    }

    /// Whether the pattern allows `p`.
    pub fn matches(&self, p: &Platform) -> bool {
        let n = normalize(&p.os, &p.architecture, &p.variant);
        n.os == self.os && n.architecture == self.architecture && self.variant.as_ref().is_none_or(|v| *v == n.variant)
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
            .map(|s| Descriptor { platform: if s.is_empty() { None } else { Some(p(s)) }, ..Descriptor::default() })
            .collect()
    }

    fn names(v: &[Normalized]) -> Vec<String> {
        v.iter()
            .map(|n| {
                let mut s = format!("{}/{}", n.os, n.architecture);
                if !n.variant.is_empty() {
                    s = format!("{s}/{}", n.variant);
                }
                s
            })
            .collect()
    }

    #[test]
    fn candidate_vectors() {
        let cases: &[(&str, &[&str])] = &[
            ("linux/amd64", &["linux/amd64", "linux/386"]),
            ("linux/x86_64", &["linux/amd64", "linux/386"]),
            ("linux/amd64/v1", &["linux/amd64", "linux/386"]),
            ("linux/amd64/v3", &["linux/amd64/v3", "linux/amd64/v2", "linux/amd64", "linux/386"]),
            ("linux/arm/v7", &["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
            ("linux/arm", &["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
            ("linux/arm/v5", &["linux/arm/v5"]),
            ("linux/arm64", &["linux/arm64", "linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
            ("linux/arm64/v8", &["linux/arm64", "linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
            (
                "linux/arm64/v8.2",
                &[
                    "linux/arm64/v8.2",
                    "linux/arm64/v8.1",
                    "linux/arm64",
                    "linux/arm/v8",
                    "linux/arm/v7",
                    "linux/arm/v6",
                    "linux/arm/v5",
                ],
            ),
            (
                "linux/arm64/v9.1",
                &[
                    "linux/arm64/v9.1",
                    "linux/arm64/v9",
                    "linux/arm64/v8.6",
                    "linux/arm64/v8.5",
                    "linux/arm64/v8.4",
                    "linux/arm64/v8.3",
                    "linux/arm64/v8.2",
                    "linux/arm64/v8.1",
                    "linux/arm64",
                    "linux/arm/v8",
                    "linux/arm/v7",
                    "linux/arm/v6",
                    "linux/arm/v5",
                ],
            ),
            ("linux/s390x", &["linux/s390x"]),
            ("/riscv64", &["linux/riscv64"]),
        ];
        for (want, expect) in cases {
            assert_eq!(names(&candidates(&p(want))), *expect, "{want}");
        }
    }

    #[test]
    fn rank_table() {
        let cases: &[(&str, &str, Option<u32>)] = &[
            ("linux/amd64", "linux/amd64", Some(0)),
            ("linux/amd64", "linux/x86_64", Some(0)),
            ("linux/amd64", "Linux/AMD64", Some(0)),
            ("linux/amd64", "linux/amd64/v1", Some(0)),
            ("linux/amd64", "linux/386", Some(1)),
            ("linux/amd64", "linux/i386", Some(1)),
            ("linux/amd64", "linux/arm64", None),
            ("linux/amd64", "windows/amd64", None),
            ("linux/amd64", "unknown/unknown", None),
            // Variants must match: a baseline request takes no newer variant.
            ("linux/amd64", "linux/amd64/v3", None),
            ("linux/amd64/v2", "linux/amd64/v3", None),
            ("linux/amd64/v3", "linux/amd64/v2", Some(1)),
            ("linux/amd64/v3", "linux/amd64", Some(2)),
            ("linux/arm64", "linux/arm64/v8", Some(0)),
            ("linux/arm64/v8", "linux/arm64", Some(0)),
            ("linux/aarch64", "linux/arm64/v8", Some(0)),
            ("linux/arm64/8", "linux/aarch64", Some(0)),
            ("linux/arm64", "linux/arm64/v9", None),
            ("linux/arm64/v8", "linux/arm64/v9", None),
            ("linux/arm64/v9", "linux/arm64/v8.5", Some(1)),
            ("linux/arm64/v9", "linux/arm64", Some(6)),
            ("linux/arm64", "linux/arm/v7", Some(2)),
            ("linux/arm64", "linux/arm", Some(2)),
            ("linux/arm", "linux/arm/v7", Some(0)),
            ("linux/arm/v7", "linux/arm", Some(0)),
            ("linux/arm/v7", "linux/armhf", Some(0)),
            ("linux/arm/v7", "linux/arm/v6", Some(1)),
            ("linux/arm/v7", "linux/armel", Some(1)),
            ("linux/arm/v7", "linux/arm/v5", Some(2)),
            ("linux/arm/v6", "linux/arm/v7", None),
            ("linux/arm", "linux/arm/v8", None),
            ("linux/arm/v8", "linux/arm/v7", Some(1)),
            ("linux/arm", "linux/arm64", None),
            ("/amd64", "linux/amd64", Some(0)),
            ("darwin/arm64", "macos/arm64", Some(0)),
        ];
        for (want, have, expect) in cases {
            assert_eq!(rank(&p(want), &p(have)), *expect, "{want} <- {have}");
        }
    }

    #[test]
    fn os_features_must_be_offered() {
        let mut want = p("windows/amd64");
        let mut have = p("windows/amd64");
        have.os_features = vec!["win32k".into()];
        assert_eq!(rank(&want, &have), None);
        want.os_features = vec!["other".into(), "win32k".into()];
        assert_eq!(rank(&want, &have), Some(0));
        assert_eq!(rank(&want, &p("windows/amd64")), Some(0));
    }

    #[test]
    fn select_prefers_the_best_then_the_first() {
        let idx = entries(&["linux/amd64", "linux/arm64/v8", "linux/arm/v7", "linux/arm/v6"]);
        assert_eq!(select(&p("linux/amd64"), &idx), Some(0));
        assert_eq!(select(&p("linux/arm64"), &idx), Some(1));
        assert_eq!(select(&p("linux/arm"), &idx), Some(2));
        assert_eq!(select(&p("linux/arm/v6"), &idx), Some(3));
        assert_eq!(select(&p("linux/s390x"), &idx), None);

        // Exact beats fallback whatever the order; among equals the first wins.
        let idx = entries(&["linux/386", "linux/amd64", "linux/x86_64"]);
        assert_eq!(select(&p("linux/amd64"), &idx), Some(1));
        let idx = entries(&["linux/arm/v6", "linux/arm/v7"]);
        assert_eq!(select(&p("linux/arm64"), &idx), Some(1));
        assert_eq!(select(&p("linux/arm/v6"), &idx), Some(0));
        let idx = entries(&["linux/amd64/v2", "linux/amd64/v3", "linux/amd64"]);
        assert_eq!(select(&p("linux/amd64/v3"), &idx), Some(1));
        assert_eq!(select(&p("linux/amd64"), &idx), Some(2));
        assert_eq!(select(&p("linux/amd64"), &entries(&["linux/amd64/v3"])), None);

        // Entries without a platform and attestation entries are never ranked.
        let idx = entries(&["", "unknown/unknown", "linux/amd64"]);
        assert_eq!(select(&p("linux/amd64"), &idx), Some(2));
        assert_eq!(select(&p("linux/amd64"), &entries(&[""])), None);
    }

    #[test]
    fn config_platforms() {
        assert!(config_matches(&p("linux/amd64"), "linux", "amd64"));
        assert!(config_matches(&p("linux/arm64/v8"), "linux", "arm64"));
        assert!(config_matches(&p("linux/arm64"), "", "arm64"));
        assert!(config_matches(&p("linux/arm/v7"), "linux", "arm"));
        assert!(!config_matches(&p("linux/arm/v6"), "linux", "arm"));
        assert!(!config_matches(&p("linux/amd64"), "linux", "arm64"));
        assert!(!config_matches(&p("linux/amd64"), "linux", ""));
    }

    #[test]
    fn platform_patterns() {
        let cases: &[(&str, &str, bool)] = &[
            ("linux/amd64", "linux/amd64", true),
            ("linux/amd64", "linux/x86_64", true),
            ("linux/amd64", "linux/amd64/v3", true),
            ("linux/amd64/v3", "linux/amd64/v3", true),
            ("linux/amd64/v3", "linux/amd64", false),
            ("linux/amd64", "linux/arm64", false),
            ("linux/amd64", "windows/amd64", false),
            ("linux/arm64", "linux/arm64/v8", true),
            ("linux/arm64", "linux/aarch64", true),
            ("linux/arm64/v8", "linux/arm64", true),
            ("linux/arm64/v8", "linux/arm64/v9", false),
            ("linux/arm", "linux/arm/v6", true),
            ("linux/arm/v7", "linux/arm", true),
            ("linux/arm/v7", "linux/arm/v6", false),
            ("Linux/AMD64", "linux/amd64", true),
        ];
        for (pattern, platform, want) in cases {
            let pat = PlatformPattern::parse(pattern).unwrap();
            assert_eq!(pat.matches(&p(platform)), *want, "{pattern} vs {platform}");
        }
        for bad in ["", "linux", "linux/", "/amd64", "linux/amd64/v8/x", "linux/amd 64", "*/amd64"] {
            assert!(PlatformPattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}

//! Policy settings of the default puller, taken by `configure` as a JSON object.
//!
//! An empty document (or only whitespace) and `{}` mean the defaults. Known keys:
//!
//! - `discard_unpacked_layers` (bool, default `false`): do not keep layer blobs once they are
//!   unpacked, as containerd's CRI option of that name: the manifest gets no
//!   `containerd.io/gc.ref.content.l.<i>` labels, so the garbage collector removes the
//!   compressed layers when the pull's lease ends.
//!
//! Any other key is refused with `invalid-argument` naming it, and a refused document leaves
//! the previous settings in force. The host creates a fresh instance for every call and
//! calls `configure` right before it, so the settings live in a global of the instance
//! ([`set`], [`current`]).

use std::sync::Mutex;

use crate::error::{Error, Result};

/// The keys [`parse`] accepts.
pub const KNOWN_KEYS: &[&str] = &["discard_unpacked_layers"];

/// The default puller's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Drop the GC references from manifests to layer blobs, so they are collected once
    /// unpacked.
    pub discard_unpacked_layers: bool,
}

impl Settings {
    /// The defaults, usable in a `const`.
    pub const DEFAULT: Settings = Settings {
        discard_unpacked_layers: false,
    };
}

static CURRENT: Mutex<Settings> = Mutex::new(Settings::DEFAULT);

/// Parses a settings document.
///
/// Errors: `invalid-argument` for a document that is not a JSON object, an unknown key
/// (named), or a value of the wrong type (named).
pub fn parse(doc: &str) -> Result<Settings> {
    if doc.trim().is_empty() {
        return Ok(Settings::DEFAULT);
    }
    let value: serde_json::Value = serde_json::from_str(doc)
        .map_err(|e| Error::InvalidArgument(format!("settings are not valid JSON: {e}")))?;
    let serde_json::Value::Object(map) = &value else {
        return Err(Error::InvalidArgument(
            "settings must be a JSON object (for example {})".into(),
        ));
    };
    let mut settings = Settings::DEFAULT;
    for (key, value) in map {
        match key.as_str() {
            "discard_unpacked_layers" => {
                settings.discard_unpacked_layers = value.as_bool().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "setting {key:?} must be true or false, not {value}"
                    ))
                })?;
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown setting {key:?} (known: {})",
                    KNOWN_KEYS.join(", ")
                )))
            }
        }
    }
    Ok(settings)
}

/// Parses `doc` and, when valid, makes it the instance's settings.
pub fn configure(doc: &str) -> Result<()> {
    let settings = parse(doc)?;
    set(settings);
    Ok(())
}

/// Replaces the instance's settings.
pub fn set(settings: Settings) {
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = settings;
}

/// The instance's settings.
pub fn current() -> Settings {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        for doc in ["", "  \n", "{}", r#"{"discard_unpacked_layers": false}"#] {
            assert_eq!(parse(doc).unwrap(), Settings::DEFAULT, "{doc:?}");
        }
        assert!(
            parse(r#"{"discard_unpacked_layers": true}"#)
                .unwrap()
                .discard_unpacked_layers
        );

        let bad: &[(&str, &str)] = &[
            (r#"{"pinned": ["busybox"]}"#, "unknown setting \"pinned\""),
            ("[]", "must be a JSON object"),
            ("true", "must be a JSON object"),
            ("{", "not valid JSON"),
            (
                r#"{"discard_unpacked_layers": "yes"}"#,
                "setting \"discard_unpacked_layers\" must be true or false",
            ),
        ];
        for (doc, want) in bad {
            match parse(doc) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(want), "{doc}: {m}"),
                other => panic!("{doc}: {other:?}"),
            }
        }
    }

    #[test]
    fn refused_document_keeps_previous() {
        configure(r#"{"discard_unpacked_layers": true}"#).unwrap();
        assert!(configure(r#"{"nope": 1}"#).is_err());
        assert!(current().discard_unpacked_layers);
        configure("").unwrap();
        assert_eq!(current(), Settings::DEFAULT);
    }
}

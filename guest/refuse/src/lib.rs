//! `pullbox-refuse`: a puller that refuses every pull.
//!
//! It is the proof that pullers are swappable: the same host binary, loading this component
//! instead of the default puller, refuses every `pull-image` with `permission-denied` and a
//! reason, answers `image-status` with none and `list-images` with nothing, and accepts
//! every `remove-image`. `configure` takes `{"reason": "..."}` to change the reason (an
//! empty document or `{}` restores the default, [`DEFAULT_REASON`]); other keys are refused.
//! It uses no import but `log`, and no JSON library: the settings grammar is one optional
//! string, parsed by hand to keep the component tiny.

use std::sync::Mutex;

wit_bindgen::generate!({
    path: "../../wit",
    world: "puller-world",
});

use exports::pullbox::image::puller::{Guest, ImageInfo, PullRequest};
use pullbox::image::log;
use pullbox::image::types::Error;

/// The reason given when no `reason` is configured.
pub const DEFAULT_REASON: &str = "pullbox-refuse: pulls are disabled on this node";

static REASON: Mutex<Option<String>> = Mutex::new(None);

struct Refuse;

impl Guest for Refuse {
    fn configure(settings: String) -> Result<(), Error> {
        let reason = parse_settings(&settings).map_err(Error::InvalidArgument)?;
        *REASON.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        Ok(())
    }

    fn pull_image(request: PullRequest) -> Result<ImageInfo, Error> {
        let reason =
            REASON.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| DEFAULT_REASON.to_string());
        log::log(log::Level::Info, &format!("refusing to pull {:?}: {reason}", request.reference));
        Err(Error::PermissionDenied(reason))
    }

    fn image_status(_reference: String) -> Result<Option<ImageInfo>, Error> {
        Ok(None)
    }

    fn list_images() -> Result<Vec<ImageInfo>, Error> {
        Ok(Vec::new())
    }

    fn remove_image(_reference: String) -> Result<(), Error> {
        Ok(())
    }
}

export!(Refuse);

/// Parses `""`, `{}` or `{"reason": "<string>"}` (whitespace allowed; the string may use
/// JSON escapes). Returns the reason, `None` for the default.
fn parse_settings(doc: &str) -> Result<Option<String>, String> {
    let mut p = Parser { s: doc.as_bytes(), i: 0 };
    p.ws();
    if p.done() {
        return Ok(None);
    }
    p.expect(b'{')?;
    p.ws();
    if p.eat(b'}') {
        p.ws();
        return if p.done() { Ok(None) } else { Err("trailing characters after settings".into()) };
    }
    let key = p.string()?;
    if key != "reason" {
        return Err(format!("unknown setting {key:?} (known: reason)"));
    }
    p.ws();
    p.expect(b':')?;
    p.ws();
    let reason = p.string().map_err(|e| format!("setting \"reason\" must be a string: {e}"))?;
    p.ws();
    if p.eat(b',') {
        p.ws();
        let key = p.string()?;
        return Err(if key == "reason" {
            "setting \"reason\" given twice".into()
        } else {
            format!("unknown setting {key:?} (known: reason)")
        });
    }
    p.expect(b'}')?;
    p.ws();
    if !p.done() {
        return Err("trailing characters after settings".into());
    }
    Ok(if reason.is_empty() { None } else { Some(reason) })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "settings must be a JSON object like {{\"reason\": \"...\"}}: expected '{}' at byte {}",
                c as char, self.i
            ))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = String::new();
        loop {
            let rest = std::str::from_utf8(&self.s[self.i..]).map_err(|_| "invalid UTF-8".to_string())?;
            let mut chars = rest.chars();
            let c = chars.next().ok_or("unterminated string")?;
            self.i += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                    self.i += 1;
                    out.push(match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
                            self.i += 4;
                            let code = u32::from_str_radix(std::str::from_utf8(hex).unwrap_or("x"), 16)
                                .map_err(|_| "bad \\u escape")?;
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        _ => return Err(format!("bad escape \\{}", e as char)),
                    });
                }
                c if (c as u32) < 0x20 => return Err("control character in string".into()),
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_settings;

    #[test]
    fn settings_table() {
        let ok: &[(&str, Option<&str>)] = &[
            ("", None),
            ("  ", None),
            ("{}", None),
            (" { } ", None),
            (r#"{"reason": ""}"#, None),
            (r#"{"reason": "maintenance until 18:00"}"#, Some("maintenance until 18:00")),
            (r#"{ "reason" : "say \"no\"\n\u00e9" }"#, Some("say \"no\"\né")),
        ];
        for (doc, want) in ok {
            assert_eq!(parse_settings(doc).unwrap().as_deref(), *want, "{doc}");
        }
        let bad: &[(&str, &str)] = &[
            (r#"{"pinned": []}"#, "unknown setting \"pinned\""),
            (r#"{"reason": 1}"#, "\"reason\" must be a string"),
            (r#"{"reason": "a", "other": 1}"#, "unknown setting \"other\""),
            (r#"{"reason": "a", "reason": "b"}"#, "given twice"),
            ("[]", "must be a JSON object"),
            (r#"{"reason": "a"} x"#, "trailing"),
            (r#"{"reason": "a"#, "unterminated"),
        ];
        for (doc, want) in bad {
            let e = parse_settings(doc).unwrap_err();
            assert!(e.contains(want), "{doc}: {e}");
        }
    }
}

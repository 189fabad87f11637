//! Host side of `pullbox:image/log`: guest messages go to `tracing` under the target
//! `puller`, cut to [`MAX_MESSAGE`] bytes; progress stages go to the request's progress sink.

use crate::engine::{
    bindings::pullbox::image::log::{Host, Level},
    CallState,
};

/// The longest message kept; the rest is cut.
pub const MAX_MESSAGE: usize = 4096;

fn cut(s: &str) -> &str {
    if s.len() <= MAX_MESSAGE {
        return s;
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Host for CallState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let m = cut(&message);
        match level {
            Level::Trace => tracing::trace!(target: "puller", "{m}"),
            Level::Debug => tracing::debug!(target: "puller", "{m}"),
            Level::Info => tracing::info!(target: "puller", "{m}"),
            Level::Warn => tracing::warn!(target: "puller", "{m}"),
            Level::Error => tracing::error!(target: "puller", "{m}"),
        }
        Ok(())
    }

    async fn progress(&mut self, stage: String, detail: String) -> wasmtime::Result<()> {
        tracing::debug!(target: "puller", stage = cut(&stage), detail = cut(&detail), "progress");
        Ok(())
    }
}

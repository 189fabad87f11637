//! Host side of `pullbox:image/log`: guest messages go to `tracing` under the target
//! `puller`, cut to [`MAX_MESSAGE`] bytes; progress stages go to the debug log. One call may
//! send at most [`MAX_EVENTS`] messages and events (a pull of a 127-layer image sends a few
//! hundred); the rest are dropped, with one warning, so a guest cannot flood the log.

use crate::{
    bindings::pullbox::image::log::{Host, Level},
    call::CallState,
};

/// The longest message kept; the rest is cut.
pub const MAX_MESSAGE: usize = 4096;

/// The most messages and progress events one call may send.
pub const MAX_EVENTS: u32 = 10_000;

impl CallState {
    /// Counts one event; false when over the budget (warns once).
    fn admit(&mut self) -> bool {
        self.log_events = self.log_events.saturating_add(1);
        if self.log_events == MAX_EVENTS + 1 {
            tracing::warn!(target: "puller", "more than {MAX_EVENTS} log events in one call; dropping the rest");
        }
        self.log_events <= MAX_EVENTS
    }
}

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
        self.charge(1)?;
        if !self.admit() {
            return Ok(());
        }
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
        self.charge(1)?;
        if !self.admit() {
            return Ok(());
        }
        tracing::debug!(target: "puller", stage = cut(&stage), detail = cut(&detail), "progress");
        Ok(())
    }
}

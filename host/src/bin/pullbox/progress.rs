//! Progress bars on stderr for `pullbox pull`, one per blob, drawn only when stderr is a
//! terminal (indicatif hides them otherwise).

use std::{collections::HashMap, sync::Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pullbox::{oci::Digest, registry::Progress};

/// One bar per blob.
pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl Bars {
    /// Bars drawn on stderr when `visible`.
    pub fn new(visible: bool) -> Bars {
        let target = if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        Bars { multi: MultiProgress::with_draw_target(target), bars: Mutex::new(HashMap::new()) }
    }

    fn bar(&self, digest: &Digest, total: u64) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        bars.entry(digest.clone())
            .or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(total));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(digest.hex()[..12].to_owned());
                bar
            })
            .clone()
    }

    /// Leaves the final state on screen.
    pub fn finish(&self) {
        for bar in self.bars.lock().unwrap_or_else(|e| e.into_inner()).values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

impl Progress for Bars {
    fn start(&self, digest: &Digest, offset: u64, total: u64) {
        let bar = self.bar(digest, total);
        bar.set_length(total);
        bar.set_position(offset);
        bar.set_message("downloading");
    }

    fn advance(&self, digest: &Digest, n: u64) {
        self.bar(digest, 0).inc(n);
    }

    fn done(&self, digest: &Digest) {
        let bar = self.bar(digest, 0);
        bar.set_position(bar.length().unwrap_or(0));
        bar.set_message("done");
    }
}

//! Host side of `pullbox:image/clock`: the system's real-time clock, as seconds and
//! nanoseconds since the Unix epoch. One unit of the import budget a call, so a guest that
//! spins on the clock ends like one that spins on any other import.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::{
    bindings::pullbox::image::clock::{Host, Instant},
    call::CallState,
};

/// `now` as the WIT answers it: a clock before the epoch reads as the epoch.
pub(crate) fn instant(now: SystemTime) -> Instant {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    Instant { seconds: since.as_secs(), nanoseconds: since.subsec_nanos() }
}

impl Host for CallState {
    async fn now(&mut self) -> wasmtime::Result<Instant> {
        self.charge(1)?;
        Ok(instant(SystemTime::now()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn seconds_and_nanoseconds_since_the_epoch() {
        let i = instant(UNIX_EPOCH + Duration::new(1_700_000_000, 123));
        assert_eq!((i.seconds, i.nanoseconds), (1_700_000_000, 123));
        let i = instant(UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!((i.seconds, i.nanoseconds), (0, 0));
    }
}

//! The store data of one call into a puller ([`CallState`]): the request's [`Session`], what
//! the call may still do ([`Grants`]), the snapshotter it works in, and the sandbox's
//! accounting — the guest CPU clock ([`CpuClock`]) and the memory and table limiter
//! ([`Limiter`]). The engine (`crate::engine`) makes one per call; the host side of each WIT
//! interface (`crate::interfaces`) implements its `Host` trait on it.
//!
//! A limit hit raises a typed error ([`CpuLimit`], [`GrowLimit`], and the import budget's
//! [`crate::interfaces::grants::BudgetSpent`]) that the engine recognises by its type.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use wasmtime::{CallHook, ResourceLimiter, StoreLimits};

use crate::{interfaces::grants::Grants, session::Session};

/// The store data of one call.
pub struct CallState {
    pub(crate) session: Arc<Session>,
    pub(crate) limits: Limiter,
    pub(crate) clock: CpuClock,
    /// Log messages and progress events this call has sent (see `interfaces::log`).
    pub(crate) log_events: u32,
    /// What the call may still do (access, snapshot keys, budget, caps).
    pub(crate) grants: Grants,
    /// The snapshotter this call's `snapshots` and `diff` imports use: the backend's default
    /// until `snapshots.select` picks another it offers.
    pub(crate) snapshots: Arc<dyn crate::backend::Snapshotter>,
}

impl CallState {
    /// Spends `units` of the call's import budget; the error traps the call.
    pub(crate) fn charge(&mut self, units: u64) -> wasmtime::Result<()> {
        self.grants.charge(units).map_err(wasmtime::Error::new)
    }
}

/// The trap raised when a call uses more guest CPU time than allowed.
#[derive(Debug, thiserror::Error)]
#[error("the puller exceeded its CPU time limit of {} ms", .0.as_millis())]
pub struct CpuLimit(pub Duration);

/// The trap raised when a guest's memory or a table would grow past the sandbox's limit (or
/// an instance needs more than that to start).
#[derive(Debug, thiserror::Error)]
pub enum GrowLimit {
    #[error("the puller exceeded its memory limit (sandbox.memory_limit)")]
    Memory,
    #[error("the puller exceeded its table limit ({0} elements)")]
    Table(usize),
}

/// The store's resource limiter: [`StoreLimits`], with a refused growth turned into a
/// [`GrowLimit`] trap (wasmtime's own trap on a refused growth is an untyped message).
pub struct Limiter {
    limits: StoreLimits,
    table_elements: usize,
}

impl Limiter {
    /// A limiter enforcing `limits`, whose tables may hold `table_elements` elements
    /// (`limits` must not trap on grow failure itself).
    pub fn new(limits: StoreLimits, table_elements: usize) -> Limiter {
        Limiter { limits, table_elements }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        match self.limits.memory_growing(current, desired, maximum)? {
            true => Ok(true),
            false => Err(wasmtime::Error::new(GrowLimit::Memory)),
        }
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("growing the puller's memory failed"))
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        match self.limits.table_growing(current, desired, maximum)? {
            true => Ok(true),
            false => Err(wasmtime::Error::new(GrowLimit::Table(self.table_elements))),
        }
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("growing a puller's table failed"))
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// Guest execution time of every call of this process, in nanoseconds.
static GUEST_NANOS: AtomicU64 = AtomicU64::new(0);

/// Total time this process spent executing guest code (the `pullbox_guest_seconds` metric;
/// benchmarks compare it with a pull's wall time).
pub fn guest_time() -> Duration {
    Duration::from_nanos(GUEST_NANOS.load(Ordering::Relaxed))
}

/// Time accounting of one call: guest execution only, read from the clock at the call hook's
/// transitions ([`CpuClock::hook`]).
///
/// Inside a host import the host calls back into the guest to allocate room for the import's
/// answer, once per string and list of it. The clock starts at the first of those calls and
/// runs on until the import returns: copying the answer into the guest counts as guest time
/// (it is work the guest asked for), and the guest's allocator is charged as before, without
/// two clock reads around each allocation.
pub struct CpuClock {
    pub(crate) limit: Duration,
    used: Duration,
    /// When guest code last started running; `None` while the host runs.
    running_since: Option<Instant>,
    /// Host imports under way: 0 while the guest runs on its own, 1 inside an import (a
    /// count, not a flag, though the component model forbids an allocation the host calls
    /// from inside an import to call an import again).
    in_host: u32,
}

impl CpuClock {
    pub fn new(limit: Duration) -> CpuClock {
        CpuClock { limit, used: Duration::ZERO, running_since: None, in_host: 0 }
    }

    pub fn used_now(&self) -> Duration {
        self.used + self.running_since.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Guest code starts (or goes on) running.
    fn start(&mut self) {
        self.running_since.get_or_insert_with(Instant::now);
    }

    /// The host takes over: adds the slice that ends now to this call's and the process's
    /// guest time.
    fn stop(&mut self) {
        if let Some(t) = self.running_since.take() {
            let slice = t.elapsed();
            self.used += slice;
            GUEST_NANOS.fetch_add(slice.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// The call hook: see the type's docs for what counts.
    pub fn hook(&mut self, hook: CallHook) {
        match hook {
            CallHook::CallingWasm => self.start(),
            // A return from an allocation inside an import leaves the clock running.
            CallHook::ReturningFromWasm if self.in_host == 0 => self.stop(),
            CallHook::ReturningFromWasm => {}
            CallHook::CallingHost => {
                self.stop();
                self.in_host += 1;
            }
            CallHook::ReturningFromHost => {
                self.in_host = self.in_host.saturating_sub(1);
                self.start();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a clock through `steps`: a hook, or a pause of some milliseconds.
    fn run(steps: &[Result<CallHook, u64>]) -> Duration {
        let mut clock = CpuClock::new(Duration::from_secs(60));
        for step in steps {
            match step {
                Ok(hook) => clock.hook(*hook),
                Err(ms) => std::thread::sleep(Duration::from_millis(*ms)),
            }
        }
        assert!(clock.running_since.is_none() && clock.in_host == 0, "the call ended with the clock stopped");
        clock.used
    }

    #[test]
    fn the_clock_counts_guest_code_and_copying_answers_into_it_not_host_imports() {
        use CallHook::*;
        // An export that calls an import whose host side takes 200 ms and whose answer is
        // copied in with three allocations; guest code runs 20 ms before and after.
        let used = run(&[
            Ok(CallingWasm),
            Err(20),
            Ok(CallingHost),
            Err(200),
            Ok(CallingWasm),
            Ok(ReturningFromWasm),
            Err(10),
            Ok(CallingWasm),
            Ok(ReturningFromWasm),
            Ok(CallingWasm),
            Ok(ReturningFromWasm),
            Ok(ReturningFromHost),
            Err(20),
            Ok(ReturningFromWasm),
        ]);
        assert!(used >= Duration::from_millis(50), "guest code and the copying count: {used:?}");
        assert!(used < Duration::from_millis(200), "the import's own work does not: {used:?}");

        // An argument allocated in the guest before an export call: each counts on its own,
        // and the time between them is the host's.
        let used = run(&[
            Ok(CallingWasm),
            Err(10),
            Ok(ReturningFromWasm),
            Err(200),
            Ok(CallingWasm),
            Err(10),
            Ok(ReturningFromWasm),
        ]);
        assert!(used >= Duration::from_millis(20) && used < Duration::from_millis(200), "{used:?}");
    }
}

//! What one export call may do: the request-scoped capabilities and budgets that every host
//! import checks before it does any work. The guest is hostile until proven otherwise, so the
//! host — never the guest — decides what a call may touch.
//!
//! - [`Access`]: which stores a call may change. `pull-image` writes under its lease;
//!   `remove-image` may only delete; `image-status`, `list-images` and `configure` only read.
//! - Snapshot capabilities: a key that `snapshots.prepare` created in this call is the only
//!   thing `diff.apply` and `snapshots.commit` accept; the host looks the mounts up itself, so
//!   a guest never names a mount or a host path ([`Grants::begin_apply`]). A key is applied
//!   onto by one apply at a time, and forgotten once committed or removed.
//! - The import budget ([`Grants::charge`]): every import costs one unit plus one per item it
//!   carries or answers (and one per KiB it reads); a call that spends its budget traps with
//!   [`BudgetSpent`], which the engine reports as a limit hit. This bounds loops inside host
//!   imports, which the guest CPU clock does not count.
//! - Creation caps: snapshots and image records one call may create, and blobs and snapshots
//!   it may hold under its lease ([`Caps`]); over a cap the import answers
//!   `resource-exhausted`, and the budget ends a guest that keeps asking.

use std::collections::{HashMap, HashSet};

use crate::error::Error;

/// Which stores a call may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only: `image-status`, `list-images`, `configure`.
    Read,
    /// Read and delete: `remove-image`.
    Remove,
    /// Read and write under the pull's lease: `pull-image`.
    Pull,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::Read => "a read-only call (image-status, list-images, configure)",
            Access::Remove => "remove-image",
            Access::Pull => "pull-image",
        }
    }
}

/// The creation caps of one call (from the daemon's `[sandbox]` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Import budget units.
    pub budget: u64,
    /// Snapshots `snapshots.prepare` may create.
    pub snapshots: u32,
    /// Records `images.create` may create.
    pub records: u32,
    /// Distinct blobs and snapshots `content.info` / `snapshots.stat` may hold under the lease.
    pub holds: u32,
}

/// The trap of a call that spent its import budget.
#[derive(Debug, thiserror::Error)]
#[error(
    "the puller exceeded its import budget of {0} units (sandbox.import_budget): too many or too costly host calls"
)]
pub struct BudgetSpent(pub u64);

/// The state of a snapshot key this call prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    Idle,
    Applying,
}

/// What one export call may still do; see the module docs.
#[derive(Debug)]
pub struct Grants {
    access: Access,
    caps: Caps,
    spent: u64,
    snapshots: u32,
    records: u32,
    held: HashSet<String>,
    /// Active snapshots this call prepared and has neither committed nor removed.
    keys: HashMap<String, KeyState>,
    /// Keys whose `prepare` answered `already-exists` in this call: stale active snapshots it
    /// may remove.
    stale: HashSet<String>,
}

impl Grants {
    /// The grants of a call with `access` under `caps`.
    pub fn new(access: Access, caps: Caps) -> Grants {
        Grants {
            access,
            caps,
            spent: 0,
            snapshots: 0,
            records: 0,
            held: HashSet::new(),
            keys: HashMap::new(),
            stale: HashSet::new(),
        }
    }

    /// Switches to the export call proper after `configure` (which ran read-only).
    pub fn set_access(&mut self, access: Access) {
        self.access = access;
    }

    /// Spends `units` of the import budget; traps once it is spent.
    pub fn charge(&mut self, units: u64) -> Result<(), BudgetSpent> {
        self.spent = self.spent.saturating_add(units);
        if self.spent > self.caps.budget {
            return Err(BudgetSpent(self.caps.budget));
        }
        Ok(())
    }

    /// Units spent so far.
    pub fn spent(&self) -> u64 {
        self.spent
    }

    /// `FailedPrecondition` unless the call may write (`what` names the import).
    pub fn write(&self, what: &str) -> Result<(), Error> {
        match self.access {
            Access::Pull => Ok(()),
            other => Err(Error::FailedPrecondition(format!("{what}: {} may not write to the stores", other.name()))),
        }
    }

    /// `FailedPrecondition` unless the call may delete.
    pub fn delete(&self, what: &str) -> Result<(), Error> {
        match self.access {
            Access::Pull | Access::Remove => Ok(()),
            Access::Read => Err(Error::FailedPrecondition(format!("{what}: {} may not delete", Access::Read.name()))),
        }
    }

    /// Counts a snapshot about to be prepared: the call must be a pull under its cap.
    pub fn create_snapshot(&mut self) -> Result<(), Error> {
        self.write("snapshots.prepare")?;
        count(&mut self.snapshots, self.caps.snapshots, "snapshots", "sandbox.max_snapshots")
    }

    /// `FailedPrecondition` once this call has prepared a snapshot (or met a stale one): its
    /// keys belong to the snapshotter they were prepared in, so `snapshots.select` may only
    /// come before.
    pub fn may_select(&self) -> Result<(), Error> {
        if self.snapshots > 0 || !self.stale.is_empty() {
            return Err(Error::FailedPrecondition(
                "snapshots.select must come before this call's first snapshots.prepare".into(),
            ));
        }
        Ok(())
    }

    /// Records the outcome of `snapshots.prepare(key)`: a created key becomes this call's;
    /// an existing active one (the caller checks it is active) may be removed as stale.
    pub fn prepared(&mut self, key: &str, created: bool) {
        if created {
            self.stale.remove(key);
            self.keys.insert(key.to_owned(), KeyState::Idle);
        } else {
            self.stale.insert(key.to_owned());
        }
    }

    /// Checks that `key` is an active snapshot this call prepared and that no layer is being
    /// applied onto it, and marks it as being applied onto until [`Grants::end_apply`].
    pub fn begin_apply(&mut self, key: &str) -> Result<(), Error> {
        self.write("diff.apply")?;
        match self.keys.get_mut(key) {
            Some(state @ KeyState::Idle) => {
                *state = KeyState::Applying;
                Ok(())
            }
            Some(KeyState::Applying) => {
                Err(Error::FailedPrecondition(format!("a layer is being applied onto snapshot {key} already")))
            }
            None => Err(not_ours("diff.apply", key)),
        }
    }

    /// The apply onto `key` has ended.
    pub fn end_apply(&mut self, key: &str) {
        if let Some(state) = self.keys.get_mut(key) {
            *state = KeyState::Idle;
        }
    }

    /// Checks that `key` may be committed: an active snapshot of this call, not being applied
    /// onto.
    pub fn may_commit(&self, key: &str) -> Result<(), Error> {
        self.write("snapshots.commit")?;
        match self.keys.get(key) {
            Some(KeyState::Idle) => Ok(()),
            Some(KeyState::Applying) => {
                Err(Error::FailedPrecondition(format!("a layer is being applied onto snapshot {key}")))
            }
            None => Err(not_ours("snapshots.commit", key)),
        }
    }

    /// Checks that `key` may be removed: any snapshot in `remove-image`; in a pull, one it
    /// prepared or found stale.
    pub fn may_remove_snapshot(&self, key: &str) -> Result<(), Error> {
        self.delete("snapshots.remove")?;
        match self.access {
            Access::Remove => Ok(()),
            _ if self.keys.get(key) == Some(&KeyState::Idle) || self.stale.contains(key) => Ok(()),
            _ if self.keys.contains_key(key) => {
                Err(Error::FailedPrecondition(format!("a layer is being applied onto snapshot {key}")))
            }
            _ => Err(not_ours("snapshots.remove", key)),
        }
    }

    /// `key` was committed or removed: it is no longer this call's.
    pub fn forget(&mut self, key: &str) {
        self.keys.remove(key);
        self.stale.remove(key);
    }

    /// Counts a record about to be created: the call must be a pull under its cap.
    pub fn create_record(&mut self) -> Result<(), Error> {
        self.write("images.create")?;
        count(&mut self.records, self.caps.records, "image records", "sandbox.max_records")
    }

    /// Whether a look-up of `resource` (a blob or snapshot, by a string unique per kind) should
    /// first hold it under the pull's lease: `false` outside a pull and for what this call
    /// holds already; `ResourceExhausted` over the cap.
    pub fn hold(&mut self, resource: String) -> Result<bool, Error> {
        if self.access != Access::Pull || self.held.contains(&resource) {
            return Ok(false);
        }
        if self.held.len() >= self.caps.holds as usize {
            return Err(Error::ResourceExhausted(format!(
                "one request may hold at most {} blobs and snapshots under its lease (sandbox.max_holds)",
                self.caps.holds
            )));
        }
        self.held.insert(resource);
        Ok(true)
    }
}

/// Counts one more of what `counter` counts, or `ResourceExhausted` naming `setting` at `cap`.
fn count(counter: &mut u32, cap: u32, what: &str, setting: &str) -> Result<(), Error> {
    if *counter >= cap {
        return Err(Error::ResourceExhausted(format!("one request may create at most {cap} {what} ({setting})")));
    }
    *counter += 1;
    Ok(())
}

fn not_ours(what: &str, key: &str) -> Error {
    Error::PermissionDenied(format!(
        "{what}: snapshot {:?} is not an active snapshot this request prepared",
        key.chars().take(256).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        Caps { budget: 10, snapshots: 2, records: 1, holds: 2 }
    }

    #[test]
    fn only_keys_this_call_prepared_can_be_applied_committed_or_removed() {
        let mut g = Grants::new(Access::Pull, caps());
        assert!(matches!(g.begin_apply("other"), Err(Error::PermissionDenied(_))));
        assert!(matches!(g.may_commit("other"), Err(Error::PermissionDenied(_))));
        assert!(matches!(g.may_remove_snapshot("other"), Err(Error::PermissionDenied(_))));
        g.create_snapshot().unwrap();
        g.prepared("k", true);
        g.begin_apply("k").unwrap();
        assert!(matches!(g.begin_apply("k"), Err(Error::FailedPrecondition(_))), "one apply at a time");
        assert!(g.may_commit("k").is_err() && g.may_remove_snapshot("k").is_err());
        g.end_apply("k");
        g.may_commit("k").unwrap();
        g.forget("k");
        assert!(matches!(g.begin_apply("k"), Err(Error::PermissionDenied(_))), "a committed key is gone");
        g.prepared("stale", false);
        g.may_remove_snapshot("stale").unwrap();
        assert!(g.begin_apply("stale").is_err(), "a stale key is no capability to apply");
    }

    #[test]
    fn a_snapshotter_is_chosen_before_the_first_prepare() {
        let mut g = Grants::new(Access::Pull, caps());
        g.may_select().unwrap();
        g.create_snapshot().unwrap();
        assert!(matches!(g.may_select(), Err(Error::FailedPrecondition(_))), "keys belong to one snapshotter");
        let mut g = Grants::new(Access::Pull, caps());
        g.prepared("stale", false);
        assert!(g.may_select().is_err(), "a stale key too");
        Grants::new(Access::Read, caps()).may_select().unwrap();
    }

    #[test]
    fn read_only_and_remove_calls_cannot_write() {
        let mut g = Grants::new(Access::Read, caps());
        assert!(g.create_snapshot().is_err() && g.create_record().is_err());
        assert!(g.write("x").is_err() && g.delete("x").is_err() && g.may_remove_snapshot("k").is_err());
        assert!(!g.hold("blob".into()).unwrap(), "nothing to hold without a lease");
        let mut g = Grants::new(Access::Remove, caps());
        assert!(g.write("x").is_err() && g.create_record().is_err());
        g.delete("x").unwrap();
        g.may_remove_snapshot("any").unwrap();
    }

    #[test]
    fn caps_and_budget_end() {
        let mut g = Grants::new(Access::Pull, caps());
        g.create_snapshot().unwrap();
        g.create_snapshot().unwrap();
        assert!(matches!(g.create_snapshot(), Err(Error::ResourceExhausted(_))));
        g.create_record().unwrap();
        assert!(matches!(g.create_record(), Err(Error::ResourceExhausted(_))));
        assert!(g.hold("a".into()).unwrap());
        assert!(!g.hold("a".into()).unwrap(), "held once");
        assert!(g.hold("b".into()).unwrap());
        assert!(matches!(g.hold("c".into()), Err(Error::ResourceExhausted(_))));
        g.charge(10).unwrap();
        assert!(g.charge(1).is_err());
    }
}

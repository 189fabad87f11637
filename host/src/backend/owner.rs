//! Process identity: the process that owns a lease, and whether it still runs.
//!
//! Both backends record a pull's lease with its [`Owner`]: the pid, the process's start time
//! (field 22 of `/proc/<pid>/stat`, in clock ticks since boot), its PID namespace (the inode
//! of `/proc/<pid>/ns/pid`) and the kernel's boot id. The embedded store keeps the four in
//! its `leases` table; the containerd backend writes them into a lease label in their text
//! form `<boot id>/<pid namespace>/<pid>/<start time>` ([`Owner`]'s `Display`,
//! [`Owner::parse`]). A lease whose owner is gone belongs to a killed pull, and the next
//! collection deletes it. The owner is gone when:
//!
//! - the boot id differs (a reboot);
//! - the process at the pid has another start time (the pid was reused), or is a zombie
//!   (state `Z` or `X`: killed, not yet reaped by its parent; it holds nothing any more);
//! - the process at the pid runs in another PID namespace: a pid is a number within one
//!   namespace, so the same number elsewhere is never the owner.
//!
//! Two judges read these rules:
//!
//! - [`Owner::is_alive`] (the embedded store, whose root only processes of one namespace tree
//!   share). A checker in the owner's namespace looks at `/proc/<pid>`. A checker in an
//!   ancestor namespace (the host, for a pull inside a container) sees the owner's namespace
//!   too, under other pid numbers: it finds the owner by the innermost pid of `NSpid` in
//!   `/proc/*/status`. A checker whose own namespace descends from the owner's (a container
//!   looking at the host's pull) cannot see the owner at all and counts it alive: it must not
//!   delete a live pull's data; the owner's namespace or a reboot ends that lease. Any other
//!   namespace that is not visible is gone (a container that restarted), and so is its owner.
//!   Processes in sibling namespaces (two containers) must therefore not share one root.
//!   Owners recorded before namespaces were (namespace 0) are judged by pid and start time.
//! - [`Owner::is_certainly_gone`] (containerd, which processes of any namespace share: the
//!   daemon in a pod, the CLI on the host). Only an owner of another boot, or of this very PID
//!   namespace, is judged; any other is left to its lease's expiry.
//!
//! A *detached* owner ([`Owner::detached`]) is no process (pid 0): it holds what must outlive
//! the command that made it, such as the view behind `pullbox mount`. It records the boot id
//! only, and dies with the boot: no mount survives a reboot. A *permanent* owner has the boot
//! id [`PERMANENT`]: no process and no boot ends it, only deleting its lease.

use std::{fs, os::unix::fs::MetadataExt};

use crate::error::{Error, Result};

/// The process that owns a lease. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) pid: u32,
    pub(crate) start_time: u64,
    pub(crate) boot_id: String,
    /// The inode of the owner's `/proc/<pid>/ns/pid`; 0 when unknown (older leases).
    pub(crate) pid_ns: u64,
}

/// The boot id of a permanent owner (see the module docs): no kernel's boot id has this shape.
pub(crate) const PERMANENT: &str = "permanent";

impl Owner {
    /// This process.
    pub(crate) fn current() -> Result<Owner> {
        let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
        let unreadable = |what: &str| Error::Io {
            context: format!("reading this process's {what}"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("/proc/{pid} unreadable or malformed")),
        };
        let start_time = process(pid).ok_or_else(|| unreadable("start time"))?.start_time;
        let pid_ns = pid_namespace("self").ok_or_else(|| unreadable("PID namespace"))?;
        Ok(Owner { pid, start_time, boot_id: boot_id(), pid_ns })
    }

    /// No process: alive until its lease is deleted or until the next boot.
    pub(crate) fn detached() -> Owner {
        Owner { pid: 0, start_time: 0, boot_id: boot_id(), pid_ns: 0 }
    }

    /// The owner in its text form `<boot id>/<pid namespace>/<pid>/<start time>`.
    pub(crate) fn parse(s: &str) -> Option<Owner> {
        let mut parts = s.split('/');
        let owner = Owner {
            boot_id: parts.next()?.to_owned(),
            pid_ns: parts.next()?.parse().ok()?,
            pid: parts.next()?.parse().ok()?,
            start_time: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(owner)
    }

    /// Whether the owning process still runs (for a detached owner: whether the machine has not
    /// rebooted since). See the module docs for how namespaces are judged.
    pub(crate) fn is_alive(&self) -> bool {
        if self.boot_id == PERMANENT {
            return true;
        }
        if self.boot_id != boot_id() {
            return false;
        }
        if self.pid == 0 {
            return true;
        }
        let own = pid_namespace("self");
        if self.pid_ns == 0 || Some(self.pid_ns) == own {
            // An unreadable link (another user's process) leaves pid and start time to decide.
            let same_namespace =
                self.pid_ns == 0 || pid_namespace(&self.pid.to_string()).is_none_or(|ns| ns == self.pid_ns);
            return same_namespace && self.runs_at_own_pid();
        }
        match find_in_namespace(self.pid_ns, self.pid) {
            Some(found) => found.is_some_and(|p| self.is(&p)),
            None => is_ancestor_namespace(self.pid_ns),
        }
    }

    /// Whether the owner is certainly gone as seen from any namespace: it ran in another boot,
    /// or in this PID namespace as a process that no longer runs. An owner this process cannot
    /// judge (another namespace, an unknown boot) is not gone.
    pub(crate) fn is_certainly_gone(&self) -> bool {
        let here = boot_id();
        if here.is_empty() || self.boot_id.is_empty() || self.boot_id == PERMANENT {
            return false;
        }
        if self.boot_id != here {
            return true;
        }
        self.pid_ns != 0 && Some(self.pid_ns) == pid_namespace("self") && !self.runs_at_own_pid()
    }

    /// Whether the process at the owner's pid in this `/proc` is the owner, running.
    fn runs_at_own_pid(&self) -> bool {
        process(self.pid).is_some_and(|p| self.is(&p))
    }

    /// Whether `p` (found at the owner's pid in the owner's namespace) is the owner, running.
    fn is(&self, p: &Process) -> bool {
        p.start_time == self.start_time && !p.dead
    }
}

impl std::fmt::Display for Owner {
    /// The text form [`Owner::parse`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}/{}", self.boot_id, self.pid_ns, self.pid, self.start_time)
    }
}

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, PartialEq, Eq)]
struct Process {
    /// Field 22: clock ticks since boot.
    start_time: u64,
    /// Field 3 is `Z` (zombie) or `X` (dead): the process has exited.
    dead: bool,
}

/// Process `pid` of this process's `/proc`, or `None` when there is no such process.
fn process(pid: u32) -> Option<Process> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Fields 3 and 22 of a `/proc/<pid>/stat` line. Field 2, the command name, is in parentheses
/// and may itself contain spaces and parentheses, so counting starts after the last `)`, at
/// field 3.
fn parse_stat(stat: &str) -> Option<Process> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(Process { start_time, dead: matches!(state, "Z" | "X") })
}

/// The inode of `/proc/<pid>/ns/pid` (`pid` may be `self`).
fn pid_namespace(pid: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/pid")).ok().map(|m| m.ino())
}

/// Looks for the process whose pid is `pid` inside namespace `ns`, among the processes this
/// `/proc` shows: `None` when no process of `ns` is visible, `Some(None)` when `ns` is visible
/// but has no such process.
fn find_in_namespace(ns: u64, pid: u32) -> Option<Option<Process>> {
    let mut visible = false;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(here) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        if pid_namespace(here) != Some(ns) {
            continue;
        }
        visible = true;
        let Ok(status) = fs::read_to_string(format!("/proc/{here}/status")) else { continue };
        if innermost_pid(&status) == Some(pid) {
            return Some(here.parse().ok().and_then(process));
        }
    }
    visible.then_some(None)
}

/// The last (innermost namespace's) pid of the `NSpid:` line of `/proc/<pid>/status`.
fn innermost_pid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().last()?.parse().ok()
}

/// How many parents [`is_ancestor_namespace`] follows: the kernel nests PID namespaces at most
/// 32 deep.
const MAX_PID_NAMESPACE_DEPTH: usize = 32;

/// Whether `ns` is a parent, grandparent, ... of this process's PID namespace.
fn is_ancestor_namespace(ns: u64) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd};
    let Ok(mut current) = fs::File::open("/proc/self/ns/pid") else { return false };
    for _ in 0..MAX_PID_NAMESPACE_DEPTH {
        // SAFETY: NS_GET_PARENT takes no argument; it returns a new file descriptor or -1.
        let fd = unsafe { libc::ioctl(current.as_raw_fd(), libc::NS_GET_PARENT) };
        if fd < 0 {
            return false;
        }
        // SAFETY: the kernel just returned `fd`, open and owned by nothing else.
        current = unsafe { fs::File::from_raw_fd(fd) };
        if current.metadata().is_ok_and(|m| m.ino() == ns) {
            return true;
        }
    }
    false
}

/// The kernel's boot id (empty when unavailable: then only the start time tells reuse).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some(Process { start_time: 987654, dead: false }));
        let zombie = line.replace(") S ", ") Z ");
        assert_eq!(parse_stat(&zombie), Some(Process { start_time: 987654, dead: true }));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(innermost_pid("Name:\tsleep\nNSpid:\t4321\t17\t1\nNSpgid:\t1\n"), Some(1));
        assert_eq!(innermost_pid("Name:\tsleep\n"), None);
    }

    #[test]
    fn owners_round_trip_through_their_text_form() {
        let me = Owner::current().unwrap();
        assert_eq!(Owner::parse(&me.to_string()), Some(me.clone()));
        assert_eq!(Owner::parse("a/1/2"), None);
        assert_eq!(Owner::parse("a/1/2/3/4"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = Owner::current().unwrap();
        assert_ne!(me.pid_ns, 0);
        assert!(me.is_alive());
        assert!(!me.is_certainly_gone());
        let reused = Owner { start_time: me.start_time + 1, ..me.clone() };
        assert!(!reused.is_alive() && reused.is_certainly_gone());
        let rebooted = Owner { boot_id: "another boot".into(), ..me.clone() };
        assert!(!rebooted.is_alive() && rebooted.is_certainly_gone());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let exited = Owner { pid, ..me.clone() };
        assert!(!exited.is_alive() && exited.is_certainly_gone());
        assert!(Owner::detached().is_alive());
        assert!(!Owner { boot_id: "another boot".into(), ..Owner::detached() }.is_alive());
        let permanent = Owner { boot_id: PERMANENT.into(), ..Owner::detached() };
        assert!(permanent.is_alive() && !permanent.is_certainly_gone());
        // Recorded before namespaces were: pid and start time decide.
        assert!(Owner { pid_ns: 0, ..me.clone() }.is_alive());
        // Another PID namespace: containerd's judge cannot tell, so not gone.
        assert!(!Owner { pid_ns: me.pid_ns + 1, start_time: 0, ..me }.is_certainly_gone());
    }

    /// A child process (a pull) as a lease owner.
    fn owner_of(child: &std::process::Child) -> Owner {
        let start_time = process(child.id()).unwrap().start_time;
        Owner { pid: child.id(), start_time, boot_id: boot_id(), pid_ns: pid_namespace("self").unwrap() }
    }

    /// Waits until `pid` has exited but is not yet reaped.
    fn wait_for_zombie(pid: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !process(pid).unwrap().dead {
            assert!(std::time::Instant::now() < deadline, "{pid} did not die");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_killed_owner_not_yet_reaped_is_dead() {
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let owner = owner_of(&child);
        assert!(owner.is_alive());
        child.kill().unwrap();
        wait_for_zombie(child.id());
        assert!(!owner.is_alive(), "a zombie holds nothing");
        child.wait().unwrap();
        assert!(!owner.is_alive());
    }

    #[test]
    fn a_pid_in_another_namespace_is_never_the_owner() {
        let me = Owner::current().unwrap();
        // Our own pid and start time, recorded in a namespace that does not exist (any more):
        // the process at that pid is not the owner.
        assert!(!Owner { pid_ns: me.pid_ns + 1_000_000, ..me.clone() }.is_alive());

        // A pull inside a child PID namespace (a container), seen from here, its ancestor:
        // `unshare` forks `sleep` as pid 1 of a new namespace. Needs root (CI runs as root).
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping the child-namespace case: unshare --pid needs root");
            return;
        }
        let mut unshare =
            std::process::Command::new("unshare").args(["--pid", "--fork", "sleep", "60"]).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let sleeper = loop {
            let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
            if let Some(pid) = children.split_whitespace().next() {
                break pid.parse::<u32>().unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "unshare started no child");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let ns = pid_namespace(&sleeper.to_string()).unwrap();
        assert_ne!(ns, me.pid_ns);
        let start_time = process(sleeper).unwrap().start_time;
        // The owner recorded itself as pid 1 of its namespace.
        let owner = Owner { pid: 1, start_time, boot_id: boot_id(), pid_ns: ns };
        assert!(owner.is_alive(), "found through NSpid from the parent namespace");
        // Pid 1 of *this* namespace, with the sleeper's start time, is not the owner either.
        assert!(!Owner { pid_ns: me.pid_ns, ..owner.clone() }.is_alive());
        // The sleeper is killed: its namespace is gone, and so is the owner.
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(sleeper as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        unshare.wait().unwrap();
        assert!(!owner.is_alive(), "a namespace that is gone holds no owner");
        // This process's parent namespace (if any) is an ancestor: an owner there is out of
        // sight and counts as alive; the init namespace has no parent, so nothing to check.
    }
}

//! Long-running programs the tests start and stop: the registries and containerd.
//!
//! Key type: [`Service`]. [`Service::start`] runs a program under a small `sh` supervisor,
//! with its output in a log file of the service's own directory; [`Service::ready`] waits
//! until a probe says the program answers (failing with its log when it exits first or takes
//! too long); dropping the value stops the program and deletes the directory.
//! [`Service::crash`] kills the program with SIGKILL and [`Service::restart`] has the
//! supervisor start it again on the same directory (a crash, then a restart as a node's init
//! system makes).
//!
//! The supervisor's stdin is a pipe from the test process. When that pipe closes — the
//! `Service` is dropped, or the test process exits without dropping it (a `static` fixture is
//! never dropped), or it is killed — the supervisor stops the program, runs the service's
//! cleanup lines and deletes its directory. No service outlives its tests.
//!
//! [`start_retrying`] and [`loopback_addr`] are for services that listen on a TCP port: the
//! free port found may be taken by another process before the service binds it.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::wait_until;

/// How many times [`start_retrying`] tries.
const START_ATTEMPTS: usize = 5;

/// The program's process ID, written by the supervisor into the service's directory.
const PID_FILE: &str = ".supervised-pid";

/// When this file is in the service's directory as the program exits, the supervisor starts
/// the program again instead of exiting ([`Service::crash`], [`Service::restart`]).
const RESPAWN_FILE: &str = ".supervised-respawn";

/// While this file is in the service's directory, a program to be started again waits.
const HOLD_FILE: &str = ".supervised-hold";

/// The supervisor: `$0` is the directory to delete afterwards, `"$@"` the program and its
/// arguments. It exits when the program does, unless [`RESPAWN_FILE`] exists then: it waits
/// while [`HOLD_FILE`] exists, and starts the program again if [`RESPAWN_FILE`] still does.
/// The running program's PID is in [`PID_FILE`]. Its watcher, a subshell, reads the pipe from
/// the test process (kept on fd 3, since an asynchronous list's stdin is `/dev/null`); at end
/// of file it removes both files (so the program is not started again), stops the program,
/// runs `cleanup` (which sees the directory as `$dir`) and deletes the directory.
fn supervisor(cleanup: &str) -> String {
    format!(
        r#"
exec 3<&0
dir=$0
(
    read -r _ <&3
    rm -f "$dir/{RESPAWN_FILE}" "$dir/{HOLD_FILE}"
    pid=$(cat "$dir/{PID_FILE}" 2>/dev/null)
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
{cleanup}
    rm -rf "$dir"
) &
while :; do
    "$@" </dev/null 3<&- &
    pid=$!
    echo "$pid" >"$dir/{PID_FILE}"
    wait "$pid"
    while [ -e "$dir/{HOLD_FILE}" ]; do sleep 0.05; done
    [ -e "$dir/{RESPAWN_FILE}" ] || break
    rm -f "$dir/{RESPAWN_FILE}"
done
"#
    )
}

/// What [`Service::start`] runs.
#[derive(Debug)]
pub struct Spec<'a> {
    /// The program's name in messages (`docker-registry`).
    pub name: &'a str,
    /// The program, its arguments and the environment variables set on it (also set on the
    /// supervisor, which the program inherits them from).
    pub command: Command,
    /// The service's directory, already made. It holds the log and is deleted when the
    /// service stops, or when it cannot be started.
    pub dir: PathBuf,
    /// The name of the log file in `dir`, which gets the program's stdout and stderr.
    pub log: &'a str,
    /// Shell lines the supervisor runs after the program stopped, before it deletes the
    /// directory (`$dir`); empty for none.
    pub cleanup: &'a str,
    /// How long dropping the service waits for the supervisor to finish before killing it.
    pub stop_timeout: Duration,
}

/// A running program under its supervisor. See the module docs.
#[derive(Debug)]
pub struct Service {
    name: String,
    dir: PathBuf,
    log: PathBuf,
    stop_timeout: Duration,
    supervisor: Child,
    stdin: Option<ChildStdin>,
    /// The PID of the program [`Service::crash`] killed, until [`Service::restart`].
    crashed: Option<String>,
}

impl Service {
    /// Starts `spec.command` under the supervisor. It does not wait for the program to
    /// answer: see [`Service::ready`].
    pub fn start(spec: Spec<'_>) -> Result<Service> {
        let Spec { name, command, dir, log, cleanup, stop_timeout } = spec;
        let log_path = dir.join(log);
        let log = fs::File::create(&log_path)?;
        let mut sh = Command::new("/bin/sh");
        sh.arg("-c").arg(supervisor(cleanup)).arg(&dir).arg(command.get_program()).args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => sh.env(key, value),
                None => sh.env_remove(key),
            };
        }
        let spawned = sh.stdin(Stdio::piped()).stdout(log.try_clone()?).stderr(log).spawn();
        let mut supervisor = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e).context("cannot start /bin/sh");
            }
        };
        let stdin = supervisor.stdin.take();
        // From here on, dropping the service stops everything and cleans up.
        Ok(Service { name: name.to_owned(), dir, log: log_path, stop_timeout, supervisor, stdin, crashed: None })
    }

    /// Waits until `probe` returns true, trying every 50 ms for at most `timeout`. Fails
    /// (and stops the service) with the log when the program exits first or the time runs
    /// out; `addr` says where it should answer, for those messages.
    pub fn ready(mut self, addr: &str, timeout: Duration, mut probe: impl FnMut() -> bool) -> Result<Service> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.supervisor.try_wait()? {
                bail!("{} exited ({status}) before answering on {addr}:\n{}", self.name, self.log());
            }
            if probe() {
                return Ok(self);
            }
            if Instant::now() >= deadline {
                bail!("{} did not answer on {addr} within {timeout:?}:\n{}", self.name, self.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the program with SIGKILL (a crash: nothing of its own runs, its files stay) and
    /// waits until it is gone. It stays down until [`Service::restart`].
    pub fn crash(&mut self) -> Result<()> {
        let pid = fs::read_to_string(self.dir.join(PID_FILE)).context("the supervisor wrote no PID")?;
        let pid = pid.trim().to_owned();
        fs::write(self.dir.join(HOLD_FILE), b"")?;
        fs::write(self.dir.join(RESPAWN_FILE), b"")?;
        let killed = Command::new("kill").args(["-KILL", &pid]).status()?.success();
        anyhow::ensure!(killed, "kill -KILL {pid} ({}) failed", self.name);
        let deadline = Instant::now() + self.stop_timeout;
        while Path::new(&format!("/proc/{pid}")).exists() {
            anyhow::ensure!(Instant::now() < deadline, "{} (pid {pid}) outlived SIGKILL", self.name);
            thread::sleep(Duration::from_millis(20));
        }
        self.crashed = Some(pid);
        Ok(())
    }

    /// Has the supervisor start the program again in the same directory after
    /// [`Service::crash`] (its output goes on into the same log), and waits until `probe`
    /// says it answers, as [`Service::ready`] does.
    pub fn restart(&mut self, timeout: Duration, mut probe: impl FnMut() -> bool) -> Result<()> {
        let old = self.crashed.take().context("the program was not crashed")?;
        fs::remove_file(self.dir.join(HOLD_FILE))?;
        let pid_file = self.dir.join(PID_FILE);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.supervisor.try_wait()? {
                bail!("{} was not restarted: its supervisor exited ({status}):\n{}", self.name, self.log());
            }
            let respawned = fs::read_to_string(&pid_file).is_ok_and(|p| !p.trim().is_empty() && p.trim() != old);
            if respawned && probe() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{} did not answer within {timeout:?} of its restart:\n{}", self.name, self.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The service's directory. It is deleted when the service stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the program logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Closing the pipe tells the supervisor to stop the program and clean up.
        drop(self.stdin.take());
        if !matches!(wait_until(&mut self.supervisor, Instant::now() + self.stop_timeout), Ok(Some(_))) {
            let _ = self.supervisor.kill();
            let _ = self.supervisor.wait();
        }
    }
}

/// `127.0.0.1:PORT` with a port that is free now. Another process may take it before the
/// service binds it: start such a service with [`start_retrying`].
pub fn loopback_addr() -> Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

/// A port of 127.0.0.1 that is free now (for a daemon's metrics, or an address where nothing
/// listens); see [`loopback_addr`] for the race.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Calls `start` until it succeeds, at most a few times (port races); the error lists every
/// attempt's. `what` names the program for that error.
pub fn start_retrying<T>(what: &str, mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut errors = Vec::new();
    for _ in 0..START_ATTEMPTS {
        match start() {
            Ok(started) => return Ok(started),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    bail!("cannot start {what}:\n{}", errors.join("\n"))
}

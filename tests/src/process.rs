//! Running external programs with captured output and a deadline.
//!
//! Key types: [`Captured`] (status, stdout, stderr and the command line, printable as a
//! whole so that a failed assertion shows everything), [`run`] (spawn, capture, kill at the
//! deadline) and [`tool`] (run a helper program that must succeed, return its stdout).
//!
//! Every child gets `/dev/null` as stdin: CI has no terminal, and a program that waits for
//! input must fail rather than hang.

use std::fmt;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a helper tool (umoci, skopeo) may run. Building and pushing the fixture images
/// takes about a second; a minute means something is stuck.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// The outcome of one finished command.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The last non-empty line of stdout, trimmed.
    pub fn last_line(&self) -> Option<&str> {
        self.stdout.lines().map(str::trim).rev().find(|l| !l.is_empty())
    }

    /// Stdout parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout of `{}` is not JSON:\n{self}", self.command))
    }

    /// Panics (showing everything) unless the command succeeded.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "expected success:\n{self}");
        self
    }

    /// Panics (showing everything) unless the command failed.
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(!self.success(), "expected a non-zero exit:\n{self}");
        self
    }

    /// Panics unless stderr contains `needle`, compared case-insensitively.
    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "expected stderr to mention {needle:?}:\n{self}"
        );
        self
    }
}

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}", self.command)?;
        writeln!(f, "exit: {}", self.status)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// Renders a command line for messages (program and arguments; the environment is left out).
pub fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            line.push_str(&format!("{arg:?}"));
        } else {
            line.push_str(&arg);
        }
    }
    line
}

/// Runs `cmd` to completion with stdin from `/dev/null`, capturing stdout and stderr.
/// The child is killed when it runs longer than `timeout`, which is an error.
pub fn run(mut cmd: Command, timeout: Duration) -> Result<Captured> {
    let raw = run_raw(&mut cmd, timeout)?;
    let captured = Captured {
        command: raw.command,
        status: raw.status,
        stdout: String::from_utf8_lossy(&raw.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&raw.stderr).into_owned(),
    };
    if raw.timed_out {
        bail!("timed out after {timeout:?}:\n{captured}");
    }
    Ok(captured)
}

/// Runs a helper tool that must succeed within [`TOOL_TIMEOUT`] and returns its stdout
/// bytes, unchanged (digests are computed over them).
pub fn tool(cmd: &mut Command) -> Result<Vec<u8>> {
    let raw = run_raw(cmd, TOOL_TIMEOUT)?;
    if raw.timed_out || !raw.status.success() {
        bail!(
            "`{}` {}:\n{}{}",
            raw.command,
            if raw.timed_out {
                format!("timed out after {TOOL_TIMEOUT:?}")
            } else {
                format!("failed ({})", raw.status)
            },
            String::from_utf8_lossy(&raw.stderr),
            String::from_utf8_lossy(&raw.stdout)
        );
    }
    Ok(raw.stdout)
}

struct Raw {
    command: String,
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    timed_out: bool,
}

fn run_raw(cmd: &mut Command, timeout: Duration) -> Result<Raw> {
    let command = command_line(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{command}` (is it installed?)"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let (status, timed_out) = match wait_until(&mut child, Instant::now() + timeout)? {
        Some(status) => (status, false),
        None => {
            let _ = child.kill();
            (child.wait()?, true)
        }
    };
    Ok(Raw {
        command,
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        timed_out,
    })
}

/// Waits for `child` until `deadline`; `None` when it is still running then.
pub fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

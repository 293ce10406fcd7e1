//! Running one measured command to its end: its time, its output, and its stderr in the error.

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long one measured command may take before the benchmark gives up on it: longer than
/// husk's own waits for a guest (its agent timeout), so that husk reports a wedged guest itself.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
const _: () = assert!(COMMAND_TIMEOUT.as_secs() > crate::agent_vm::AGENT_TIMEOUT.as_secs());

/// Times one command to its exit. Output goes to files, not pipes: a container's monitor
/// inherits them, and waiting for a pipe's EOF would time the monitor instead of the command.
pub(crate) fn time(cmd: &mut Command) -> Result<Duration> {
    Ok(run_to_files(cmd)?.0)
}

/// Runs one command to its exit within [`COMMAND_TIMEOUT`]: how long it took and its stdout.
/// A failure or timeout names the command and carries its stderr.
pub(crate) fn run_to_files(cmd: &mut Command) -> Result<(Duration, String)> {
    run_with_stderr(cmd, tempfile::tempfile()?)
}

/// [`run_to_files`] with stderr going to `err` (which outlives the command: a husk monitor
/// forked by `create` keeps writing there after create has exited).
pub(crate) fn run_with_stderr(cmd: &mut Command, err: std::fs::File) -> Result<(Duration, String)> {
    let done = run_within(cmd, err, COMMAND_TIMEOUT)?;
    if !done.status.success() {
        bail!("{cmd:?} failed ({}): {}", done.status, done.stderr.trim());
    }
    Ok((done.took, done.stdout))
}

/// A command that ran to its exit.
pub(crate) struct Finished {
    pub took: Duration,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs one command to its exit within `limit`, stderr going to `err`, whatever its status;
/// an error (naming the command, with its stderr) only if it cannot start or overruns `limit`.
pub(crate) fn run_within(
    cmd: &mut Command,
    err: std::fs::File,
    limit: Duration,
) -> Result<Finished> {
    let out = tempfile::tempfile()?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{cmd:?} did not finish within {limit:?}: stderr {:?}, stdout {:?}",
                read_all(err)?.trim(),
                read_all(out)?.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Ok(Finished {
        took: start.elapsed(),
        status,
        stdout: read_all(out)?,
        stderr: read_all(err)?,
    })
}

fn read_all(mut file: std::fs::File) -> Result<String> {
    use std::io::{Read, Seek};
    let mut bytes = Vec::new();
    file.rewind()?;
    file.read_to_end(&mut bytes)
        .context("reading back the command's stderr")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

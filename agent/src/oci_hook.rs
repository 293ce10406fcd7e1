//! Running OCI hooks (config.md "POSIX-platform Hooks") the way runc does: the container's
//! state JSON on stdin, `args` as the whole argv (`args[0]` included), `env` as the whole
//! environment when given, killed after `timeout` seconds, and on failure an error that carries
//! the hook's output. Shared by the host (`husk`, most hooks) and the guest (the container's
//! init runs `startContainer` hooks before it execs).

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

/// How much of each of a hook's stdout and stderr an error message keeps.
const MAX_OUTPUT: usize = 16 << 10;

/// How long, once a hook has exited, its output is still read (a child it left behind may
/// hold the pipes open for good).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// Where and how the hooks of one lifecycle point run.
pub struct HookContext<'a> {
    /// The container's state JSON, given on every hook's stdin.
    pub state: &'a [u8],
    /// The environment of a hook without `env` (`None`: this process's own).
    pub default_env: Option<&'a [String]>,
    /// The hooks' working directory (`None`: this process's own).
    pub cwd: Option<&'a Path>,
}

/// Runs `hooks` one after another, stopping at the first that fails; `name` is the lifecycle
/// point, for the error ("error running prestart hook #1: ...", numbered from 0 as runc does).
pub fn run_all(name: &str, hooks: &[Hook], ctx: &HookContext) -> Result<(), String> {
    for (i, hook) in hooks.iter().enumerate() {
        run(hook, ctx).map_err(|e| format!("error running {name} hook #{i}: {e}"))?;
    }
    Ok(())
}

/// Runs one hook to its end (or its timeout).
pub fn run(hook: &Hook, ctx: &HookContext) -> Result<(), String> {
    let timeout = match hook.timeout() {
        Some(t) if t <= 0 => return Err(format!("timeout must be greater than zero, not {t}")),
        t => t.map(|t| Duration::from_secs(t as u64)),
    };
    let mut child = command(hook, ctx)
        .spawn()
        .map_err(|e| format!("exec {}: {}", hook.path().display(), reason(&e)))?;
    feed_stdin(&mut child, ctx.state);
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let ended = wait_until(&mut child, timeout.map(|t| Instant::now() + t));
    let output = |status: ExitStatus| {
        format!(
            "error running hook: {}, stdout: {}, stderr: {}",
            describe(status),
            stdout.text(),
            stderr.text()
        )
    };
    match ended {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(output(status)),
        None => {
            kill_group(&mut child);
            Err(format!(
                "hook ran past specified timeout of {:.1}s",
                timeout.unwrap_or_default().as_secs_f64()
            ))
        }
    }
}

/// The hook's command: its own process group (a timeout kills what it started too), piped
/// stdio, `args` and `env` as given.
fn command(hook: &Hook, ctx: &HookContext) -> Command {
    let mut cmd = Command::new(hook.path());
    let args = hook.args().as_deref().unwrap_or_default();
    if let Some((argv0, rest)) = args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    if let Some(env) = hook.env().as_deref().or(ctx.default_env) {
        cmd.env_clear();
        cmd.envs(env.iter().filter_map(|kv| kv.split_once('=')));
    }
    if let Some(dir) = ctx.cwd {
        cmd.current_dir(dir);
    }
    cmd.process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Writes the state on the hook's stdin from a thread (a hook that does not read it must not
/// block us), then closes it.
fn feed_stdin(child: &mut Child, state: &[u8]) {
    if let Some(mut stdin) = child.stdin.take() {
        let state = state.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&state);
        });
    }
}

/// What a reader thread has read of one of the hook's outputs (at most [`MAX_OUTPUT`]), and
/// whether it reached the end.
struct Drained {
    kept: Arc<Mutex<(Vec<u8>, bool)>>,
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Drained {
    let kept = Arc::new(Mutex::new((Vec::new(), pipe.is_none())));
    if let Some(mut pipe) = pipe {
        let shared = kept.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = pipe.read(&mut buf).unwrap_or(0);
                let mut k = shared.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    k.1 = true;
                    return;
                }
                let room = MAX_OUTPUT.saturating_sub(k.0.len());
                k.0.extend_from_slice(&buf[..n.min(room)]);
            }
        });
    }
    Drained { kept }
}

impl Drained {
    /// What was read, once the output ended or [`OUTPUT_GRACE`] passed.
    fn text(&self) -> String {
        let deadline = Instant::now() + OUTPUT_GRACE;
        loop {
            let k = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            if k.1 || Instant::now() >= deadline {
                return String::from_utf8_lossy(&k.0).into_owned();
            }
            drop(k);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The child's exit status, or `None` if it still runs at `deadline`.
fn wait_until(child: &mut Child, deadline: Option<Instant>) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            // Only ECHILD: someone else reaped it; nothing is left to wait for.
            Err(_) => return Some(ExitStatus::from_raw(0xff00)),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills the hook's whole process group and reaps the hook.
fn kill_group(child: &mut Child) {
    // SAFETY: kill(2) of the process group the hook leads (it was spawned with pgid 0).
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.kill();
    let _ = child.wait();
}

/// As Go prints it: "exit status 3", "signal: killed".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("signal: {}", signal_name(sig)),
        _ => status.to_string(),
    }
}

fn signal_name(sig: i32) -> String {
    match nix::sys::signal::Signal::try_from(sig) {
        Ok(nix::sys::signal::Signal::SIGKILL) => "killed".into(),
        Ok(s) => s.as_str().to_lowercase(),
        Err(_) => sig.to_string(),
    }
}

/// The lower-case reason of an OS error ("no such file or directory").
fn reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Hook {
        let mut h = Hook::default();
        h.set_path("/bin/sh".into());
        h.set_args(Some(vec!["sh".into(), "-c".into(), script.into()]));
        h
    }

    fn ctx(state: &[u8]) -> HookContext<'_> {
        HookContext {
            state,
            default_env: None,
            cwd: None,
        }
    }

    /// Runs `hook` with `state` on stdin; what it wrote to the file its script names `$OUT`.
    fn observed(mut hook: Hook, state: &[u8]) -> (Result<(), String>, String) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut env = hook.env().clone().unwrap_or_default();
        env.push(format!("OUT={}", out.display()));
        hook.set_env(Some(env));
        let r = run(&hook, &ctx(state));
        (r, std::fs::read_to_string(&out).unwrap_or_default())
    }

    #[test]
    fn the_state_arrives_on_stdin() {
        let (r, seen) = observed(sh("cat > $OUT"), br#"{"id":"c1"}"#);
        r.unwrap();
        assert_eq!(seen, r#"{"id":"c1"}"#);
    }

    #[test]
    fn args_are_the_whole_argv_and_env_the_whole_environment() {
        let script =
            "tr '\\0' ' ' < /proc/$$/cmdline > $OUT; tr '\\0' ' ' < /proc/$$/environ >> $OUT";
        let mut h = sh(script);
        h.set_args(Some(vec![
            "zero".into(),
            "-c".into(),
            script.into(),
            "one".into(),
        ]));
        h.set_env(Some(vec!["A=1".into()]));
        let (r, seen) = observed(h, b"{}");
        r.unwrap();
        // The environment is `env` alone (and the test's OUT).
        assert!(
            seen.starts_with(&format!("zero -c {script} one A=1 OUT=")),
            "{seen}"
        );
        assert_eq!(seen.matches('=').count(), 2, "{seen}");
    }

    #[test]
    fn without_env_a_hook_gets_the_default_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("echo \"B=$B\" > {}", out.display());
        let env = ["B=2".to_string()];
        let c = HookContext {
            default_env: Some(&env),
            cwd: Some(dir.path()),
            ..ctx(b"{}")
        };
        run(&sh(&script), &c).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "B=2\n");
        let script = format!("pwd > {}", out.display());
        run(&sh(&script), &c).unwrap();
        let pwd = std::fs::read_to_string(&out).unwrap();
        assert_eq!(Path::new(pwd.trim()), dir.path());
    }

    #[test]
    fn a_failure_carries_the_status_and_output() {
        let e = run(&sh("echo out; echo err >&2; exit 3"), &ctx(b"{}")).unwrap_err();
        assert_eq!(
            e,
            "error running hook: exit status 3, stdout: out\n, stderr: err\n"
        );
        let e = run(&sh("kill -9 $$"), &ctx(b"{}")).unwrap_err();
        assert!(e.contains("signal: killed"), "{e}");
    }

    #[test]
    fn a_missing_binary_is_named() {
        let mut h = Hook::default();
        h.set_path("/nonexistent/hook".into());
        let e = run(&h, &ctx(b"{}")).unwrap_err();
        assert_eq!(e, "exec /nonexistent/hook: no such file or directory");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let mut h = sh(&script);
        h.set_timeout(Some(1));
        let t = Instant::now();
        let e = run(&h, &ctx(b"{}")).unwrap_err();
        assert_eq!(e, "hook ran past specified timeout of 1.0s");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // A killed orphan may stay a zombie until whoever inherited it reaps it.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").starts_with(" Z"))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "the hook's child {pid} survived the timeout");
        h.set_timeout(Some(0));
        assert!(run(&h, &ctx(b"{}"))
            .unwrap_err()
            .contains("greater than zero"));
    }

    #[test]
    fn run_all_stops_at_the_first_failure_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let step = |n: u32, code: u32| sh(&format!("echo {n} >> {}; exit {code}", log.display()));
        let hooks = [step(0, 0), step(1, 5), step(2, 0)];
        let e = run_all("createRuntime", &hooks, &ctx(b"{}")).unwrap_err();
        assert!(
            e.starts_with("error running createRuntime hook #1: error running hook: exit status 5"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "0\n1\n");
    }
}

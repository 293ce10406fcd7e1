//! Helpers for the tests that run inside the lab (`tests/lab/run`): a guest booted by the real
//! `husk vm` process, reached through its vsock socket like any client would.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_agent::client::Client;

/// The checkout's root (the lab mounts it at the same path as on the host).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The husk binary under test: `$HUSK_BIN`, or the release build of this checkout.
pub fn husk_bin() -> PathBuf {
    std::env::var_os("HUSK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/husk"))
}

/// Fails unless this is a machine where a Linux guest can boot (the lab).
pub fn require_lab() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_virt = cpuinfo.contains(" svm") || cpuinfo.contains(" vmx");
    assert!(
        Path::new("/dev/kvm").exists() && hw_virt,
        "these tests need an ordinary KVM (SVM/VMX); run them in the lab: tests/lab/run <test binary>"
    );
}

/// How long `Guest::wait` gives the VMM to exit (a poweroff takes well under a second).
const VMM_EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a test guest gets.
#[derive(Clone, Debug, Default)]
pub struct GuestOpts {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub disks: Vec<PathBuf>,
    pub disks_ro: Vec<PathBuf>,
}

/// A guest run by a `husk vm` child process.
pub struct Guest {
    child: Child,
    dir: tempfile::TempDir,
}

impl Guest {
    pub fn boot(opts: &GuestOpts) -> Result<Guest> {
        require_lab();
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(husk_bin());
        cmd.arg("vm")
            .args(["--vcpus", &opts.vcpus.max(1).to_string()])
            .args(["--memory", &opts.memory_mib.max(128).to_string()])
            .arg("--vsock")
            .arg(dir.path().join("vsock.sock"))
            .arg("--console")
            .arg(dir.path().join("console.log"));
        for d in &opts.disks {
            cmd.arg("--disk").arg(d);
        }
        for d in &opts.disks_ro {
            cmd.arg("--disk-ro").arg(d);
        }
        let child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", husk_bin().display()))?;
        Ok(Guest { child, dir })
    }

    pub fn vsock_path(&self) -> PathBuf {
        self.dir.path().join("vsock.sock")
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// The console's last 15 lines, for error messages.
    fn console_tail(&self) -> String {
        let console = self.console();
        let tail: Vec<&str> = console.lines().rev().take(15).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// A new connection to the agent (waits for it to come up). If the VMM exits first, the
    /// error carries its stderr and the console's last lines.
    pub fn agent(&mut self) -> Result<Client<UnixStream>> {
        let uds = self.vsock_path();
        let child = std::cell::RefCell::new(&mut self.child);
        let alive = || matches!(child.borrow_mut().try_wait(), Ok(None));
        let stream = husk_runtime::guest_port::connect_retry(
            &uds,
            husk_agent::AGENT_VSOCK_PORT,
            Duration::from_secs(120),
            &alive,
        );
        let exited = child.borrow_mut().try_wait().ok().flatten();
        match (stream, exited) {
            (Ok(s), _) => {
                let mut c = Client::new(s);
                c.ping().context("ping")?;
                Ok(c)
            }
            (Err(e), Some(status)) => {
                let err = self.stderr_text()?;
                bail!(
                    "VMM exited ({status}) before the agent answered: {e:#}\nVMM stderr: {}\nconsole tail:\n{}",
                    err.trim(),
                    self.console_tail()
                )
            }
            (Err(e), None) => Err(e.context(self.hang_report())),
        }
    }

    /// For a guest that is up but never answers: where its vCPUs are (the VMM prints that on
    /// SIGUSR2) and how far its console got. Ends the VMM.
    fn hang_report(&mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2);
        // Pausing the vCPUs for the report takes milliseconds; a VMM stuck itself prints nothing.
        std::thread::sleep(Duration::from_secs(2));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let err = self
            .stderr_text()
            .unwrap_or_else(|e| format!("(unreadable: {e})"));
        format!(
            "the VMM was still running (killed); its stderr:\n{}\nconsole tail:\n{}",
            err.trim(),
            self.console_tail()
        )
    }

    /// Runs a command in the guest and returns (stdout, stderr, exit code).
    pub fn sh(&mut self, script: &str) -> Result<(String, String, i32)> {
        let out = self.agent()?.exec(&exec_request(&["sh", "-c", script]))?;
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.code.unwrap_or(-1),
        ))
    }

    /// Waits for the VMM to exit; returns its status and what it wrote on stderr. A VMM still
    /// running after `VMM_EXIT_TIMEOUT` (a wedged guest) is killed and reported, so a hang
    /// fails its test instead of the whole lab run.
    pub fn wait(mut self) -> Result<(ExitStatus, String)> {
        let Some(status) = exit_within(&mut self.child, VMM_EXIT_TIMEOUT)? else {
            bail!(
                "the VMM had not exited {VMM_EXIT_TIMEOUT:?} after it was expected to: {}",
                self.hang_report()
            );
        };
        Ok((status, self.stderr_text()?))
    }

    /// Everything the VMM wrote on stderr (waits for the pipe to close: call once it exited).
    fn stderr_text(&mut self) -> Result<String> {
        use std::io::Read;
        let mut err = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut err)?;
        }
        Ok(err)
    }

    /// Asks the agent to power off and checks that the VMM exits 0.
    pub fn poweroff(mut self) -> Result<()> {
        self.agent()?.poweroff()?;
        let (status, err) = self.wait()?;
        if !status.success() {
            bail!("VMM exited with {status} after poweroff: {err}");
        }
        Ok(())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // A failed test must not leave a VMM running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An exec request for `argv` with no stdin and the agent's default environment.
pub fn exec_request(argv: &[&str]) -> husk_agent::ExecRequest {
    husk_agent::ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A state root and bundles for OCI tests; everything under one temp dir.
pub struct Oci {
    pub dir: tempfile::TempDir,
    /// Added to the environment of every husk command (see [`Oci::set_env`]).
    env: Vec<(String, PathBuf)>,
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Oci {
    pub fn new() -> Oci {
        require_lab();
        Oci {
            dir: tempfile::tempdir().expect("tempdir"),
            env: Vec::new(),
        }
    }

    /// Sets `key` to `value` in the environment of every husk command run from here on
    /// (a host's configuration, as `HUSK_CONFIG`, is the same for every command).
    pub fn set_env(&mut self, key: &str, value: &Path) {
        self.env.push((key.to_string(), value.to_path_buf()));
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Writes a busybox bundle running `args` (examples/busybox/bundle.sh) and returns its dir.
    pub fn bundle(&self, name: &str, args: &[&str]) -> PathBuf {
        let dir = self.dir.path().join(name);
        let st = Command::new(repo_root().join("examples/busybox/bundle.sh"))
            .arg(&dir)
            .args(args)
            .stderr(Stdio::null())
            .status()
            .expect("bundle.sh");
        assert!(st.success(), "bundle.sh failed");
        dir
    }

    /// Edits a bundle's config.json.
    pub fn edit(&self, bundle: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let path = bundle.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    /// Runs `husk --root <root> ARGS` with empty stdin.
    pub fn husk(&self, args: &[&str]) -> Out {
        self.husk_with_input(args, b"")
    }

    pub fn husk_with_input(&self, args: &[&str], input: &[u8]) -> Out {
        let mut cmd = Command::new(husk_bin());
        cmd.arg("--root").arg(self.root()).args(args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        run_with_input(cmd, input)
    }

    /// Runs a husk command that leaves a container behind (`create`, `run -d`): the container's
    /// monitor inherits stdio, so output goes to files and only husk's own exit is awaited.
    pub fn husk_detached(&self, args: &[&str]) -> Out {
        self.husk_detached_env(args, &[])
    }

    /// [`Oci::husk_detached`] with `env` added to husk's environment.
    pub fn husk_detached_env(&self, args: &[&str], env: &[(&str, &Path)]) -> Out {
        let mut cmd = Command::new(husk_bin());
        cmd.arg("--root")
            .arg(self.root())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_path())))
            .envs(env.iter().copied());
        self.detached(cmd)
    }

    /// [`Oci::husk_detached`] for runc: `runc --root <root>/runc ARGS`.
    pub fn runc_detached(&self, args: &[&str]) -> Out {
        self.detached(self.runc_command(args))
    }

    /// Runs `cmd` with its output going to files, and waits for `cmd` alone.
    fn detached(&self, mut cmd: Command) -> Out {
        let out_path = self.dir.path().join("detached.out");
        let err_path = self.dir.path().join("detached.err");
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let status = wait_or_kill(&mut child, &what);
        Out {
            code: status.code().unwrap_or(-1),
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        }
    }

    /// `husk create --bundle BUNDLE --pid-file <dir>/ID.pid ID`, which must succeed; the pid
    /// file's pid (the monitor's), read exactly as written (no newline).
    pub fn create(&self, bundle: &Path, id: &str) -> i32 {
        let pid_file = self.dir.path().join(format!("{id}.pid"));
        let out = self.husk_detached(&[
            "create",
            "--bundle",
            bundle.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            id,
        ]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        std::fs::read_to_string(&pid_file).unwrap().parse().unwrap()
    }

    /// The container's status as `husk state` reports it.
    pub fn status(&self, id: &str) -> String {
        let out = self.husk(&["state", id]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["status"].as_str().unwrap().to_string()
    }

    /// The number in `file` inside container `id` (read with `husk exec`), retried for up to
    /// a minute while the file is missing or being written.
    pub fn number_in(&self, id: &str, file: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.husk(&["exec", id, "cat", file]);
            if let Ok(n) = out.stdout.trim().parse() {
                return n;
            }
            assert!(Instant::now() < deadline, "no number in {file}: {out:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `runc --root <root>/runc ARGS` (the reference).
    pub fn runc(&self, args: &[&str]) -> Out {
        run_with_input(self.runc_command(args), b"")
    }

    fn runc_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(self.dir.path().join("runc"))
            .args(args);
        cmd
    }
}

/// A runtime under test, `runc` or `husk`, with its state under the test's directory.
pub struct Runtime<'a> {
    pub name: &'static str,
    oci: &'a Oci,
}

impl Runtime<'_> {
    pub fn both(oci: &Oci) -> [Runtime<'_>; 2] {
        [Runtime { name: "runc", oci }, Runtime { name: "husk", oci }]
    }

    /// Its `--root` directory.
    pub fn root(&self) -> PathBuf {
        match self.name {
            "runc" => self.oci.dir.path().join("runc"),
            _ => self.oci.root(),
        }
    }

    /// Runs a command and reads its output to EOF, as `out=$(...)` does.
    pub fn captured(&self, args: &[&str]) -> Out {
        match self.name {
            "runc" => self.oci.runc(args),
            _ => self.oci.husk(args),
        }
    }

    /// Runs a command that leaves a container holding a copy of its stdio: output to files,
    /// the command alone awaited.
    pub fn detached(&self, args: &[&str]) -> Out {
        match self.name {
            "runc" => self.oci.runc_detached(args),
            _ => self.oci.husk_detached(args),
        }
    }

    /// Runs a command that must succeed, reading its output to EOF.
    pub fn ok(&self, args: &[&str]) -> Out {
        let out = self.captured(args);
        assert_eq!(out.code, 0, "{} {args:?}: {}", self.name, out.stderr);
        out
    }

    pub fn ok_detached(&self, args: &[&str]) {
        let out = self.detached(args);
        assert_eq!(out.code, 0, "{} {args:?}: {}", self.name, out.stderr);
    }

    pub fn status(&self, id: &str) -> String {
        let out = self.ok(&["state", id]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["status"].as_str().unwrap_or_default().to_string()
    }

    /// Waits until container `id` is stopped; false if it still runs after `limit`.
    pub fn stops_within(&self, id: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.status(id) != "stopped" {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }
}

impl Drop for Oci {
    /// A failed test must not leave containers (and their VMs) running for the tests after it.
    /// Nothing here may panic (this runs while a failed test unwinds), hence `timeout(1)`.
    fn drop(&mut self) {
        let husk = husk_bin();
        let runc = PathBuf::from("runc");
        for (program, root) in [(husk, self.root()), (runc, self.dir.path().join("runc"))] {
            if root.exists() {
                delete_all(&program, &root, &self.env);
            }
        }
    }
}

/// `PROGRAM --root ROOT delete --force` of every container `list -q` names, with the test's
/// environment (its template store, its pause settings).
fn delete_all(program: &Path, root: &Path, env: &[(String, PathBuf)]) {
    let run = |args: &[&str]| {
        Command::new("timeout")
            .arg("60")
            .arg(program)
            .arg("--root")
            .arg(root)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
    };
    let Ok(list) = run(&["list", "-q"]) else {
        return;
    };
    for id in String::from_utf8_lossy(&list.stdout).lines() {
        if !id.is_empty() {
            let _ = run(&["delete", "--force", id]);
        }
    }
}

impl Default for Oci {
    fn default() -> Self {
        Self::new()
    }
}

/// Receives the pty master that `--console-socket` hands over (SCM_RIGHTS).
pub fn receive_pty(listener: &UnixListener) -> std::fs::File {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd};
    let (conn, _) = listener.accept().unwrap();
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    for cmsg in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the fd just arrived over SCM_RIGHTS and nothing else owns it.
            return unsafe { std::fs::File::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd on the console socket");
}

/// A `--console-socket` for any number of containers: a thread accepts every pty master sent
/// to it and keeps it open (closing a master hangs up its container's terminal) until the
/// socket is dropped.
pub struct ConsoleSocket {
    path: PathBuf,
    masters: Arc<Mutex<Vec<std::fs::File>>>,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> ConsoleSocket {
        let listener = UnixListener::bind(path).expect("binding the console socket");
        let masters = Arc::new(Mutex::new(Vec::new()));
        let kept = masters.clone();
        // Left blocked in accept when the socket is dropped; it ends with the test binary.
        std::thread::spawn(move || loop {
            let master = receive_pty(&listener);
            kept.lock().unwrap().push(master);
        });
        ConsoleSocket {
            path: path.to_path_buf(),
            masters,
        }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 path")
    }

    /// Waits (up to a minute) until `n` pty masters in all have arrived.
    pub fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.masters.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "pty master number {n} never came"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        self.masters.lock().unwrap().clear();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How long one command of a test may take before it counts as hung: a hang must fail its
/// own test with diagnostics, not run out the lab's timeout for the whole binary.
fn command_timeout() -> Duration {
    let secs = std::env::var("HUSK_TEST_CMD_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(240);
    Duration::from_secs(secs)
}

fn run_with_input(mut cmd: Command, input: &[u8]) -> Out {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    // Readers run detached: after a timeout, a straggler may still hold the pipes open.
    let drain = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    };
    let out_rx = drain(Box::new(child.stdout.take().unwrap()));
    let err_rx = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait_or_kill(&mut child, &what);
    let deadline = Instant::now() + Duration::from_secs(30);
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        let left = deadline.saturating_duration_since(Instant::now());
        let bytes = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!("{what}: exited, but something it started still holds its output open")
        });
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Out {
        code: status.code().unwrap_or(-1),
        stdout: collect(out_rx),
        stderr: collect(err_rx),
    }
}

/// Waits for `child` up to [`command_timeout`]; on timeout prints what the lab is running,
/// kills the child's process group and fails the test.
fn wait_or_kill(child: &mut Child, what: &str) -> ExitStatus {
    if let Some(status) = exit_within(child, command_timeout()).expect("wait") {
        return status;
    }
    let ps = Command::new("ps")
        .args(["-eo", "pid,ppid,pgid,stat,etime,args"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // SAFETY: kill(2) of the process group this test made for the command.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "{what}: still running after {:?}; killed it. Processes then:\n{ps}",
        command_timeout()
    );
}

/// `child`'s exit status if it exits within `timeout`, else `None` (it is left running).
fn exit_within(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

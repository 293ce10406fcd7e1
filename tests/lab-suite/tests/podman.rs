//! podman (Debian's, configured as in DESIGN.md) driving Husk as its OCI runtime, in the lab.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use husk_lab_tests::{husk_bin, require_lab, Oci, Out};

const IMAGE: &str = "localhost/busybox";

/// Writes containers.conf and imports the busybox image once per test binary.
fn setup() -> &'static PathBuf {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        require_lab();
        let dir = std::env::temp_dir().join("husk-podman-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=20000:20000\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        let oci = Oci::new();
        let bundle = oci.bundle("img", &["sh"]);
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(bundle.join("rootfs"))
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let st = Command::new("podman")
            .env("CONTAINERS_CONF", &conf)
            .args(["import", "-", IMAGE])
            .stdin(tar.stdout.take().unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(tar.wait().unwrap().success(), "tar of the rootfs failed");
        assert!(st.success(), "podman import failed");
        conf
    })
}

fn podman_cmd(args: &[&str]) -> Command {
    let conf = setup();
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf)
        .arg("--runtime")
        .arg(husk_bin())
        .args(args);
    cmd
}

fn podman(args: &[&str]) -> Out {
    let out = podman_cmd(args).stdin(Stdio::null()).output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run(args: &[&str]) -> Out {
    let mut all = vec!["run", "--rm", "--network", "none"];
    all.extend_from_slice(args);
    podman(&all)
}

#[test]
fn podman_run_echo_hi() {
    let out = run(&[IMAGE, "echo", "hi"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "hi\n"),
        "{}",
        out.stderr
    );
    // With podman's default network: it hands over a host network namespace by path, which
    // the guest cannot enter; the container gets one of its own (loopback only, for now).
    let out = podman(&[
        "run",
        "--rm",
        IMAGE,
        "sh",
        "-c",
        "echo hi; ip -o link | cut -d: -f2",
    ]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "hi\n lo\n"),
        "{}",
        out.stderr
    );
}

#[test]
fn podman_exit_codes_env_workdir_user() {
    assert_eq!(run(&[IMAGE, "sh", "-c", "exit 3"]).code, 3);
    let out = run(&[
        "-e",
        "FOO=bar",
        "-w",
        "/tmp",
        "-u",
        "1000",
        IMAGE,
        "sh",
        "-c",
        "echo $FOO; pwd; id -u",
    ]);
    assert_eq!(out.stdout, "bar\n/tmp\n1000\n", "{}", out.stderr);
}

#[test]
fn podman_volume_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in"), "from host\n").unwrap();
    let vol = format!("{}:/data", dir.path().display());
    let out = run(&[
        "-v",
        &vol,
        IMAGE,
        "sh",
        "-c",
        "cat /data/in; echo out > /data/out",
    ]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "from host\n"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out")).unwrap(),
        "out\n"
    );
    let ro = run(&[
        "--read-only",
        IMAGE,
        "sh",
        "-c",
        "touch /x 2>/dev/null || echo refused",
    ]);
    assert_eq!(ro.stdout, "refused\n", "{}", ro.stderr);
}

#[test]
fn podman_exec_stop_kill_pause_rm() {
    let name = "husk-lifecycle";
    run_detached(name, &["sleep", "300"]);
    let ex = podman(&["exec", name, "echo", "in-exec"]);
    assert_eq!(ex.stdout, "in-exec\n", "{}", ex.stderr);
    assert_eq!(podman(&["pause", name]).code, 0);
    assert_eq!(status(name), "paused");
    assert_eq!(podman(&["unpause", name]).code, 0);
    assert_eq!(status(name), "running");
    let stop = podman(&["stop", "-t", "2", name]);
    assert_eq!(stop.code, 0, "{}", stop.stderr);
    assert_eq!(status(name), "exited");
    let restart = podman(&["start", name]);
    assert_eq!(restart.code, 0, "{}", restart.stderr);
    let kill = podman(&["kill", name]);
    assert_eq!(kill.code, 0, "{}", kill.stderr);
    assert_eq!(podman(&["rm", "-f", name]).code, 0);
    assert_ne!(podman(&["inspect", name]).code, 0, "container still there");
}

/// `podman run -d` of the image as `name` (replacing any container of that name).
fn run_detached(name: &str, cmd: &[&str]) {
    let _ = podman(&["rm", "-f", name]);
    let mut args = vec!["run", "-d", "--network", "none", "--name", name, IMAGE];
    args.extend_from_slice(cmd);
    let out = podman(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

fn status(name: &str) -> String {
    podman(&["inspect", "--format", "{{.State.Status}}", name])
        .stdout
        .trim()
        .to_string()
}

#[test]
fn podman_interactive_tty() {
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = pty.slave.as_raw_fd();
    let mut cmd = podman_cmd(&["run", "--rm", "-it", "--network", "none", IMAGE, "sh"]);
    let stdio = || Stdio::from(pty.slave.try_clone().unwrap());
    cmd.stdin(stdio()).stdout(stdio()).stderr(stdio());
    // SAFETY: setsid and TIOCSCTTY are async-signal-safe; the slave fd is valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    // The reader is never joined: podman's helpers (conmon) may keep the terminal open after
    // podman itself exits, so the screen is read from what has arrived by then.
    let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let mut m = master.try_clone().unwrap();
        let screen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = m.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    let text = || String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    std::thread::sleep(Duration::from_secs(2));
    master.write_all(b"tty; echo marker-$((6*7))\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !text().contains("marker-42") {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no answer from the container's shell: {}", text());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    master.write_all(b"exit 4\n").unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("podman -it did not exit: {}", text());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let screen = text();
    assert!(screen.contains("/dev/pts/"), "{screen}");
    assert_eq!(status.code(), Some(4), "{screen}");
}

/// `podman container checkpoint` stops the container with its whole micro-VM written to disk;
/// `podman container restore` brings it back where it was: a counter kept in the shell's
/// memory carries on from its value at the checkpoint instead of starting again from 1.
#[test]
fn podman_checkpoint_and_restore() {
    let name = "husk-checkpoint";
    // The count is renamed into place so that a reader never sees a truncated, empty file.
    let script =
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/count; sleep 0.2; done";
    run_detached(name, &["sh", "-c", script]);
    let try_count = || {
        let out = podman(&["exec", name, "cat", "/tmp/count"]);
        out.stdout.trim().parse::<u64>().map_err(|_| {
            format!(
                "podman exec cat /tmp/count: exit {}, stdout {:?}, stderr {}",
                out.code, out.stdout, out.stderr
            )
        })
    };
    let count = || try_count().unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut before = try_count().unwrap_or(0);
    while before < 25 {
        assert!(Instant::now() < deadline, "the counter did not get going");
        std::thread::sleep(Duration::from_millis(500));
        before = try_count().unwrap_or(0);
    }
    let ck = podman(&["container", "checkpoint", name]);
    assert_eq!(ck.code, 0, "checkpoint: {}", ck.stderr);
    assert_eq!(status(name), "exited");
    let rs = podman(&["container", "restore", name]);
    assert_eq!(rs.code, 0, "restore: {}", rs.stderr);
    assert_eq!(status(name), "running");
    let after = count();
    assert!(
        after >= before,
        "the counter started again ({after} after the restore, {before} before the checkpoint)"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while count() <= after {
        assert!(
            Instant::now() < deadline,
            "the restored counter stands still"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let rm = podman(&["rm", "-f", name]);
    assert_eq!(rm.code, 0, "{}", rm.stderr);
}

//! OCI containers through the real agent binary in `--unix` mode, on a busybox rootfs. Each
//! check looks at the effect from inside the container. Needs root (namespaces, mounts).

use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use husk_agent::{Attachment, Client, ClientError, ExecEvent, ExitStatus};
use serde_json::{json, Value};

struct Agent {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Self {
        Self::start_with_env(&[])
    }

    fn start_with_env(env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
            .envs(env.iter().copied())
            .arg("--unix")
            .arg(&socket)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "agent did not start listening");
            thread::sleep(Duration::from_millis(10));
        }
        make_rootfs(&dir.path().join("rootfs"));
        Agent { child, socket, dir }
    }

    fn client(&self) -> Client<UnixStream> {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client::new(s)
    }

    fn rootfs(&self) -> String {
        self.dir
            .path()
            .join("rootfs")
            .to_string_lossy()
            .into_owned()
    }

    fn create(&self, id: &str, spec: &Value) -> Result<i32, ClientError> {
        self.client().create_container(id, spec, &self.rootfs())
    }

    /// Creates, attaches, starts; returns the attachment.
    fn launch(&self, id: &str, spec: &Value) -> Attachment<UnixStream> {
        self.create(id, spec).unwrap();
        let attached = self.client().attach_stdio(id).unwrap();
        self.client().start_container(id).unwrap();
        attached
    }

    /// Runs a container to completion and deletes it.
    fn run(&self, id: &str, spec: &Value) -> (String, String, ExitStatus) {
        let mut a = self.launch(id, spec);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = a.copy_output(&mut out, &mut err).unwrap();
        assert_eq!(self.client().wait_container(id).unwrap(), status);
        self.client().delete_container(id).unwrap();
        let s = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        (s(out), s(err), status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A busybox rootfs: /bin/busybox, a link per applet, and the usual empty directories.
fn make_rootfs(root: &Path) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    for dir in ["proc", "sys", "dev", "tmp", "etc", "mnt"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
}

/// `runc spec`'s defaults with `script` run by `sh -c`.
fn spec(script: &str) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh", "-c", script],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"]
        }
    })
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in output:\n{out}"))
        .trim()
}

fn mountinfo_mentions(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(path)
}

fn alive(pid: i32) -> bool {
    // A zombie counts as gone: the agent reaps it soon after.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn spec_fields_are_honoured_inside() {
    let agent = Agent::start();
    let shared = agent.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = r#"
        echo "uid=$(id -u)"; echo "groups=$(id -G)"; echo "host=$(hostname)"
        grep -E '^(CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
        echo "nofile=$(ulimit -n)"; echo "umask=$(umask)"; echo "pwd=$(pwd)"
        echo "oom=$(cat /proc/self/oom_score_adj)"
        echo "fwd=$(cat /proc/sys/net/ipv4/ip_forward)"
        echo "masked=$(wc -c < /proc/timer_list)"; echo "firmware=$(ls /sys/firmware | wc -l)"
        echo "sysro=$(awk '$5=="/proc/sys" {print substr($6,1,2)}' /proc/self/mountinfo)"
        echo "rootro=$(awk '$5=="/" {print substr($6,1,2)}' /proc/self/mountinfo)"
        echo "scratch=$(awk '$2=="/scratch" {print $3}' /proc/mounts)"
        echo "pid=$$"
        echo hello > /shared/from-container && echo "wrote=yes"
        echo "dev=$(ls /dev | tr '\n' ' ')"
        echo "FOO=$FOO"
    "#;
    let mut s = spec(script);
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    s["process"]["user"] =
        json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 23});
    s["process"]["capabilities"] = json!({"bounding": caps, "effective": caps,
        "permitted": caps, "inheritable": caps, "ambient": caps});
    s["process"]["cwd"] = json!("/work/dir");
    s["process"]["oomScoreAdj"] = json!(123);
    s["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!("FOO=bar baz"));
    s["hostname"] = json!("husky");
    s["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]});
    let mounts = s["mounts"].as_array_mut().unwrap();
    mounts.push(json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}));
    mounts.push(json!({"destination": "/shared", "type": "bind", "source": shared, "options": ["rbind", "rw"]}));
    let (out, err, status) = agent.run("fields", &s);
    assert!(status.success(), "{status} {out} {err}");
    assert_eq!(line(&out, "uid="), "1000");
    assert_eq!(line(&out, "groups="), "1000 10 20");
    assert_eq!(line(&out, "host="), "husky");
    // CAP_KILL (5), CAP_NET_BIND_SERVICE (10), CAP_AUDIT_WRITE (29).
    assert_eq!(line(&out, "CapEff:"), "0000000020000420");
    assert_eq!(line(&out, "CapBnd:"), "0000000020000420");
    assert_eq!(line(&out, "CapAmb:"), "0000000020000420");
    assert_eq!(line(&out, "NoNewPrivs:"), "1");
    assert_eq!(line(&out, "Seccomp:"), "2");
    assert_eq!(line(&out, "nofile="), "1024");
    assert_eq!(line(&out, "umask="), "0027");
    assert_eq!(line(&out, "pwd="), "/work/dir");
    assert_eq!(line(&out, "oom="), "123");
    assert_eq!(line(&out, "fwd="), "1");
    assert_eq!(line(&out, "masked="), "0", "{err}");
    assert_eq!(line(&out, "firmware="), "0");
    assert_eq!(line(&out, "sysro="), "ro");
    assert_eq!(line(&out, "rootro="), "ro");
    assert_eq!(line(&out, "scratch="), "tmpfs");
    assert_eq!(line(&out, "pid="), "1");
    assert_eq!(line(&out, "wrote="), "yes");
    assert_eq!(line(&out, "FOO="), "bar baz");
    let dev = line(&out, "dev=");
    for node in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue", "fd",
        "stdin",
    ] {
        assert!(
            dev.split(' ').any(|d| d == node),
            "/dev lacks {node}: {dev}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(shared.join("from-container")).unwrap(),
        "hello\n"
    );
}

#[test]
fn seccomp_readonly_root_and_defaults_as_root() {
    let agent = Agent::start();
    let mut s = spec(
        "mkdir /tmp/x 2>&1; echo mkdir=$?; touch /newfile 2>&1; echo touch=$?;\
         grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; echo shm=$(awk '$2==\"/dev/shm\" {print $3}' /proc/mounts)",
    );
    s["root"]["readonly"] = json!(true);
    s["process"]["noNewPrivileges"] = json!(false);
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]});
    let (out, _, status) = agent.run("root", &s);
    assert!(status.success());
    assert!(out.contains("Operation not permitted"), "{out}");
    assert_eq!(line(&out, "mkdir="), "1");
    assert!(out.contains("Read-only file system"), "{out}");
    assert_eq!(line(&out, "touch="), "1");
    assert_eq!(line(&out, "CapEff:"), "0000000020000420");
    assert_eq!(line(&out, "NoNewPrivs:"), "0");
    assert_eq!(line(&out, "shm="), "tmpfs");
}

#[test]
fn exit_codes_and_signals() {
    let agent = Agent::start();
    let (_, _, status) = agent.run("seven", &spec("exit 7"));
    assert_eq!((status.code, status.signal), (Some(7), None));

    // SIGTERM reaches a handler; SIGKILL is reported as a signal.
    agent
        .create(
            "trap",
            &spec("trap 'exit 3' TERM; while :; do sleep 0.1; done"),
        )
        .unwrap();
    agent.client().start_container("trap").unwrap();
    thread::sleep(Duration::from_millis(300));
    agent.client().signal_container("trap", 15, false).unwrap();
    let status = agent.client().wait_container("trap").unwrap();
    assert_eq!(status.code, Some(3));
    agent.client().delete_container("trap").unwrap();

    let pid = agent.create("sleeper", &spec("sleep 100")).unwrap();
    agent.client().start_container("sleeper").unwrap();
    let waiter = {
        let mut c = agent.client();
        thread::spawn(move || c.wait_container("sleeper").unwrap())
    };
    agent.client().signal_container("sleeper", 9, true).unwrap();
    let status = waiter.join().unwrap();
    assert_eq!((status.code, status.signal), (None, Some(9)));
    assert!(agent
        .client()
        .signal_container("sleeper", 9, false)
        .is_err());
    agent.client().delete_container("sleeper").unwrap();
    assert!(!alive(pid));
}

#[test]
fn exec_joins_the_container_and_ps_lists_it() {
    let agent = Agent::start();
    let mut s = spec("sleep 100");
    s["hostname"] = json!("exec-host");
    s["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/marker", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}),
    );
    let init = agent.create("ex", &s).unwrap();
    agent.client().start_container("ex").unwrap();
    let process = json!({"args": ["sh", "-c", "hostname; awk '$2==\"/marker\" {print $3}' /proc/mounts; echo $FOO; id -u; pwd"],
        "env": ["PATH=/bin", "FOO=exec-env"], "cwd": "/tmp", "user": {"uid": 7, "gid": 7}});
    let out = agent.client().exec_in_container("ex", &process).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "exec-host\ntmpfs\nexec-env\n7\n/tmp\n"
    );

    // A long-running exec shows up in ps next to init.
    let mut c = agent.client();
    c.start_exec_in_container(
        "ex",
        &json!({"args": ["sleep", "50"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
    )
    .unwrap();
    thread::sleep(Duration::from_millis(300));
    let pids = agent.client().list_processes("ex").unwrap();
    assert!(pids.contains(&init) && pids.len() == 2, "{pids:?}");
    c.signal(9).unwrap();
    assert!(matches!(c.next_event().unwrap(), ExecEvent::Exit(s) if s.signal == Some(9)));

    let missing = json!({"args": ["nope"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    let err = agent
        .client()
        .exec_in_container("ex", &missing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"exec: "nope": executable file not found in $PATH"#),
        "{err}"
    );
    agent.client().delete_container("ex").unwrap();
}

#[test]
fn terminal_mode_gets_a_pty_and_resizes() {
    let agent = Agent::start();
    let mut s = spec("tty; read x; stty size");
    s["process"]["terminal"] = json!(true);
    let mut a = agent.launch("tty", &s);
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("/dev/pts/0") {
        match a.next_event().unwrap() {
            ExecEvent::Stdout(d) => out.extend(d),
            other => panic!(
                "{other:?} before tty output: {}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    a.resize(40, 100).unwrap();
    a.send_stdin(b"go\n").unwrap();
    let status = a.copy_output(&mut out, &mut Vec::new()).unwrap();
    assert!(status.success());
    assert!(
        String::from_utf8_lossy(&out).contains("40 100"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    agent.client().delete_container("tty").unwrap();

    // The same for a process exec'd into a running container.
    agent.create("tty2", &spec("sleep 100")).unwrap();
    agent.client().start_container("tty2").unwrap();
    let mut c = agent.client();
    let p = json!({"args": ["sh", "-c", "tty; stty size"], "cwd": "/", "terminal": true,
        "consoleSize": {"height": 33, "width": 77}, "user": {"uid": 0, "gid": 0}});
    c.start_exec_in_container("tty2", &p).unwrap();
    let mut out = Vec::new();
    loop {
        match c.next_event().unwrap() {
            ExecEvent::Stdout(d) => out.extend(d),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(s) => {
                assert!(s.success());
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("/dev/pts/0") && text.contains("33 77"),
        "{text}"
    );
    agent.client().delete_container("tty2").unwrap();
}

#[test]
fn stdin_eof_reaches_the_process() {
    let agent = Agent::start();
    let mut a = agent.launch("cat", &spec("cat; echo done"));
    a.send_stdin(b"hello\n").unwrap();
    a.close_stdin().unwrap();
    let mut out = Vec::new();
    let status = a.copy_output(&mut out, &mut Vec::new()).unwrap();
    assert!(status.success());
    assert_eq!(out, b"hello\ndone\n");
    agent.client().delete_container("cat").unwrap();
}

#[test]
fn errors_leave_nothing_behind() {
    let agent = Agent::start();
    let rootfs = agent.rootfs();
    let err = |r: Result<(), ClientError>| r.unwrap_err().to_string();
    assert!(err(agent.client().start_container("ghost")).contains("does not exist"));

    agent.create("bad", &spec("true")).unwrap();
    let mut s = spec("true");
    s["process"]["args"] = json!(["no-such-program"]);
    let e = err(agent.create("bad2", &s).map(drop));
    assert!(
        e.contains(r#"exec: "no-such-program": executable file not found in $PATH"#),
        "{e}"
    );
    let e = err(agent.create("bad", &spec("true")).map(drop));
    assert!(e.contains("already exists"), "{e}");
    agent.client().delete_container("bad").unwrap();

    let mut s = spec("true");
    s["process"]["cwd"] = json!("/etc/passwd");
    let e = err(agent.create("cwd", &s).map(drop));
    assert!(
        e.contains("chdir to cwd") && e.contains("not a directory"),
        "{e}"
    );

    let mut s = spec("true");
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir!"], "action": "SCMP_ACT_ERRNO"}]});
    let e = err(agent.create("sec", &s).map(drop));
    assert!(e.contains("invalid syscall name"), "{e}");

    // Failed creates may be retried with the same id, and left no mounts and no processes.
    let pid = agent.create("cwd", &spec("sleep 100")).unwrap();
    assert!(alive(pid));
    assert!(!mountinfo_mentions(&rootfs));
    agent.client().start_container("cwd").unwrap();
    assert!(err(agent.client().start_container("cwd")).contains("not in created state"));
    agent.client().delete_container("cwd").unwrap();
    assert!(!alive(pid));
    assert!(!mountinfo_mentions(&rootfs));
    assert!(err(agent.client().delete_container("cwd")).contains("does not exist"));
}

/// The guest's root is an initramfs, where pivot_root fails: the move-and-chroot fallback
/// must give the same view.
#[test]
fn no_pivot_fallback_gives_the_same_view() {
    let agent = Agent::start_with_env(&[("HUSK_AGENT_NO_PIVOT", "1")]);
    let rootfs = agent.rootfs();
    let script = "ls /; hostname; echo pid=$$; touch /x 2>/dev/null || echo ro=yes; \
                  echo proc=$(awk '$2==\"/proc\" {print $3}' /proc/mounts)";
    let (out, err, status) = agent.run("nopivot", &spec(script));
    assert!(status.success(), "{out} {err}");
    assert!(
        out.lines().any(|l| l == "bin") && out.contains("runc\n"),
        "{out}"
    );
    assert_eq!(line(&out, "pid="), "1");
    assert_eq!(line(&out, "ro="), "yes");
    assert_eq!(line(&out, "proc="), "proc");
    assert!(!mountinfo_mentions(&rootfs));
}

//! The OCI runtime in the lab: runc's command line and behaviour, each spec field checked from
//! inside the container, and compared with runc where runc's semantics apply.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_lab_tests::{receive_pty, Oci, Out};
use serde_json::json;

fn run(oci: &Oci, bundle: &Path, id: &str) -> Out {
    oci.husk(&["run", "--bundle", bundle.to_str().unwrap(), id])
}

/// Runs `sh -c script` in a fresh busybox container under both runtimes; returns both outputs.
fn both(oci: &Oci, name: &str, script: &str, edit: impl Fn(&mut serde_json::Value)) -> (Out, Out) {
    let b = oci.bundle(name, &["sh", "-c", script]);
    oci.edit(&b, edit);
    let husk = run(oci, &b, &format!("{name}-h"));
    let runc = oci.runc(&["run", "--bundle", b.to_str().unwrap(), &format!("{name}-r")]);
    (husk, runc)
}

fn same(name: &str, script: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let oci = Oci::new();
    let (h, r) = both(&oci, name, script, edit);
    assert_eq!(r.code, 0, "runc failed: {}", r.stderr);
    assert_eq!(h.code, 0, "husk failed: {}", h.stderr);
    assert_eq!(h.stdout, r.stdout, "husk and runc differ");
    h.stdout
}

#[test]
fn run_prints_hi_and_exits_0() {
    let oci = Oci::new();
    let b = oci.bundle("b", &["echo", "hi"]);
    let out = run(&oci, &b, "t1");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "hi\n"),
        "{}",
        out.stderr
    );
    // `run` deletes the container afterwards.
    assert_eq!(oci.husk(&["state", "t1"]).code, 1);
}

#[test]
fn exit_codes_come_back() {
    let oci = Oci::new();
    // (A pid namespace's init ignores SIGKILL from inside, so a child takes the signal.)
    for (script, code) in [
        ("exit 7", 7),
        ("exit 1", 1),
        ("sh -c 'kill -9 $$'; exit $?", 137),
    ] {
        let b = oci.bundle("b", &["sh", "-c", script]);
        assert_eq!(run(&oci, &b, "codes").code, code, "{script}");
    }
}

#[test]
fn lifecycle_create_start_state_kill_delete() {
    let oci = Oci::new();
    let b = oci.bundle("b", &["sleep", "300"]);
    let pid = oci.create(&b, "c1");
    let created = state(&oci, "c1");
    assert_eq!(created["status"], "created");
    assert_eq!(created["pid"], pid);
    assert_eq!(created["bundle"], b.to_str().unwrap());
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    assert_eq!(oci.husk(&["start", "c1"]).code, 0);
    assert_eq!(state(&oci, "c1")["status"], "running");
    let again = oci.husk(&["start", "c1"]);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("level=error"), "{}", again.stderr);

    let list = oci.husk(&["list", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list[0]["id"], "c1");

    assert_eq!(oci.husk(&["kill", "c1", "KILL"]).code, 0);
    wait_status(&oci, "c1", "stopped");
    // "stopped" is recorded before the guest powers off; the monitor follows within the
    // poweroff bound.
    assert!(
        wait_gone(pid.into(), Duration::from_secs(40)),
        "monitor still alive"
    );
    let killed = oci.husk(&["kill", "c1", "9"]);
    assert_eq!(killed.code, 1, "kill of a stopped container succeeded");
    assert_eq!(oci.husk(&["delete", "c1"]).code, 0);
    let gone = oci.husk(&["state", "c1"]);
    assert!(
        gone.stderr.contains("container does not exist"),
        "{}",
        gone.stderr
    );
    assert!(!oci.root().join("c1").exists());
}

#[test]
fn errors_follow_runcs_shape_and_leave_nothing() {
    let oci = Oci::new();
    let b = oci.bundle("b", &["true"]);
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "syntax",
            Box::new(|b| std::fs::write(b.join("config.json"), "{bad").unwrap()),
        ),
        (
            "no process",
            Box::new(|b| {
                edit_raw(b, |v| {
                    v.as_object_mut().unwrap().remove("process");
                })
            }),
        ),
        (
            "no rootfs",
            Box::new(|b| edit_raw(b, |v| v["root"]["path"] = json!("nope"))),
        ),
        (
            "bad uid",
            Box::new(|b| edit_raw(b, |v| v["process"]["user"]["uid"] = json!("abc"))),
        ),
    ];
    for (what, break_it) in cases {
        let b2 = oci.bundle(&format!("bad-{}", what.replace(' ', "-")), &["true"]);
        break_it(&b2);
        let out = oci.husk(&["create", "--bundle", b2.to_str().unwrap(), "bad"]);
        assert_eq!(out.code, 1, "{what}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{what}: {}", out.stderr);
        assert!(out.stderr.starts_with("time=\"") && out.stderr.contains("level=error msg="));
        assert!(
            !oci.root().join("bad").exists(),
            "{what}: state left behind"
        );
        let json = oci.husk(&[
            "--log-format",
            "json",
            "create",
            "--bundle",
            b2.to_str().unwrap(),
            "bad",
        ]);
        let v: serde_json::Value = serde_json::from_str(json.stderr.trim()).expect("json error");
        assert_eq!(v["level"], "error");
    }
    // A duplicate id.
    let ok = oci.husk_detached(&["create", "--bundle", b.to_str().unwrap(), "dup"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let dup = oci.husk_detached(&["create", "--bundle", b.to_str().unwrap(), "dup"]);
    assert_eq!(dup.code, 1);
    assert!(dup.stderr.contains("already exists"), "{}", dup.stderr);
    assert_eq!(oci.husk(&["delete", "--force", "dup"]).code, 0);
}

/// Breaks a bundle's config.json in one way.
type Breaker = Box<dyn Fn(&Path)>;

fn edit_raw(b: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = b.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn state(oci: &Oci, id: &str) -> serde_json::Value {
    let out = oci.husk(&["state", id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

/// Waits until process `pid` is gone (or a zombie nobody has reaped yet); false on timeout.
fn wait_gone(pid: i64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return true
            }
            Ok(_) if Instant::now() >= deadline => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn wait_status(oci: &Oci, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while state(oci, id)["status"] != want {
        assert!(Instant::now() < deadline, "{id} never became {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn process_fields_match_runc() {
    let script = "id; hostname; pwd; umask; ulimit -n; env | sort; \
                  grep -E '^(Cap|NoNewPrivs)' /proc/self/status; cat /proc/self/oom_score_adj";
    same("fields", script, |v| {
        v["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [5, 7]});
        v["process"]["cwd"] = json!("/tmp");
        v["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!("FOO=bar"));
        v["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 4321, "soft": 1234}]);
        v["process"]["oomScoreAdj"] = json!(100);
        v["process"]["user"]["umask"] = json!(63);
        v["hostname"] = json!("box1");
    });
}

#[test]
fn security_fields_match_runc() {
    let script = "touch /rootfile 2>/dev/null && echo root-writable; \
                  echo 1 > /proc/sys/kernel/ostype 2>/dev/null && echo sys-writable; \
                  wc -c < /etc/group; cat /proc/sys/net/ipv4/ip_forward; \
                  grep Seccomp: /proc/self/status; mkdir /tmp/x 2>&1 | sed 's/.*: //'";
    let out = same("sec", script, |v| {
        v["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
        v["linux"]["maskedPaths"]
            .as_array_mut()
            .unwrap()
            .push(json!("/etc/group"));
        v["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
    });
    assert!(!out.contains("writable"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
}

#[test]
fn namespaces_and_mounts_match_runc() {
    same("ns", "echo $$; grep -c . /proc/mounts >/dev/null; mount | grep -E ' on /(proc|dev|sys|tmp) ' | cut -d' ' -f3,5 | sort", |v| {
        v["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1m"]
        }));
    });
}

#[test]
fn bind_mounts_read_write_and_read_only() {
    let oci = Oci::new();
    let host_rw = oci.dir.path().join("rw");
    let host_ro = oci.dir.path().join("ro");
    std::fs::create_dir_all(&host_rw).unwrap();
    std::fs::create_dir_all(&host_ro).unwrap();
    std::fs::write(host_ro.join("in"), "from host\n").unwrap();
    let file = oci.dir.path().join("hosts");
    std::fs::write(&file, "127.0.0.1 husk-test\n").unwrap();
    let b = oci.bundle(
        "b",
        &[
            "sh",
            "-c",
            "cat /ro/in /etc/hosts; echo written > /rw/out; \
        echo x > /ro/in 2>/dev/null || echo ro-refused",
        ],
    );
    oci.edit(&b, |v| {
        let m = v["mounts"].as_array_mut().unwrap();
        m.push(json!({"destination": "/rw", "type": "bind", "source": host_rw, "options": ["rbind", "rw"]}));
        m.push(json!({"destination": "/ro", "type": "bind", "source": host_ro, "options": ["rbind", "ro"]}));
        m.push(json!({"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["bind", "ro"]}));
    });
    let out = run(&oci, &b, "binds");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "from host\n127.0.0.1 husk-test\nro-refused\n");
    assert_eq!(
        std::fs::read_to_string(host_rw.join("out")).unwrap(),
        "written\n"
    );
    assert_eq!(
        std::fs::read_to_string(host_ro.join("in")).unwrap(),
        "from host\n"
    );
}

#[test]
fn stdin_reaches_the_process_and_output_is_complete() {
    let oci = Oci::new();
    let b = oci.bundle("b", &["sh", "-c", "cat; seq 1 100000; echo done >&2"]);
    let out = oci.husk_with_input(&["run", "--bundle", b.to_str().unwrap(), "io"], b"typed\n");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut want = String::from("typed\n");
    (1..=100000).for_each(|i| want += &format!("{i}\n"));
    assert!(
        out.stdout == want,
        "stdout differs ({} bytes)",
        out.stdout.len()
    );
    assert_eq!(out.stderr, "done\n");
}

#[test]
fn exec_ps_pause_resume() {
    let oci = Oci::new();
    let b = oci.bundle("b", &["sleep", "300"]);
    let started = oci.husk_detached(&["run", "-d", "--bundle", b.to_str().unwrap(), "ex"]);
    assert_eq!(started.code, 0, "{}", started.stderr);
    let out = oci.husk(&["exec", "ex", "echo", "in-container"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "in-container\n"),
        "{}",
        out.stderr
    );
    assert_eq!(oci.husk(&["exec", "ex", "sh", "-c", "exit 5"]).code, 5);
    let out = oci.husk(&[
        "exec",
        "--env",
        "FOO=bar",
        "--cwd",
        "/tmp",
        "--user",
        "1000:1000",
        "ex",
        "sh",
        "-c",
        "echo $FOO; pwd; id -u",
    ]);
    assert_eq!(out.stdout, "bar\n/tmp\n1000\n", "{}", out.stderr);
    let missing = oci.husk(&["exec", "ex", "nosuch"]);
    assert_ne!(missing.code, 0);
    assert!(missing.stderr.contains("nosuch"), "{}", missing.stderr);
    let ps = oci.husk(&["ps", "--format", "json", "ex"]);
    let pids: Vec<i64> = serde_json::from_str(&ps.stdout).expect("ps json");
    assert!(!pids.is_empty());
    assert_eq!(oci.husk(&["pause", "ex"]).code, 0);
    assert_eq!(state(&oci, "ex")["status"], "paused");
    assert_eq!(oci.husk(&["resume", "ex"]).code, 0);
    assert_eq!(state(&oci, "ex")["status"], "running");
    assert_eq!(oci.husk(&["delete", "--force", "ex"]).code, 0);
    assert!(!oci.root().join("ex").exists());
}

#[test]
fn features_lists_what_husk_honours() {
    let oci = Oci::new();
    let out = oci.husk(&["features"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["linux"]["seccomp"]["enabled"], true);
    assert!(v["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .contains(&json!("pid")));
}

#[test]
fn resources_size_the_vm_and_limit_the_monitors_cgroup() {
    let oci = Oci::new();
    let b = oci.bundle(
        "res",
        &["sh", "-c", "nproc; grep MemTotal /proc/meminfo; sleep 300"],
    );
    oci.edit(&b, |v| {
        v["linux"]["resources"] = json!({
            "memory": {"limit": 300u64 << 20},
            "cpu": {"quota": 150000, "period": 100000}
        });
        v["linux"]["cgroupsPath"] = json!("/husk-test/res1");
    });
    let pid = oci.create(&b, "res1").to_string();
    // The lab runs cgroup v2 (the hosts run v1; both are handled).
    let cg = Path::new("/sys/fs/cgroup/husk-test/res1");
    let read = |f: &str| std::fs::read_to_string(cg.join(f)).unwrap_or_default();
    assert!(
        read("cgroup.procs").lines().any(|l| l == pid),
        "monitor not in {cg:?}"
    );
    // Guest RAM plus the VMM's 64 MiB allowance.
    assert_eq!(read("memory.max").trim(), ((300u64 + 64) << 20).to_string());
    assert_eq!(read("cpu.max").trim(), "150000 100000");
    assert_eq!(oci.husk(&["kill", "res1", "KILL"]).code, 0);
    wait_status(&oci, "res1", "stopped");
    assert_eq!(oci.husk(&["delete", "res1"]).code, 0);
    assert!(!cg.exists(), "cgroup left behind after delete");
}

#[test]
fn exec_variants_kill_all_and_list() {
    let oci = Oci::new();
    let b = oci.bundle("b", &["sleep", "300"]);
    let started = oci.husk_detached(&["run", "-d", "--bundle", b.to_str().unwrap(), "ev"]);
    assert_eq!(started.code, 0, "{}", started.stderr);

    eprintln!("exec_variants: started");
    // --process: a process.json as podman writes it.
    let process = oci.dir.path().join("process.json");
    let spec = json!({"args": ["sh", "-c", "echo from-process-json $X"], "env": ["X=1", "PATH=/bin"],
                      "cwd": "/", "user": {"uid": 0, "gid": 0}, "terminal": false});
    std::fs::write(&process, spec.to_string()).unwrap();
    let out = oci.husk(&["exec", "--process", process.to_str().unwrap(), "ev"]);
    assert_eq!(out.stdout, "from-process-json 1\n", "{}", out.stderr);

    eprintln!("exec_variants: exec --process done");
    // --detach with --pid-file: returns at once, the pid file names a live host process.
    let pid_file = oci.dir.path().join("exec.pid");
    let out = oci.husk_detached(&[
        "exec",
        "--detach",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "ev",
        "sleep",
        "200",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(Path::new(&format!("/proc/{}", pid.trim())).exists());

    eprintln!("exec_variants: exec --detach done");
    // --tty with a console socket: a pty master arrives, and the shell behind it answers.
    let sock = oci.dir.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut exec = std::process::Command::new(husk_lab_tests::husk_bin())
        .arg("--root")
        .arg(oci.root())
        .args([
            "exec",
            "--tty",
            "--console-socket",
            sock.to_str().unwrap(),
            "ev",
            "sh",
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut pty = receive_pty(&listener);
    use std::io::{Read, Write};
    pty.write_all(b"echo tty-$((6*7)); tty; exit 3\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = pty.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains("/dev/pts/") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(text.contains("tty-42"), "{text}");
    assert!(text.contains("/dev/pts/"), "{text}");
    assert_eq!(exec.wait().unwrap().code(), Some(3));

    eprintln!("exec_variants: exec --tty done");
    // list: runc's table.
    let list = oci.husk(&["list"]);
    let header = list.stdout.lines().next().unwrap_or_default().to_string();
    for col in ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        list.stdout
            .lines()
            .any(|l| l.split_whitespace().next() == Some("ev") && l.contains("running")),
        "{}",
        list.stdout
    );
    let quiet = oci.husk(&["list", "-q"]);
    assert_eq!(quiet.stdout, "ev\n");

    eprintln!("exec_variants: list done");
    // kill --all reaches every process, the exec'd sleeper included: the container stops.
    assert_eq!(oci.husk(&["kill", "--all", "ev", "KILL"]).code, 0);
    wait_status(&oci, "ev", "stopped");
    assert_eq!(oci.husk(&["delete", "ev"]).code, 0);
}

/// A field of a /proc status file.
fn status_field(status: &str, name: &str) -> String {
    let line = status.lines().find(|l| l.starts_with(name));
    line.map(|l| l[name.len()..].trim().to_string())
        .unwrap_or_default()
}

/// Once created, every thread of the monitor has no_new_privs and a seccomp filter, and only
/// its kind's capabilities (README.md, "Threat model"): none but in the 9p workers and the
/// control thread. The container still works: exec, kill.
#[test]
fn the_monitor_is_confined_once_created() {
    let oci = Oci::new();
    let b = oci.bundle("b", &["sleep", "300"]);
    let pid = oci.create(&b, "conf");
    assert_eq!(oci.husk(&["start", "conf"]).code, 0);
    let main = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&main, "Seccomp:"), "2", "{main}");
    assert_eq!(status_field(&main, "NoNewPrivs:"), "1", "{main}");
    assert_eq!(status_field(&main, "CapEff:"), "0000000000000000", "{main}");
    assert_eq!(status_field(&main, "CapBnd:"), "0000000000000000", "{main}");
    let fs9p = "000000000000001b"; // CHOWN, DAC_OVERRIDE, FOWNER, FSETID
                                   // SYS_PTRACE, for userfaultfd(2), only without /dev/userfaultfd.
    let control = match Path::new("/dev/userfaultfd").exists() {
        true => "0000000000000000",
        false => "0000000000080000",
    };
    let mut seen = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let name = status_field(&status, "Name:");
        let want = match name.as_str() {
            "virtio-9p" => fs9p,
            "control" => control,
            _ => "0000000000000000",
        };
        assert_eq!(status_field(&status, "Seccomp:"), "2", "{name}: {status}");
        assert_eq!(
            status_field(&status, "NoNewPrivs:"),
            "1",
            "{name}: {status}"
        );
        assert_eq!(status_field(&status, "CapEff:"), want, "{name}: {status}");
        assert_eq!(status_field(&status, "CapPrm:"), want, "{name}: {status}");
        assert_eq!(
            status_field(&status, "CapInh:"),
            "0000000000000000",
            "{name}"
        );
        seen.push(name);
    }
    for kind in [
        "husk-vcpu0",
        "virtio-9p",
        "virtio-vsock",
        "control",
        "stdout",
    ] {
        assert!(
            seen.iter().any(|n| n == kind),
            "no {kind} thread in {seen:?}"
        );
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size"));
    assert!(
        core.is_some_and(|l| l.split_whitespace().nth(4) == Some("0")),
        "{limits}"
    );
    let out = oci.husk(&["exec", "conf", "echo", "still here"]);
    assert_eq!(out.stdout.trim(), "still here", "{out:?}");
    assert_eq!(oci.husk(&["kill", "conf", "KILL"]).code, 0);
    wait_status(&oci, "conf", "stopped");
    assert!(
        wait_gone(pid.into(), Duration::from_secs(40)),
        "monitor still alive"
    );
    assert_eq!(oci.husk(&["delete", "conf"]).code, 0);
}

//! The micro-VM core against a real Linux guest: boot, agent exec, vsock, virtio-blk, panics,
//! vCPU counts. Runs in the lab (ordinary KVM).

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::process::Command;

use husk_lab_tests::{exec_request, Guest, GuestOpts};
use sha2::{Digest, Sha256};

fn guest() -> Guest {
    Guest::boot(&GuestOpts::default()).expect("boot")
}

#[test]
fn boots_to_a_ready_agent_and_powers_off() {
    let mut g = guest();
    let (agent, protocol) = g.agent().unwrap().version().unwrap();
    assert!(!agent.is_empty());
    assert_eq!(protocol, husk_agent::PROTOCOL_VERSION);
    g.poweroff().unwrap();
}

#[test]
fn exec_uname_reports_the_guest_kernel() {
    let mut g = guest();
    let (out, _, code) = g.sh("uname -a").unwrap();
    assert_eq!(code, 0);
    assert!(out.starts_with("Linux "), "uname said {out:?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        !out.contains(host.trim()),
        "uname shows the lab's kernel, not the guest's"
    );
    g.poweroff().unwrap();
}

#[test]
fn exec_returns_the_exit_status() {
    let mut g = guest();
    assert_eq!(g.sh("exit 7").unwrap().2, 7);
    let (_, err, code) = g.sh("echo oops >&2; exit 3").unwrap();
    assert_eq!((err.as_str(), code), ("oops\n", 3));
    g.poweroff().unwrap();
}

#[test]
fn ten_mib_of_stdout_arrive_intact() {
    let mut g = guest();
    let (_, sum, code) = g
        .sh("head -c 10485760 /dev/urandom > /tmp/blob; sha256sum /tmp/blob >&2")
        .unwrap();
    assert_eq!(code, 0);
    let req = exec_request(&["cat", "/tmp/blob"]);
    let out = g.agent().unwrap().exec(&req).unwrap();
    assert_eq!(out.stdout.len(), 10 << 20);
    let ours = format!("{:x}", Sha256::digest(&out.stdout));
    assert_eq!(sum.split_whitespace().next(), Some(ours.as_str()));
    g.poweroff().unwrap();
}

#[test]
fn vsock_host_to_guest_connections_are_independent() {
    let mut g = guest();
    // Several host-initiated connections at once, each with its own stream.
    let mut a = g.agent().unwrap();
    let mut b = g.agent().unwrap();
    assert_eq!(a.exec(&req("echo a")).unwrap().stdout, b"a\n");
    assert_eq!(b.exec(&req("echo b")).unwrap().stdout, b"b\n");
    drop((a, b));
    g.poweroff().unwrap();
}

#[test]
fn vsock_guest_to_host_connection_reaches_the_host_listener() {
    let mut g = guest();
    let listener = UnixListener::bind(format!("{}_5000", g.vsock_path().display())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        got
    });
    let (_, err, code) = g
        .sh("echo hello-from-guest | /init vsock-send 2 5000")
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(server.join().unwrap(), "hello-from-guest\n");
    g.poweroff().unwrap();
}

#[test]
fn blk_device_is_readable_and_writable_from_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.ext4");
    let seed = dir.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    std::fs::write(seed.join("from-host"), "written on the host\n").unwrap();
    mkfs(&img, &seed);
    let mut g = Guest::boot(&GuestOpts {
        disks: vec![img.clone()],
        ..Default::default()
    })
    .unwrap();
    let script = "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && cat /mnt/d/from-host \
                  && echo written-in-guest > /mnt/d/from-guest && umount /mnt/d";
    let (out, err, code) = g.sh(script).unwrap();
    assert_eq!((code, out.as_str()), (0, "written on the host\n"), "{err}");
    g.poweroff().unwrap();
    assert_eq!(debugfs_cat(&img, "/from-guest"), "written-in-guest\n");
}

#[test]
fn read_only_blk_device_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.img");
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, &pattern).unwrap();
    let mut g = Guest::boot(&GuestOpts {
        disks_ro: vec![img.clone()],
        ..Default::default()
    })
    .unwrap();
    let (sum, _, code) = g.sh("sha256sum < /dev/vda").unwrap();
    assert_eq!(code, 0);
    let ours = format!("{:x}", Sha256::digest(&pattern));
    assert_eq!(sum.split_whitespace().next(), Some(ours.as_str()));
    let (_, _, code) = g
        .sh("dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync")
        .unwrap();
    assert_ne!(code, 0, "a write to a read-only disk succeeded");
    g.poweroff().unwrap();
    assert_eq!(
        std::fs::read(&img).unwrap(),
        pattern,
        "read-only image changed"
    );
}

#[test]
fn guest_panic_is_a_failure_with_the_console_tail() {
    let mut g = guest();
    let mut agent = g.agent().unwrap();
    // The connection dies with the guest; the exec itself has no answer to give.
    let _ = agent.exec(&req("echo c > /proc/sysrq-trigger"));
    let (status, err) = g.wait().unwrap();
    assert!(
        !status.success(),
        "a panicked guest ended the VMM with success"
    );
    assert!(err.contains("Kernel panic"), "no console tail in: {err}");
}

#[test]
fn guest_sees_2_and_4_vcpus() {
    for n in [2u8, 4] {
        let mut g = Guest::boot(&GuestOpts {
            vcpus: n,
            ..Default::default()
        })
        .unwrap();
        let (out, _, _) = g.sh("nproc").unwrap();
        assert_eq!(out.trim(), n.to_string());
        g.poweroff().unwrap();
    }
}

fn req(script: &str) -> husk_agent::ExecRequest {
    exec_request(&["sh", "-c", script])
}

fn mkfs(img: &std::path::Path, seed: &std::path::Path) {
    std::fs::File::create(img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(seed)
        .arg(img)
        .status()
        .expect("mkfs.ext4 (apt-get install e2fsprogs)");
    assert!(st.success());
}

fn debugfs_cat(img: &std::path::Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img)
        .output()
        .expect("debugfs (apt-get install e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

//! Lookups in the container's root filesystem done on the host, before the guest needs them.
//!
//! The guest reaches the rootfs over virtio-9p, where every path component costs a round trip
//! to the monitor (milliseconds each in a nested, emulated guest): finding `args[0]` on PATH and
//! reading `/etc/passwd` for `HOME` are a large share of a container's set-up inside the guest.
//! The monitor has the same directory at hand, so it does both here and passes the results in
//! the spec it hands the agent. Both are resolved as inside the container (`RESOLVE_IN_ROOT`:
//! absolute symlinks and `..` stay in the rootfs), and only where the spec's own mounts cannot
//! change the answer; otherwise the guest looks things up itself, as before.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use oci_spec::runtime::Spec;

/// runc's PATH when the process's environment has none (the agent uses the same).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Adds to `spec` (the JSON the agent gets) what the host can tell about `rootfs`: `HOME` in
/// the process environment if it has none (runc's rule: the user's home from /etc/passwd, or
/// `/`), and the path `args[0]` resolves to on PATH, as an annotation.
pub fn resolve_into(spec_json: &mut serde_json::Value, spec: &Spec, rootfs: &Path) {
    let Some(process) = spec.process() else {
        return;
    };
    let Ok(root) = File::open(rootfs) else { return };
    let env = process.env().clone().unwrap_or_default();
    let mounts: Vec<&Path> = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| m.destination().as_path())
        .collect();
    if !env.iter().any(|e| e.starts_with("HOME=")) && !covered(&mounts, "/etc/passwd") {
        let home = home_of(&root, process.user().uid()).unwrap_or_else(|| "/".into());
        if let Some(list) = spec_json["process"]["env"].as_array_mut() {
            list.push(format!("HOME={home}").into());
        } else {
            spec_json["process"]["env"] = serde_json::json!([format!("HOME={home}")]);
        }
    }
    // The guest checks the candidates as the container's user; the host, as root, would see
    // more than a non-root user may, so only root's lookups are done here.
    let arg0 = process.args().iter().flatten().next();
    if let Some(arg0) = arg0.filter(|_| process.user().uid() == 0) {
        if let Some(path) = exec_path(&root, arg0, &env, &mounts) {
            let key = husk_agent::proto::EXEC_PATH_ANNOTATION;
            if !spec_json["annotations"].is_object() {
                spec_json["annotations"] = serde_json::json!({});
            }
            spec_json["annotations"][key] = path.into();
        }
    }
}

/// Where `arg0` is found on the process's PATH, like the agent's lookup would find it; `None`
/// when the guest must look itself (a relative PATH entry, a mount over a PATH directory, or
/// nothing found: the guest then reports runc's error).
fn exec_path(root: &File, arg0: &str, env: &[String], mounts: &[&Path]) -> Option<String> {
    if arg0.contains('/') {
        return None;
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':') {
        if !dir.starts_with('/') || covered(mounts, dir) {
            return None;
        }
        let candidate = format!("{}/{arg0}", dir.trim_end_matches('/'));
        if is_executable_file(root, &candidate) {
            return Some(candidate);
        }
    }
    None
}

/// Whether a spec mount could change what the container sees at `path` (a mount on it, on
/// one of its ancestors, or below it).
fn covered(mounts: &[&Path], path: &str) -> bool {
    let path = Path::new(path);
    mounts
        .iter()
        .any(|m| path.starts_with(m) || m.starts_with(path))
}

/// Opens `path` as the container would resolve it inside `root`.
fn open_in_root(root: &File, path: &str, flags: OFlag) -> Option<File> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(root.as_fd(), path, how).ok().map(File::from)
}

fn is_executable_file(root: &File, path: &str) -> bool {
    open_in_root(root, path, OFlag::O_PATH)
        .and_then(|f| f.metadata().ok())
        .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The home directory of `uid` in the rootfs's /etc/passwd.
fn home_of(root: &File, uid: u32) -> Option<String> {
    let mut text = String::new();
    open_in_root(root, "/etc/passwd", OFlag::O_RDONLY)?
        .read_to_string(&mut text)
        .ok()?;
    husk_agent::passwd::home_of(&text, uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in ["bin", "usr/bin", "etc"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("bin/busybox"), "").unwrap();
        std::fs::set_permissions(r.join("bin/busybox"), PermissionsExt::from_mode(0o755)).unwrap();
        symlink("busybox", r.join("bin/true")).unwrap();
        // An absolute link must resolve inside the rootfs, not on the host.
        symlink("/bin/busybox", r.join("usr/bin/env")).unwrap();
        std::fs::write(r.join("usr/bin/data"), "").unwrap();
        std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        dir
    }

    fn spec(args: &[&str], env: &[&str], mounts: &[&str]) -> serde_json::Value {
        let mounts: Vec<_> = mounts
            .iter()
            .map(|d| serde_json::json!({"destination": d, "type": "bind", "source": "/x"}))
            .collect();
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": args, "env": env, "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": mounts,
        })
    }

    fn resolved(json: serde_json::Value, root: &Path) -> serde_json::Value {
        let parsed: Spec = serde_json::from_value(json.clone()).unwrap();
        let mut out = json;
        resolve_into(&mut out, &parsed, root);
        out
    }

    #[test]
    fn finds_args0_on_path_and_home_in_passwd() {
        let dir = rootfs();
        let out = resolved(spec(&["true"], &["PATH=/usr/bin:/bin"], &[]), dir.path());
        let key = husk_agent::proto::EXEC_PATH_ANNOTATION;
        assert_eq!(out["annotations"][key], "/bin/true");
        assert_eq!(out["process"]["env"][1], "HOME=/root");
        let out = resolved(spec(&["env"], &["HOME=/h"], &[]), dir.path());
        assert_eq!(out["annotations"][key], "/usr/bin/env");
        assert_eq!(out["process"]["env"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn leaves_the_guest_to_look_where_the_host_cannot_be_sure() {
        let dir = rootfs();
        let key = husk_agent::proto::EXEC_PATH_ANNOTATION;
        for (args, env, mounts) in [
            (&["data"][..], &["PATH=/usr/bin"][..], &[][..]), // not executable
            (&["missing"], &["PATH=/bin"], &[]),
            (&["./true"], &["PATH=/bin"], &[]),
            (&["true"], &["PATH=bin:/bin"], &[]), // relative entry first
            (&["true"], &["PATH=/usr/local/bin:/bin"], &["/usr/local"]),
        ] {
            let out = resolved(spec(args, env, mounts), dir.path());
            assert!(
                out["annotations"][key].is_null(),
                "{args:?} {env:?} {mounts:?}"
            );
        }
        let out = resolved(spec(&["true"], &[], &["/etc/passwd"]), dir.path());
        assert_eq!(out["process"]["env"].as_array().unwrap().len(), 0);
    }
}

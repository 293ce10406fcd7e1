//! Namespaces: which ones a spec asks for, joining existing ones, what a fresh one needs
//! (loopback up, hostname), and finding the processes that live in a container.

use std::fs::{self, File};
use std::path::Path;

use nix::sched::{setns, CloneFlags};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Spec};

use super::HelperResult;

/// The spec's namespace entries.
pub fn requested(spec: &Spec) -> &[LinuxNamespace] {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or_default()
}

/// Clone flags for the namespaces to create (entries without a path), after rejecting what
/// the agent cannot do.
pub fn clone_flags(spec: &Spec) -> Result<libc::c_int, String> {
    let mut flags = 0;
    for ns in requested(spec) {
        match ns.typ() {
            LinuxNamespaceType::User => return Err("user namespaces are not supported".into()),
            LinuxNamespaceType::Time => return Err("time namespaces are not supported".into()),
            LinuxNamespaceType::Pid if ns.path().is_some() => {
                return Err("joining an existing pid namespace is not supported".into())
            }
            _ if ns.path().is_some() => {}
            t => flags |= t as libc::c_int,
        }
    }
    Ok(flags)
}

/// Clone flags for namespaces given by their OCI names ("pid", "network", "mount", ...).
pub fn flags_of(names: &[String]) -> Result<libc::c_int, String> {
    names.iter().try_fold(0, |flags, name| {
        let typ: LinuxNamespaceType = serde_json::from_value(serde_json::json!(name))
            .map_err(|_| format!("unknown namespace type {name:?}"))?;
        match typ {
            LinuxNamespaceType::User | LinuxNamespaceType::Time => {
                Err(format!("{name} namespaces are not supported"))
            }
            t => Ok(flags | t as libc::c_int),
        }
    })
}

/// Whether the container gets its own namespace of `typ` (created or joined).
pub fn has(spec: &Spec, typ: LinuxNamespaceType) -> bool {
    requested(spec).iter().any(|ns| ns.typ() == typ)
}

/// In the init helper: joins the namespaces the spec names by path.
pub fn join_paths(spec: &Spec) -> HelperResult<()> {
    for ns in requested(spec) {
        if let Some(path) = ns.path() {
            join(path, ns.typ())?;
        }
    }
    Ok(())
}

/// Joins the namespace at `path`.
pub fn join(path: &Path, typ: LinuxNamespaceType) -> HelperResult<()> {
    let file = File::open(path).map_err(|e| format!("open namespace {}: {e}", path.display()))?;
    setns(&file, CloneFlags::from_bits_truncate(typ as libc::c_int))
        .map_err(|e| format!("join {typ} namespace {}: {}", path.display(), e.desc()))
}

/// In the exec helper: joins container `pid`'s namespaces of the given types (the mount
/// namespace last, since it changes what /proc paths refer to).
pub fn join_container(pid: i32, types: &[LinuxNamespaceType]) -> HelperResult<()> {
    let mut files = Vec::new();
    for &typ in types {
        let name = match typ {
            LinuxNamespaceType::Pid | LinuxNamespaceType::User | LinuxNamespaceType::Time => {
                continue
            }
            LinuxNamespaceType::Mount => "mnt",
            LinuxNamespaceType::Network => "net",
            LinuxNamespaceType::Ipc => "ipc",
            LinuxNamespaceType::Uts => "uts",
            LinuxNamespaceType::Cgroup => "cgroup",
        };
        let path = format!("/proc/{pid}/ns/{name}");
        let file = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        files.push((typ, file));
    }
    files.sort_by_key(|(typ, _)| *typ == LinuxNamespaceType::Mount);
    for (typ, file) in files {
        setns(&file, CloneFlags::from_bits_truncate(typ as libc::c_int))
            .map_err(|e| format!("join {typ} namespace of {pid}: {}", e.desc()))?;
    }
    Ok(())
}

/// Sets host and domain name; runc refuses without a private UTS namespace, and so do we.
pub fn set_names(spec: &Spec) -> HelperResult<()> {
    let names = [spec.hostname(), spec.domainname()];
    if names.iter().all(|n| n.as_deref().unwrap_or("").is_empty()) {
        return Ok(());
    }
    if !has(spec, LinuxNamespaceType::Uts) {
        return Err("unable to set hostname without a private UTS namespace".into());
    }
    if let Some(host) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(host).map_err(|e| format!("sethostname: {}", e.desc()))?;
    }
    if let Some(domain) = spec.domainname().as_deref().filter(|d| !d.is_empty()) {
        // SAFETY: the pointer and length describe the live string.
        let rc = unsafe { libc::setdomainname(domain.as_ptr().cast(), domain.len()) };
        if rc != 0 {
            return Err(format!(
                "setdomainname: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Brings `lo` up in a fresh network namespace (the only interface it has).
pub fn loopback_up() -> HelperResult<()> {
    let err = |what: &str| format!("bring up lo: {what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain socket(2); the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(err("socket"));
    }
    // SAFETY: ifreq is plain old data, so all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own; the union field
    // ifru_flags is the one these requests use.
    let result = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(err("get flags"))
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            match libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) {
                0 => Ok(()),
                _ => Err(err("set flags")),
            }
        }
    };
    // SAFETY: `sock` is ours and not used afterwards.
    unsafe { libc::close(sock) };
    result
}

/// Writes the spec's sysctls (`net.ipv4.ip_forward` -> /proc/sys/net/ipv4/ip_forward).
pub fn set_sysctls(spec: &Spec) -> HelperResult<()> {
    let sysctls = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref());
    for (key, value) in sysctls.into_iter().flatten() {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        fs::write(&path, value).map_err(|e| format!("write sysctl {key}={value}: {e}"))?;
    }
    Ok(())
}

/// Pids (as the agent sees them) of the processes in the container whose init is `init`:
/// everything in its pid namespace when it has one, else init and its descendants.
pub fn processes(init: i32, own_pidns: bool) -> Vec<i32> {
    let all = all_pids();
    if own_pidns {
        let Ok(target) = fs::read_link(format!("/proc/{init}/ns/pid")) else {
            return Vec::new();
        };
        return all
            .into_iter()
            .filter(|p| fs::read_link(format!("/proc/{p}/ns/pid")).is_ok_and(|l| l == target))
            .collect();
    }
    let parents: Vec<(i32, i32)> = all.iter().filter_map(|&p| Some((p, ppid(p)?))).collect();
    let mut found = vec![init];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.retain(|p| Path::new(&format!("/proc/{p}")).exists());
    found
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

fn ppid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

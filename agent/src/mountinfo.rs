//! `/proc/self/mountinfo`, as far as the runtime and the agent read it: which mount holds a
//! path, and whether that mount is shared (propagation is copied from it).

use std::path::{Path, PathBuf};

/// The mount point of the mount that holds `path` (the longest mount point above it, the
/// last mounted if several), and whether it is shared, from `/proc/self/mountinfo` text.
pub fn holding_mount(mountinfo: &str, path: &Path) -> Option<(PathBuf, bool)> {
    let mut best: Option<(PathBuf, bool)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(point) = fields.get(4).map(|p| PathBuf::from(unescape_mountinfo(p))) else {
            continue;
        };
        if !path.starts_with(&point) {
            continue;
        }
        let mut optional = fields.iter().skip(6).take_while(|f| **f != "-");
        let shared = optional.any(|f| f.starts_with("shared:"));
        let longer = best
            .as_ref()
            .is_none_or(|(b, _)| point.as_os_str().len() >= b.as_os_str().len());
        if longer {
            best = Some((point, shared));
        }
    }
    best
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_holding_a_path_is_its_longest_mount_point() {
        let info = "\
20 1 0:19 / / rw shared:1 - rootfs rootfs rw
21 20 0:20 / /run rw shared:2 - tmpfs tmpfs rw
30 21 0:30 / /run/husk/rootfs rw master:3 - 9p share0 rw
31 21 0:31 / /run/husk/shares/1 rw shared:4 master:3 - 9p share1 rw
32 21 0:32 / /run/my\\040dir rw shared:9 - tmpfs tmpfs rw
";
        let held = |p: &str| holding_mount(info, Path::new(p));
        assert_eq!(
            held("/run/husk/rootfs"),
            Some(("/run/husk/rootfs".into(), false))
        );
        assert_eq!(
            held("/run/husk/shares/1/x"),
            Some(("/run/husk/shares/1".into(), true))
        );
        assert_eq!(held("/run/husk"), Some(("/run".into(), true)));
        // "/run/husk/shares/10" is not under "/run/husk/shares/1".
        assert_eq!(held("/run/husk/shares/10"), Some(("/run".into(), true)));
        assert_eq!(held("/run/my dir/a"), Some(("/run/my dir".into(), true)));
        assert_eq!(held("/etc"), Some(("/".into(), true)));
    }
}

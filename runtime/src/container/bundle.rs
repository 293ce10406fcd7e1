//! An OCI bundle: `config.json` read and checked the way runc checks it, with runc's messages
//! where clients or people recognise them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::Spec;

use super::capabilities;

pub struct Bundle {
    /// The bundle directory, absolute.
    pub dir: PathBuf,
    /// The parsed spec.
    pub spec: Spec,
    /// `config.json` as written (the guest agent gets it as-is).
    pub raw: serde_json::Value,
    /// The root filesystem, absolute.
    pub rootfs: PathBuf,
    /// Capability names no capability stands for, left out of `spec` and `raw` (runc warns
    /// about them and runs the container without them).
    pub unknown_caps: Vec<String>,
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Bundle> {
        let dir =
            std::path::absolute(dir).with_context(|| format!("bundle path {}", dir.display()))?;
        let config = dir.join("config.json");
        let text = match std::fs::read_to_string(&config) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("JSON specification file config.json not found")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", config.display())),
        };
        let mut raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("config.json: {e}"))?;
        let unknown_caps = raw
            .get_mut("process")
            .map(capabilities::drop_unknown)
            .unwrap_or_default();
        let spec: Spec =
            serde_json::from_value(raw.clone()).map_err(|e| anyhow::anyhow!("config.json: {e}"))?;
        let rootfs = check(&spec, &dir)?;
        Ok(Bundle {
            dir,
            spec,
            raw,
            rootfs,
            unknown_caps,
        })
    }
}

impl Bundle {
    /// The micro-VM size from `linux.resources`: vCPUs from the CPU quota (1 without one),
    /// memory from the memory limit (256 MiB without one, at least 128 MiB).
    pub fn vm_size(&self) -> (u8, u32) {
        let res = &self.raw["linux"]["resources"];
        let limit_mib = res["memory"]["limit"]
            .as_i64()
            .filter(|l| *l > 0)
            .map(|l| l >> 20);
        let memory_mib = limit_mib
            .unwrap_or(crate::template::DEFAULT_MEMORY_MIB.into())
            .clamp(128, 64 << 10) as u32;
        let quota = res["cpu"]["quota"].as_i64().filter(|q| *q > 0);
        let period = res["cpu"]["period"]
            .as_u64()
            .filter(|p| *p > 0)
            .unwrap_or(100_000);
        let vcpus = quota
            .map_or(1, |q| (q as u64).div_ceil(period))
            .clamp(1, 32) as u8;
        (vcpus, memory_mib)
    }
}

/// runc's validation of what a container cannot run without; returns the rootfs path.
fn check(spec: &Spec, dir: &Path) -> Result<PathBuf> {
    let Some(process) = spec.process() else {
        bail!("process property must not be empty");
    };
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        bail!("args must not be empty");
    }
    if !process.cwd().is_absolute() {
        bail!("cwd property must not be empty or relative");
    }
    let Some(root) = spec.root() else {
        bail!("root must be set in config.json");
    };
    let rootfs = dir.join(root.path());
    match std::fs::metadata(&rootfs) {
        Ok(m) if m.is_dir() => Ok(rootfs),
        Ok(_) => bail!("invalid rootfs: {} is not a directory", rootfs.display()),
        Err(e) => bail!(
            "invalid rootfs: stat {}: {}",
            rootfs.display(),
            io_reason(&e)
        ),
    }
}

/// The lower-case reason Go prints, e.g. "no such file or directory".
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    let reason = s.split(" (os error").next().unwrap_or(&s);
    let mut chars = reason.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> (tempfile::TempDir, Result<Bundle>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let b = Bundle::load(dir.path());
        (dir, b)
    }

    const GOOD: &str = r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},
        "args":["sh"],"cwd":"/"},"root":{"path":"rootfs"}}"#;

    fn err(config: &str) -> String {
        format!("{:#}", bundle(config).1.err().expect("accepted"))
    }

    #[test]
    fn a_good_bundle_loads() {
        let (dir, b) = bundle(GOOD);
        let b = b.unwrap();
        assert_eq!(b.rootfs, dir.path().join("rootfs"));
        assert_eq!(b.raw["process"]["args"][0], "sh");
    }

    #[test]
    fn broken_configs_are_named() {
        assert!(err("{bad").starts_with("config.json: "));
        assert_eq!(
            err(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#),
            "process property must not be empty"
        );
        let bad_uid = GOOD.replace(r#""uid":0"#, r#""uid":"abc""#);
        assert!(err(&bad_uid).contains("invalid type"), "{}", err(&bad_uid));
        let no_root = GOOD.replace(r#""root":{"path":"rootfs"}"#, r#""root":{"path":"nope"}"#);
        assert!(err(&no_root).starts_with("invalid rootfs: stat "));
        assert!(err(&no_root).ends_with("nope: no such file or directory"));
    }

    #[test]
    fn unknown_capabilities_are_left_out_and_named() {
        let caps = r#""capabilities":{"bounding":["CAP_KILL","CAP_NEWER"]},"args""#;
        let (_dir, b) = bundle(&GOOD.replace(r#""args""#, caps));
        let b = b.unwrap();
        assert_eq!(b.unknown_caps, ["CAP_NEWER"]);
        assert_eq!(
            b.raw["process"]["capabilities"]["bounding"],
            serde_json::json!(["CAP_KILL"])
        );
        let bounding = b.spec.process().as_ref().unwrap().capabilities().clone();
        assert_eq!(bounding.unwrap().bounding().as_ref().unwrap().len(), 1);
    }

    #[test]
    fn a_missing_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Bundle::load(dir.path()).err().unwrap().to_string();
        assert_eq!(e, "JSON specification file config.json not found");
    }
}

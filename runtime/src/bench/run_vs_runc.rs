//! `husk bench run`: `husk run` of the busybox bundle running `true` against `runc run` of the
//! same bundle, and `podman run --rm` with each runtime, all in one run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use super::setup::{installed_husk, make_bundle};
use super::stats::{ms, Stats};
use super::timing::time;
use super::RunBench;

pub fn run(b: &RunBench) -> Result<()> {
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle");
    make_bundle(&bundle, &["true"])?;
    let husk = installed_husk(work.path())?.husk;
    let husk_root = work.path().join("husk-root");
    let runc_root = work.path().join("runc-root");
    let mut h = Vec::new();
    let mut r = Vec::new();
    for i in 0..b.runs {
        let id = format!("bench-{i}");
        h.push(time(
            Command::new(&husk)
                .arg("--root")
                .arg(&husk_root)
                .args(["run", "--bundle"])
                .arg(&bundle)
                .arg(&id),
        )?);
        r.push(time(
            Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["run", "--bundle"])
                .arg(&bundle)
                .arg(&id),
        )?);
        eprintln!("run {i}: husk {:.1} ms, runc {:.1} ms", ms(h[i]), ms(r[i]));
    }
    let (hs, rs) = (Stats::of(&h), Stats::of(&r));
    println!("husk run:  {hs}");
    println!("runc run:  {rs}");
    if b.podman_runs > 0 {
        podman(&husk, &bundle, b.podman_runs, work.path())?;
    }
    println!("husk/runc run ratio: {:.2}", hs.median / rs.median);
    Ok(())
}

/// `podman run --rm` of the same rootfs, imported as an image, with each runtime.
fn podman(husk: &Path, bundle: &Path, runs: usize, work: &Path) -> Result<()> {
    let conf = work.join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=20000:20000\"]\n\
         [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
    )?;
    let image = "localhost/husk-bench-busybox";
    let import = format!(
        "tar -C {} -c . | podman import - {image} >/dev/null",
        bundle.join("rootfs").display()
    );
    let st = Command::new("sh")
        .args(["-c", &import])
        .env("CONTAINERS_CONF", &conf)
        .status()?;
    if !st.success() {
        bail!("podman import failed");
    }
    let mut results = Vec::new();
    for runtime in [husk.to_path_buf(), PathBuf::from("runc")] {
        let mut t = Vec::new();
        for _ in 0..runs {
            let mut cmd = Command::new("podman");
            cmd.env("CONTAINERS_CONF", &conf)
                .arg("--runtime")
                .arg(&runtime);
            cmd.args(["run", "--rm", "--network", "none", image, "true"]);
            t.push(time(&mut cmd)?);
            eprintln!(
                "podman run --rm with {}: {:.1} ms",
                runtime.display(),
                ms(t[t.len() - 1])
            );
        }
        results.push(Stats::of(&t));
    }
    println!("podman run --rm with husk: {}", results[0]);
    println!("podman run --rm with runc: {}", results[1]);
    Ok(())
}

//! `husk bench run`: `husk run` of the busybox bundle running `true` against `runc run` of the
//! same bundle, and `podman run --rm` with each runtime, all in one run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::Stats;

pub fn run(runs: &usize, podman_runs: &usize) -> Result<()> {
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle");
    make_bundle(&bundle, &["true"])?;
    let husk = crate::bench::installed_husk(work.path())?.husk;
    let husk_root = work.path().join("husk-root");
    let runc_root = work.path().join("runc-root");
    let mut h = Vec::new();
    let mut r = Vec::new();
    for i in 0..*runs {
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
        eprintln!(
            "run {i}: husk {:.1} ms, runc {:.1} ms",
            crate::bench::ms(h[i]),
            crate::bench::ms(r[i])
        );
    }
    let (hs, rs) = (Stats::of(&h), Stats::of(&r));
    println!("husk run:  {hs}");
    println!("runc run:  {rs}");
    if *podman_runs > 0 {
        podman(&husk, &bundle, *podman_runs, work.path())?;
    }
    println!("husk/runc run ratio: {:.2}", hs.median / rs.median);
    Ok(())
}

/// The busybox bundle (examples/busybox/bundle.sh) in `dir`, its process running `args`.
pub(crate) fn make_bundle(dir: &Path, args: &[&str]) -> Result<()> {
    let script = repo_file("examples/busybox/bundle.sh")?;
    let st = Command::new(script)
        .arg(dir)
        .args(args)
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("examples/busybox/bundle.sh failed");
    }
    Ok(())
}

/// A file of the checkout this binary was built from.
fn repo_file(rel: &str) -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let p = root.join(rel);
    if !p.exists() {
        bail!("{} not found (run from a Husk checkout)", p.display());
    }
    Ok(p)
}

/// How long one measured command may take before the benchmark gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Times one command to its exit. Output goes to files, not pipes: a container's monitor
/// inherits them, and waiting for a pipe's EOF would time the monitor instead of the command.
pub(crate) fn time(cmd: &mut Command) -> Result<Duration> {
    Ok(run_to_files(cmd)?.0)
}

/// Runs one command to its exit within [`COMMAND_TIMEOUT`]: how long it took and its stdout.
/// A failure or timeout names the command and carries its stderr.
pub(crate) fn run_to_files(cmd: &mut Command) -> Result<(Duration, String)> {
    run_with_stderr(cmd, tempfile::tempfile()?)
}

/// [`run_to_files`] with stderr going to `err` (which outlives the command: a husk monitor
/// forked by `create` keeps writing there after create has exited).
pub(crate) fn run_with_stderr(cmd: &mut Command, err: std::fs::File) -> Result<(Duration, String)> {
    let out = tempfile::tempfile()?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{cmd:?} did not finish within {COMMAND_TIMEOUT:?}: {}",
                read_all(err)?.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let took = start.elapsed();
    if !status.success() {
        bail!("{cmd:?} failed ({status}): {}", read_all(err)?.trim());
    }
    Ok((took, read_all(out)?))
}

fn read_all(mut file: std::fs::File) -> Result<String> {
    use std::io::{Read, Seek};
    let mut bytes = Vec::new();
    file.rewind()?;
    file.read_to_end(&mut bytes)
        .context("reading back the command's stderr")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
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
                crate::bench::ms(t[t.len() - 1])
            );
        }
        results.push(Stats::of(&t));
    }
    println!("podman run --rm with husk: {}", results[0]);
    println!("podman run --rm with runc: {}", results[1]);
    Ok(())
}

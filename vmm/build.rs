//! Builds the bare-metal test guests in `test-guests/` for the VMM's own tests, only with the
//! `test-guest` feature (production builds compile no guest).
//!
//! Each guest is one `#![no_std]` Rust file compiled by the `rustc` cargo runs us with (no
//! nested cargo, no extra target: the host target's precompiled `core` is all a guest needs),
//! linked statically by `test-guests/guest.ld`, and flattened here from its ELF program headers
//! into a raw image. The tests embed it with
//! `include!(concat!(env!("OUT_DIR"), "/<guest>.rs"))`, which defines `IMAGE`, `LOAD_ADDR` and
//! `ENTRY`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Guests to build: source file stem in `test-guests/`.
const GUESTS: &[&str] = &["vsock_echo"];
const LINKER_SCRIPT: &str = "test-guests/guest.ld";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_TEST_GUEST").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed={LINKER_SCRIPT}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    for guest in GUESTS {
        let src = format!("test-guests/{guest}.rs");
        println!("cargo:rerun-if-changed={src}");
        if let Err(e) = build_guest(guest, &manifest_dir.join(&src), &manifest_dir, &out_dir) {
            // A build script error stops the build with this text in cargo's output.
            panic!("building test guest {src} failed: {e}");
        }
    }
}

fn build_guest(name: &str, src: &Path, manifest_dir: &Path, out_dir: &Path) -> Result<(), String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let elf = out_dir.join(format!("{name}.elf"));
    let script = manifest_dir.join(LINKER_SCRIPT);
    let mut cmd = Command::new(&rustc);
    cmd.arg("--edition=2021")
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args(["--crate-type", "bin", "--crate-name", name])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=s",
            "-C",
            "debuginfo=0",
        ])
        // Absolute addresses that fit in 32 bits: the image lives at 1 MiB, identity-mapped.
        .args(["-C", "relocation-model=static", "-C", "code-model=small"])
        // No SSE: on a PVM host KVM emulates every guest instruction and its emulator has no SSE
        // arithmetic, yet LLVM zeroes and copies structs with `xorps`/`movups`. rustc warns that
        // turning sse2 off on this target is being phased out (rust-lang/rust#116344); the
        // guests use no floating point, so the ABI concern behind that warning does not apply.
        // (The precompiled `core` keeps SSE in its formatting code, which the guests' panic
        // handler never calls.)
        .args(["-C", "target-feature=-sse,-sse2"])
        .args(["-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-o")
        .arg(&elf)
        .arg(src)
        // Cargo's flags for the host crate (coverage, sanitizers, ...) are not for the guest.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&rustc).display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} exited with {}:\n{}",
            Path::new(&rustc).display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let bytes = std::fs::read(&elf).map_err(|e| format!("cannot read {}: {e}", elf.display()))?;
    let flat = flatten(&bytes).map_err(|e| format!("{}: {e}", elf.display()))?;
    let bin = out_dir.join(format!("{name}.bin"));
    std::fs::write(&bin, &flat.image)
        .map_err(|e| format!("cannot write {}: {e}", bin.display()))?;
    let consts = format!(
        "/// The flat image of test guest `{name}`.\n\
         pub static IMAGE: &[u8] = include_bytes!({bin:?});\n\
         /// Where `IMAGE` must be loaded.\n\
         pub const LOAD_ADDR: u64 = {load:#x};\n\
         /// The guest's first instruction.\n\
         pub const ENTRY: u64 = {entry:#x};\n",
        bin = bin.display().to_string(),
        load = flat.load_addr,
        entry = flat.entry,
    );
    let rs = out_dir.join(format!("{name}.rs"));
    std::fs::write(&rs, consts).map_err(|e| format!("cannot write {}: {e}", rs.display()))
}

/// A raw image: the loadable bytes of an ELF from its lowest to its highest file-backed address.
struct Flat {
    image: Vec<u8>,
    load_addr: u64,
    entry: u64,
}

/// Lays out the PT_LOAD segments of a static x86-64 ELF at their physical addresses. Bytes
/// without file contents (.bss, gaps) are zero, or absent at the end: fresh guest RAM is zero.
fn flatten(elf: &[u8]) -> Result<Flat, String> {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    // ELF64, little endian, x86-64.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") || u16_at(18) != Some(62) {
        return Err("not a little-endian x86-64 ELF64 file".into());
    }
    let bad = || "truncated ELF headers".to_string();
    let entry = u64_at(24).ok_or_else(bad)?;
    let phoff = u64_at(32).ok_or_else(bad)? as usize;
    let phentsize = usize::from(u16_at(54).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(56).ok_or_else(bad)?);
    // (paddr, file offset, file size) of every PT_LOAD with contents.
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or_else(bad)? != 1 {
            continue;
        }
        let offset = u64_at(ph + 8).ok_or_else(bad)? as usize;
        let paddr = u64_at(ph + 24).ok_or_else(bad)?;
        let filesz = u64_at(ph + 32).ok_or_else(bad)? as usize;
        if filesz > 0 {
            segments.push((paddr, offset, filesz));
        }
    }
    let load_addr = segments
        .iter()
        .map(|s| s.0)
        .min()
        .ok_or("no loadable segments")?;
    let end = segments
        .iter()
        .map(|s| s.0 + s.2 as u64)
        .max()
        .unwrap_or(load_addr);
    let mut image = vec![0u8; (end - load_addr) as usize];
    for (paddr, offset, filesz) in segments {
        let data = elf
            .get(offset..offset + filesz)
            .ok_or("segment beyond end of file")?;
        let at = (paddr - load_addr) as usize;
        image[at..at + filesz].copy_from_slice(data);
    }
    if !(load_addr..end).contains(&entry) {
        return Err(format!("entry {entry:#x} outside the image"));
    }
    Ok(Flat {
        image,
        load_addr,
        entry,
    })
}

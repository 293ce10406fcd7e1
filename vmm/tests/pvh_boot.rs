//! The Linux (PVH) boot path with a fake "kernel": a tiny ELF whose PVH note points at
//! 32-bit code that checks the start info and echoes the command line and the initramfs.
//! Also the bad inputs of a Linux boot, each a one-line error that leaves no file behind.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use husk_vmm::{BlockConfig, Boot, SerialOutput, Vm, VmConfig, VmExit, VsockConfig};

const CODE_ADDR: u64 = 0x10_0000;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM on the host"
    );
}

/// 32-bit guest: checks the PVH magic at [ebx], prints "PVH:<cmdline>|<nr_modules><first
/// initramfs byte>", then the 4 bytes read at each of `mmio` and resets; prints "BAD" if the
/// magic is wrong.
fn guest_code_reading(mmio: &[u32]) -> Vec<u8> {
    let mut good = vec![];
    for c in b"PVH:" {
        good.extend([0xb0, *c, 0xee]);
    }
    good.extend([0x8b, 0x73, 0x18]); // mov esi, [ebx+24] (cmdline_paddr)
    good.extend([0x8a, 0x06, 0x84, 0xc0, 0x74, 0x04]); // loop: mov al,[esi]; test al,al; jz +4
    good.extend([0xee, 0x46, 0xeb, 0xf6]); // out dx,al; inc esi; jmp loop
    good.extend([0xb0, b'|', 0xee]);
    good.extend([0x8b, 0x43, 0x0c, 0x04, b'0', 0xee]); // mov eax,[ebx+12]; add al,'0'; out
    good.extend([0x83, 0x7b, 0x0c, 0x00, 0x74, 0x08]); // cmp dword [ebx+12],0; je +8
                                                       // mov edi,[ebx+16] (modlist_paddr); mov edi,[edi] (module paddr); mov al,[edi]; out dx,al
    good.extend([0x8b, 0x7b, 0x10, 0x8b, 0x3f, 0x8a, 0x07, 0xee]);
    for addr in mmio {
        good.push(0xa1); // mov eax, [addr]
        good.extend(addr.to_le_bytes());
        good.extend([0xee, 0xc1, 0xe8, 0x08].repeat(4)); // 4x: out dx, al; shr eax, 8
    }
    good.extend([0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]); // reset; jmp $
    let mut bad = vec![];
    for c in b"BAD" {
        bad.extend([0xb0, *c, 0xee]);
    }
    bad.extend([0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.extend([0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33]); // cmp dword [ebx], 0x336ec578
    code.extend([0x75, good.len() as u8]); // jne bad
    code.extend(good);
    code.extend(bad);
    code
}

fn guest_code() -> Vec<u8> {
    guest_code_reading(&[])
}

/// A minimal ELF64 "vmlinux": one PT_LOAD with `code` at `CODE_ADDR`, one PT_NOTE with the
/// Xen PVH entry note (pass `with_note = false` to leave it out).
fn fake_vmlinux(code: &[u8], with_note: bool) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let phnum: u16 = if with_note { 2 } else { 1 };
    let note_off = EHDR + PHDR * u64::from(phnum);
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // namesz
    note.extend(4u32.to_le_bytes()); // descsz
    note.extend(XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend(*b"Xen\0");
    note.extend((CODE_ADDR as u32).to_le_bytes());
    let code_off = note_off + if with_note { note.len() as u64 } else { 0 };
    let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(62u16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend(CODE_ADDR.to_le_bytes()); // e_entry
    elf.extend(EHDR.to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes()); // e_flags
    elf.extend([64, 0, 56, 0]); // e_ehsize, e_phentsize
    elf.extend(phnum.to_le_bytes());
    elf.extend([0u8; 6]); // e_shentsize, e_shnum, e_shstrndx
    let phdr = |elf: &mut Vec<u8>, kind: u32, off: u64, addr: u64, size: u64| {
        elf.extend(kind.to_le_bytes());
        elf.extend(5u32.to_le_bytes()); // R+X
        for v in [off, addr, addr, size, size, 0x1000] {
            elf.extend(v.to_le_bytes());
        }
    };
    phdr(&mut elf, 1, code_off, CODE_ADDR, code.len() as u64);
    if with_note {
        phdr(&mut elf, 4, note_off, 0, note.len() as u64);
        elf.extend(&note);
    }
    elf.extend(code);
    elf
}

/// A per-test scratch directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-pvh-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn linux_config(dir: &Path, kernel: &[u8], initramfs: Option<&[u8]>) -> VmConfig {
    let kpath = dir.join("vmlinux");
    std::fs::write(&kpath, kernel).unwrap();
    let ipath = initramfs.map(|data| {
        let p = dir.join("initramfs");
        std::fs::write(&p, data).unwrap();
        p
    });
    let mut cfg = VmConfig::new(Boot::Linux {
        kernel: kpath,
        initramfs: ipath,
        cmdline: "init=/husk-init".into(),
    });
    cfg.serial = SerialOutput::File(dir.join("console.log"));
    cfg
}

#[test]
fn pvh_entry_gets_start_info_cmdline_and_initramfs() {
    require_kvm();
    let dir = scratch("boot");
    let mut cfg = linux_config(
        &dir,
        &fake_vmlinux(&guest_code(), true),
        Some(b"Zinitramfs"),
    );
    let out = Arc::new(Mutex::new(Vec::new()));
    cfg.serial = SerialOutput::Capture(out.clone());
    cfg.vcpus = 2; // the AP waits for INIT/SIPI and must still be stopped
    assert_eq!(Vm::new(cfg).unwrap().run().unwrap(), VmExit::Reset);
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let expected = format!(
        "PVH:{} init=/husk-init|1Z",
        husk_vmm::config::DEFAULT_CMDLINE
    );
    assert_eq!(text, expected);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Builds `cfg`, expects a one-line error containing `needle`, and checks the console file
/// was not left behind.
fn expect_clean_failure(dir: PathBuf, cfg: VmConfig, needle: &str) {
    let msg = match Vm::new(cfg) {
        Ok(_) => panic!("VM built from a bad configuration"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    assert!(!msg.contains('\n'), "multi-line error: {msg}");
    assert!(!dir.join("console.log").exists(), "console.log left behind");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_kernel_is_rejected() {
    let dir = scratch("nokernel");
    let mut cfg = linux_config(&dir, b"", None);
    if let Boot::Linux { kernel, .. } = &mut cfg.boot {
        *kernel = dir.join("missing-vmlinux");
    }
    expect_clean_failure(dir.clone(), cfg, "cannot read kernel");
}

#[test]
fn corrupt_kernel_is_rejected() {
    require_kvm();
    let dir = scratch("corrupt");
    let cfg = linux_config(
        &dir,
        b"this is not an ELF file at all, not even close......................",
        None,
    );
    expect_clean_failure(dir, cfg, "is not a loadable vmlinux ELF");
}

#[test]
fn truncated_kernel_is_rejected() {
    require_kvm();
    let dir = scratch("truncated");
    let mut image = fake_vmlinux(&guest_code(), true);
    image.truncate(image.len() - 10);
    let cfg = linux_config(&dir, &image, None);
    expect_clean_failure(dir, cfg, "is not a loadable vmlinux ELF");
}

#[test]
fn kernel_without_pvh_note_is_rejected() {
    require_kvm();
    let dir = scratch("nonote");
    let cfg = linux_config(&dir, &fake_vmlinux(&guest_code(), false), None);
    expect_clean_failure(dir, cfg, "no PVH entry note");
}

#[test]
fn memory_too_small_for_initramfs_is_rejected() {
    require_kvm();
    let dir = scratch("bigrd");
    let mut cfg = linux_config(&dir, &fake_vmlinux(&guest_code(), true), Some(b"x"));
    if let Boot::Linux {
        initramfs: Some(p), ..
    } = &cfg.boot
    {
        std::fs::File::create(p).unwrap().set_len(80 << 20).unwrap();
    }
    cfg.memory_mib = 64;
    expect_clean_failure(dir, cfg, "memory too small");
}

#[test]
fn missing_block_device_is_rejected() {
    let dir = scratch("noblock");
    let mut cfg = linux_config(&dir, &fake_vmlinux(&guest_code(), true), None);
    cfg.blocks.push(BlockConfig {
        path: dir.join("no-such-disk.img"),
        read_only: false,
    });
    expect_clean_failure(dir, cfg, "no-such-disk.img");
}

#[test]
fn virtio_devices_are_announced_and_answer_on_their_windows() {
    require_kvm();
    let dir = scratch("virtio");
    let code = guest_code_reading(&[0xd000_0000, 0xd000_0008, 0xd000_1000, 0xd000_1008]);
    let mut cfg = linux_config(&dir, &fake_vmlinux(&code, true), None);
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    cfg.blocks.push(BlockConfig {
        path: disk,
        read_only: true,
    });
    let sock = dir.join("vsock.sock");
    cfg.vsock = Some(VsockConfig {
        guest_cid: 7,
        uds_path: sock.clone(),
    });
    let out = Arc::new(Mutex::new(Vec::new()));
    cfg.serial = SerialOutput::Capture(out.clone());
    let vm = Vm::new(cfg).unwrap();
    assert!(sock.exists(), "vsock socket not bound");
    assert!(vm.vsock_control().is_some());
    assert_eq!(vm.run().unwrap(), VmExit::Reset);
    assert!(!sock.exists(), "vsock socket left behind");
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let devices = "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6";
    let ids = "virt\x02\0\0\0virt\x13\0\0\0";
    let expected = format!(
        "PVH:{} {devices} init=/husk-init|0{ids}",
        husk_vmm::config::DEFAULT_CMDLINE
    );
    assert_eq!(text, expected);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn failed_build_removes_the_vsock_socket() {
    require_kvm();
    let dir = scratch("vsockfail");
    let mut cfg = linux_config(
        &dir,
        b"not an elf, just some bytes that fill a header.............",
        None,
    );
    let sock = dir.join("vsock.sock");
    cfg.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: sock.clone(),
    });
    expect_clean_failure(dir, cfg, "is not a loadable vmlinux ELF");
    assert!(!sock.exists());
}

#[test]
fn kernel_larger_than_memory_is_rejected() {
    require_kvm();
    let dir = scratch("bigkernel");
    let mut image = fake_vmlinux(&guest_code(), true);
    // First program header's p_memsz (ELF header 64 bytes, p_memsz at +40): 100 MiB of bss.
    image[104..112].copy_from_slice(&(100u64 << 20).to_le_bytes());
    let cfg = linux_config(&dir, &image, None);
    expect_clean_failure(dir, cfg, "memory too small: the kernel needs 101 MiB");
}

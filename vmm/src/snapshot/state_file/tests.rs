use std::path::Path;

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_sregs, kvm_xsave};

use super::*;

fn sample_body() -> SnapshotBody {
    let mut regs = kvm_regs {
        rip: 0x10_0042,
        rax: 7,
        ..Default::default()
    };
    regs.rflags = 2;
    let mut xsave = kvm_xsave::default();
    xsave.region[3] = 0xdead_beef;
    SnapshotBody {
        config: SavedConfig {
            vcpus: 1,
            memory_mib: 64,
            blocks: vec![("/tmp/disk.img".into(), true)],
            shares: vec![("tag".into(), "/srv".into(), false)],
            vsock: Some((3, "/tmp/v.sock".into())),
        },
        memory: vec![RegionLayout {
            guest_addr: 0,
            len: 64 << 20,
            file_offset: 0,
        }],
        irqchip: true,
        vm: KvmVmState {
            irqchips: None,
            pit: None,
            clock: Some(kvm_bindings::kvm_clock_data {
                clock: 123_456,
                ..Default::default()
            }),
        },
        vcpus: vec![VcpuState {
            regs,
            sregs: kvm_sregs::default(),
            fpu: kvm_bindings::kvm_fpu::default(),
            xsave: Some(xsave),
            xcrs: None,
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            lapic: None,
            events: None,
            debugregs: None,
            mp_state: kvm_mp_state { mp_state: 0 },
        }],
        devices: vec![DeviceState {
            id: "pio@0x3f8".into(),
            state: vec![1, 2, 3],
        }],
        skipped: vec!["vCPU 0 xcrs: not supported".into()],
    }
}

const PATH: &str = "/snap/state";

#[test]
fn body_round_trips_through_the_format() {
    let bytes = encode(&sample_body(), 0x1234_5678).unwrap();
    let (header, body) = check(Path::new(PATH), &bytes).unwrap();
    assert_eq!(header.version, FORMAT_VERSION);
    assert_eq!(header.cpu_fingerprint, 0x1234_5678);
    let decoded = decode(Path::new(PATH), body).unwrap();
    assert_eq!(decoded.vcpus[0].regs.rip, 0x10_0042);
    assert_eq!(
        decoded.vcpus[0].xsave.as_ref().unwrap().region[3],
        0xdead_beef
    );
    assert_eq!(decoded.vcpus[0].msrs[0].data, 99);
    assert_eq!(decoded.vm.clock.unwrap().clock, 123_456);
    assert_eq!(decoded.config, sample_body().config);
    assert_eq!(decoded.devices, sample_body().devices);
    assert_eq!(decoded.skipped, sample_body().skipped);
    // Byte for byte: nothing is lost or reordered.
    assert_eq!(encode(&decoded, 0x1234_5678).unwrap(), bytes);
}

#[test]
fn damaged_files_are_refused_with_the_specific_error() {
    let good = encode(&sample_body(), 1).unwrap();
    let path = Path::new(PATH);

    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0x40;
    let e = check(path, &flipped).unwrap_err();
    assert!(matches!(e, VmError::SnapshotChecksum { .. }), "{e}");

    let mut version = good.clone();
    version[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let e = check(path, &version).unwrap_err();
    assert!(
        matches!(e, VmError::SnapshotVersion { found, .. } if found == FORMAT_VERSION + 1),
        "{e}"
    );

    let e = check(path, &good[..good.len() - 1]).unwrap_err();
    assert!(e.to_string().contains("header says"), "{e}");

    let e = check(path, b"NOTASNAPSHOT-AT-ALL-NOT-EVEN-CLOSE").unwrap_err();
    assert!(e.to_string().contains("bad magic"), "{e}");
}

#[test]
fn fingerprint_depends_on_every_feature_bit() {
    use kvm_bindings::{kvm_cpuid_entry2, CpuId};
    let entry = kvm_cpuid_entry2 {
        function: 1,
        ecx: 0x8000_0000,
        ..Default::default()
    };
    let a = CpuId::from_entries(&[entry]).unwrap();
    let mut other = entry;
    other.ecx ^= 1;
    let b = CpuId::from_entries(&[other]).unwrap();
    assert_eq!(cpu_fingerprint(&a), cpu_fingerprint(&a.clone()));
    assert_ne!(cpu_fingerprint(&a), cpu_fingerprint(&b));
    // The host CPU's APIC id is not a feature.
    let mut elsewhere = entry;
    elsewhere.ebx |= 1 << 24;
    let c = CpuId::from_entries(&[elsewhere]).unwrap();
    assert_eq!(cpu_fingerprint(&a), cpu_fingerprint(&c));
}

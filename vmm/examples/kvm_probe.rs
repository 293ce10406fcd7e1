//! Prints which KVM capabilities and VM setup calls work on this host's /dev/kvm.
use kvm_ioctls::{Cap, Kvm};

fn main() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    println!("api version {}", kvm.get_api_version());
    let caps = [
        ("Irqchip", Cap::Irqchip),
        ("Hlt", Cap::Hlt),
        ("UserMemory", Cap::UserMemory),
        ("SetTssAddr", Cap::SetTssAddr),
        ("Pit2", Cap::Pit2),
        ("PitState2", Cap::PitState2),
        ("Irqfd", Cap::Irqfd),
        ("Ioeventfd", Cap::Ioeventfd),
        ("IrqRouting", Cap::IrqRouting),
        ("SplitIrqchip", Cap::SplitIrqchip),
        ("Tsc deadline", Cap::TscDeadlineTimer),
        ("TscControl", Cap::TscControl),
        ("MpState", Cap::MpState),
        ("ImmediateExit", Cap::ImmediateExit),
        ("ExtCpuid", Cap::ExtCpuid),
        ("SetIdentityMapAddr", Cap::SetIdentityMapAddr),
        ("AdjustClock", Cap::AdjustClock),
        ("Xsave", Cap::Xsave),
        ("Xcrs", Cap::Xcrs),
        ("VcpuEvents", Cap::VcpuEvents),
        ("Debugregs", Cap::Debugregs),
        ("CoalescedMmio", Cap::CoalescedMmio),
        ("KvmClockCtrl", Cap::KvmclockCtrl),
        ("X2ApicApi", Cap::X2ApicApi),
        ("SignalMsi", Cap::SignalMsi),
        ("GetMsrFeatures", Cap::GetMsrFeatures),
    ];
    for (n, c) in caps {
        println!("cap {n}: {}", kvm.check_extension(c));
    }
    println!("max vcpus {}", kvm.get_max_vcpus());
    let vm = kvm.create_vm().expect("create vm");
    println!("set_tss_address: {:?}", vm.set_tss_address(0xfffb_d000));
    println!(
        "set_identity_map: {:?}",
        vm.set_identity_map_address(0xfffb_c000)
    );
    println!("create_irq_chip: {:?}", vm.create_irq_chip());
    let pit = kvm_bindings::kvm_pit_config {
        flags: 0,
        ..Default::default()
    };
    println!("create_pit2: {:?}", vm.create_pit2(pit));
    let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    println!("register_irqfd: {:?}", vm.register_irqfd(&efd, 5));
    println!(
        "supported cpuid: {:?}",
        kvm.get_supported_cpuid(80).map(|c| c.as_slice().len())
    );
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    println!("mp_state: {:?}", vcpu.get_mp_state());
    println!("lapic: {:?}", vcpu.get_lapic().map(|_| ()));
    println!(
        "sregs: {:?}",
        vcpu.get_sregs().map(|s| (s.cr0, s.cr4, s.efer, s.cs))
    );
}

//! Errors of the VMM, each rendered as one line.
//!
//! Errors about the guest (triple fault, panic, emulation failure) carry the last console lines
//! as a separate field so that a caller can print them below the one-line message.

use std::path::PathBuf;

/// Everything that can stop a VM from being built or from running to a clean end.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device node does not exist or cannot be opened.
    #[error("cannot open KVM device {path}: {source}")]
    KvmOpen {
        /// The device node that was tried.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What we were doing.
        op: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// The configuration is unusable (a one-line reason).
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel image is missing or unreadable.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The kernel path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The kernel image is not a loadable vmlinux.
    #[error("kernel {path} is not a loadable vmlinux ELF: {reason}")]
    KernelFormat {
        /// The kernel path.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// The initramfs is missing or unreadable.
    #[error("cannot read initramfs {path}: {source}")]
    InitramfsRead {
        /// The initramfs path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A block device backing file is missing or unusable.
    #[error("block device {path}: {reason}")]
    Block {
        /// The backing file.
        path: PathBuf,
        /// Why it is unusable.
        reason: String,
    },
    /// The serial output file cannot be created.
    #[error("cannot open serial output {path}: {source}")]
    SerialOutput {
        /// The output path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A virtio device could not be created or wired.
    #[error("device {name}: {reason}")]
    Device {
        /// Which device.
        name: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A host resource (thread, eventfd, signal handler) could not be set up.
    #[error("host setup failed: {0}")]
    Host(String),
    /// A snapshot file cannot be read or written.
    #[error("snapshot file {path}: {source}")]
    SnapshotIo {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The state file is not a Husk snapshot, or its body does not decode.
    #[error("snapshot {path} is unreadable: {reason}")]
    SnapshotFormat {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The snapshot was written in another format version.
    #[error("snapshot {path} has format version {found}; this VMM reads version {expected}")]
    SnapshotVersion {
        /// The state file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// The state body does not match its checksum (a damaged or edited file).
    #[error(
        "snapshot {path} is corrupt: body checksum {found:#010x}, header says {expected:#010x}"
    )]
    SnapshotChecksum {
        /// The state file.
        path: PathBuf,
        /// The checksum of the body as read.
        found: u32,
        /// The checksum in the header.
        expected: u32,
    },
    /// The snapshot was taken on a host whose KVM offers other CPU features.
    #[error("snapshot {path} was taken on another CPU (feature fingerprint {found:#010x}, this host {host:#010x})")]
    SnapshotCpu {
        /// The state file.
        path: PathBuf,
        /// The fingerprint in the snapshot.
        found: u32,
        /// This host's fingerprint.
        host: u32,
    },
    /// The guest memory file does not have the size the state file describes.
    #[error("snapshot memory file {path} has {found} bytes, expected {expected}")]
    SnapshotMemorySize {
        /// The memory file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The size the state file describes.
        expected: u64,
    },
    /// The snapshot holds state this host's KVM cannot take.
    #[error("snapshot state not accepted by this host's KVM: {0}")]
    SnapshotUnsupported(String),
    /// A device's state could not be saved or restored.
    #[error("snapshot of device {id}: {reason}")]
    SnapshotDevice {
        /// The device (bus and address).
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// The VM is not in a state that can be snapshotted (not running, vCPUs not parked).
    #[error("cannot snapshot the VM: {0}")]
    SnapshotState(String),
    /// A page file cannot be read or written.
    #[error("page file {path}: {source}")]
    PageFileIo {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A page file is damaged, truncated or does not fit the VM.
    #[error("page file {path} is unusable: {reason}")]
    PageFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("guest triple fault (KVM_EXIT_SHUTDOWN) on vCPU {vcpu}; {regs}")]
    TripleFault {
        /// The vCPU that shut down.
        vcpu: u8,
        /// Register summary at the shutdown.
        regs: String,
        /// The last console lines.
        console_tail: String,
    },
    /// The guest kernel panicked (seen on the serial console).
    #[error("guest kernel panic: {first_line}")]
    GuestPanic {
        /// The "Kernel panic - not syncing" line.
        first_line: String,
        /// The last console lines.
        console_tail: String,
    },
    /// KVM could not run the guest (internal error, emulation failure, failed entry).
    #[error("vCPU {vcpu} stopped: {what}; {regs}")]
    GuestFault {
        /// The vCPU that stopped.
        vcpu: u8,
        /// What KVM reported.
        what: String,
        /// Register summary.
        regs: String,
        /// The last console lines.
        console_tail: String,
    },
}

impl VmError {
    /// The last console lines attached to a guest failure, if any.
    pub fn console_tail(&self) -> Option<&str> {
        match self {
            VmError::TripleFault { console_tail, .. }
            | VmError::GuestPanic { console_tail, .. }
            | VmError::GuestFault { console_tail, .. } => Some(console_tail),
            _ => None,
        }
    }

    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |source| VmError::Kvm { op, source }
    }
}

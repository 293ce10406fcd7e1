//! Lazy page-in: a thread serves the guest's first touch of each chunk through userfaultfd.
//!
//! userfaultfd's MISSING mode works on anonymous, shmem and hugetlbfs memory only, not on a
//! `MAP_PRIVATE` mapping of a regular file (a clone's RAM maps the template's memory file). So
//! each region is first replaced, at the same host address, by fresh anonymous memory (KVM's
//! memory slots name host addresses and follow the change through the MMU notifier), and that
//! is registered. A fault, whether from a vCPU (through KVM), a device worker or any other
//! thread, blocks until the pager installs the whole chunk around it with one UFFDIO_COPY: the
//! stored pages of its block after its checksum matched, and its other pages from the base
//! file, or a UFFDIO_ZEROPAGE when the chunk has neither. A block that fails its checksum is
//! never installed: the VM is stopped with that error instead (see `release_stuck` for how
//! the threads blocked on it get out). The thread ends when every
//! chunk is back (closing the userfaultfd unregisters the memory) or when the pager is
//! dropped or finished.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use userfaultfd::{Event, EventBuffer, Uffd, UffdBuilder};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::on_disk::{BLOCK_BYTES, PAGE};
use super::ram::{remap_anonymous, HostRegion};
use super::PageFile;
use crate::error::VmError;
use crate::stop::StopState;

/// What the pager thread is asked to do.
const RUN: u8 = 0;
const STOP: u8 = 1;
const FINISH: u8 = 2;

/// Fault events read per read(2).
const EVENTS_PER_READ: usize = 32;

/// A running lazy page-in.
pub(crate) struct Pager {
    wake: EventFd,
    cmd: Arc<AtomicU8>,
    thread: Option<JoinHandle<Result<(), VmError>>>,
}

impl Pager {
    /// Replaces `regions` with empty anonymous memory, registers it and starts serving it from
    /// `file` (and `base`). A fault that cannot be served stops the VM through `stop`.
    pub(crate) fn start(
        file: PageFile,
        base: Option<File>,
        regions: &[HostRegion],
        stop: Arc<StopState>,
    ) -> Result<Pager, VmError> {
        let host_err = |what: &str, e: &dyn std::fmt::Display| {
            VmError::Host(format!("lazy page-in: {what}: {e}"))
        };
        // Not user-mode only: the vCPUs' faults come from KVM, in the kernel.
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| host_err("creating a userfaultfd", &e))?;
        for r in regions {
            remap_anonymous(r).map_err(|e| host_err("mapping fresh memory", &e))?;
            uffd.register(r.host as *mut libc::c_void, r.len)
                .map_err(|e| host_err("registering guest memory", &e))?;
        }
        let served = Served::new(uffd, file, base, regions);
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| host_err("eventfd", &e))?;
        let cmd = Arc::new(AtomicU8::new(RUN));
        let (thread_wake, thread_cmd) = (
            wake.try_clone().map_err(|e| host_err("eventfd", &e))?,
            cmd.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("husk-pager".into())
            .spawn(move || {
                crate::confine::thread_started(crate::confine::ThreadKind::Pager);
                served.run(&thread_wake, &thread_cmd, &stop)
            })
            .map_err(|e| host_err("spawning the pager thread", &e))?;
        Ok(Pager {
            wake,
            cmd,
            thread: Some(thread),
        })
    }

    /// Installs every chunk not back yet, then ends the pager (the memory is then plain
    /// anonymous memory again).
    pub(crate) fn finish(mut self) -> Result<(), VmError> {
        self.end(FINISH)
    }

    fn end(&mut self, cmd: u8) -> Result<(), VmError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.cmd.store(cmd, Ordering::SeqCst);
        let _ = self.wake.write(1);
        thread
            .join()
            .unwrap_or_else(|_| Err(VmError::Host("the pager thread panicked".into())))
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        if let Err(e) = self.end(STOP) {
            log::debug!("pager: {e}");
        }
    }
}

/// One registered region and which of its chunks are back.
struct Region {
    r: HostRegion,
    base_offset: u64,
    /// Per chunk: index of its block in the page file plus one, or 0.
    blocks: Vec<u32>,
    installed: Vec<bool>,
}

/// The pager thread's state.
struct Served {
    uffd: Uffd,
    file: PageFile,
    base: Option<File>,
    regions: Vec<Region>,
    remaining: usize,
    comp: Vec<u8>,
    raw: Vec<u8>,
    chunk: Vec<u8>,
    /// Set once a fault could not be served: nothing is installed any more.
    failed: Option<String>,
}

impl Served {
    fn new(uffd: Uffd, file: PageFile, base: Option<File>, regions: &[HostRegion]) -> Served {
        let index = file.index();
        let mut out: Vec<Region> = regions
            .iter()
            .zip(&index.regions)
            .map(|(r, saved)| {
                let chunks = r.len.div_ceil(BLOCK_BYTES);
                Region {
                    r: *r,
                    base_offset: saved.base_offset,
                    blocks: vec![0; chunks],
                    installed: vec![false; chunks],
                }
            })
            .collect();
        for (i, b) in index.blocks.iter().enumerate() {
            if let Some(reg) = out.iter_mut().find(|reg| {
                b.guest_addr >= reg.r.guest_addr
                    && b.guest_addr < reg.r.guest_addr + reg.r.len as u64
            }) {
                let c = ((b.guest_addr - reg.r.guest_addr) as usize) / BLOCK_BYTES;
                reg.blocks[c] = i as u32 + 1;
            }
        }
        let remaining = out.iter().map(|r| r.installed.len()).sum();
        Served {
            uffd,
            file,
            base,
            regions: out,
            remaining,
            comp: Vec::new(),
            raw: Vec::new(),
            chunk: vec![0; BLOCK_BYTES],
            failed: None,
        }
    }

    /// The thread: serves faults until every chunk is back or it is told to stop or finish.
    fn run(mut self, wake: &EventFd, cmd: &AtomicU8, stop: &StopState) -> Result<(), VmError> {
        let mut events = EventBuffer::new(EVENTS_PER_READ);
        while self.remaining > 0 {
            match cmd.load(Ordering::SeqCst) {
                RUN => {}
                FINISH => return self.install_all(),
                _ => return Ok(()),
            }
            self.wait(wake)?;
            let faults: Vec<usize> = self
                .uffd
                .read_events(&mut events)
                .map_err(|e| VmError::Host(format!("lazy page-in: reading faults: {e}")))?
                .filter_map(|ev| match ev {
                    Ok(Event::Pagefault { addr, .. }) => Some(addr as usize),
                    _ => None,
                })
                .collect();
            for addr in faults {
                if self.failed.is_some() {
                    self.release_stuck(addr);
                } else if let Err(e) = self.serve(addr) {
                    // Never install what we could not read: the VM stops with the error.
                    log::error!("lazy page-in stopped the VM: {e}");
                    self.failed = Some(e.to_string());
                    stop.request(Err(e));
                    self.release_stuck(addr);
                }
            }
        }
        Ok(())
    }

    /// After a failure, lets a thread stuck on `addr` leave: the VM is already stopping with
    /// the error and is never resumed, but its vCPU threads must get out of their faults to
    /// end, and on a PVM host a vCPU whose fault stays unanswered retries it forever
    /// instead of returning to the VMM on its kick. So the page is mapped as zero, one page
    /// only: a kicked vCPU has its signal pending and leaves KVM_RUN before entering the guest
    /// again, so the guest does not run on it.
    fn release_stuck(&self, addr: usize) {
        let page = addr & !(PAGE - 1);
        // SAFETY: one page of registered guest memory, answered with zeros.
        let r = unsafe { self.uffd.zeropage(page as *mut libc::c_void, PAGE, true) };
        if r.is_err() {
            let _ = self.uffd.wake(page as *mut libc::c_void, PAGE);
        }
    }

    /// Blocks until a fault or a command arrives.
    fn wait(&self, wake: &EventFd) -> Result<(), VmError> {
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(VmError::Host(format!("lazy page-in: poll: {e}")));
            }
        }
        Ok(())
    }

    /// Installs the chunk that holds host address `addr` (or wakes its waiters if it is back).
    fn serve(&mut self, addr: usize) -> Result<(), VmError> {
        let Some(ri) = self
            .regions
            .iter()
            .position(|reg| addr >= reg.r.host && addr < reg.r.host + reg.r.len)
        else {
            return Err(VmError::Host(format!(
                "lazy page-in: fault at {addr:#x} outside guest memory"
            )));
        };
        let c = (addr - self.regions[ri].r.host) / BLOCK_BYTES;
        if self.regions[ri].installed[c] {
            // Another fault in the chunk queued before it was installed.
            let (host, len) = self.chunk_range(ri, c);
            return self
                .uffd
                .wake(host as *mut libc::c_void, len)
                .map_err(|e| VmError::Host(format!("lazy page-in: wake: {e}")));
        }
        self.install(ri, c)
    }

    /// Installs every chunk not back yet (a page-out of a lazily resumed VM needs all of it).
    fn install_all(&mut self) -> Result<(), VmError> {
        if let Some(e) = &self.failed {
            return Err(VmError::Host(format!("lazy page-in had failed: {e}")));
        }
        for ri in 0..self.regions.len() {
            for c in 0..self.regions[ri].installed.len() {
                if !self.regions[ri].installed[c] {
                    self.install(ri, c)?;
                }
            }
        }
        Ok(())
    }

    fn chunk_range(&self, ri: usize, c: usize) -> (usize, usize) {
        let r = &self.regions[ri].r;
        let at = c * BLOCK_BYTES;
        (r.host + at, BLOCK_BYTES.min(r.len - at))
    }

    /// Builds chunk `c` of region `ri` and installs it with one ioctl, waking its waiters.
    fn install(&mut self, ri: usize, c: usize) -> Result<(), VmError> {
        let (host, len) = self.chunk_range(ri, c);
        let block = self.regions[ri].blocks[c];
        let result = if block == 0 && self.base.is_none() {
            // SAFETY: the range is a whole chunk of registered guest memory.
            unsafe { self.uffd.zeropage(host as *mut libc::c_void, len, true) }.map(drop)
        } else {
            self.build_chunk(ri, c, len, block)?;
            self.copy(host, len)
        };
        match result {
            Ok(()) => {}
            // Already there (a racing install cannot happen, but it must not be fatal).
            Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                if e as i32 == libc::EEXIST =>
            {
                let _ = self.uffd.wake(host as *mut libc::c_void, len);
            }
            Err(e) => {
                return Err(VmError::Host(format!(
                    "lazy page-in: installing guest memory at {host:#x}: {e}"
                )))
            }
        }
        self.regions[ri].installed[c] = true;
        self.remaining -= 1;
        Ok(())
    }

    /// Copies `self.chunk[..len]` into place; retries after a partial copy.
    fn copy(&self, host: usize, len: usize) -> Result<(), userfaultfd::Error> {
        let mut done = 0;
        while done < len {
            // SAFETY: source is our buffer of at least `len` bytes, destination the registered
            // chunk; UFFDIO_COPY copies (it does not keep either pointer).
            let r = unsafe {
                self.uffd.copy(
                    self.chunk[done..].as_ptr().cast(),
                    (host + done) as *mut libc::c_void,
                    len - done,
                    true,
                )
            };
            match r {
                Ok(n) => done += n,
                Err(userfaultfd::Error::PartiallyCopied(n)) => done += n,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Fills `self.chunk[..len]` with chunk `c` of region `ri`: the base's (or zero) pages
    /// overlaid with the block's, checked first.
    fn build_chunk(&mut self, ri: usize, c: usize, len: usize, block: u32) -> Result<(), VmError> {
        let at = (c * BLOCK_BYTES) as u64;
        let chunk = &mut self.chunk[..len];
        match &self.base {
            Some(base) => base
                .read_exact_at(chunk, self.regions[ri].base_offset + at)
                .map_err(|source| VmError::PageFileIo {
                    path: "the page file's base".into(),
                    source,
                })?,
            None => chunk.fill(0),
        }
        if block == 0 {
            return Ok(());
        }
        let b = self.file.index().blocks[block as usize - 1];
        self.file.read_block(&b, &mut self.comp, &mut self.raw)?;
        let mut pages = self.raw.chunks_exact(PAGE);
        for i in 0..len / PAGE {
            if b.pages & (1 << i) != 0 {
                if let Some(page) = pages.next() {
                    chunk[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
                }
            }
        }
        Ok(())
    }
}

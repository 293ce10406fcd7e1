//! The monitor's side of the control socket: a thread that answers `start`, `kill`, `pause`,
//! `resume`, `ps` and `checkpoint` by acting on the VM and the guest agent.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use husk_agent::client::{Client, ClientError};
use husk_templates::Template;
use husk_vmm::confine::ThreadKind;

use super::agent_at;
use super::control::{self, Reply, Request};
use super::paging::PausePaging;
use crate::checkpoint_image::{self, ImageManifest};
use crate::container::state::{ContainerState, StateRoot, Status};

/// How long a control request waits for the guest agent (starting the process is the
/// slowest request, quick even on a slow, nested host; this only catches a wedged guest).
const CONTROL_AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the control server needs to act on the container.
pub(super) struct Control {
    pub(super) uds: PathBuf,
    pub(super) vm: husk_vmm::VmControl,
    pub(super) state: Arc<Mutex<ContainerState>>,
    pub(super) root: PathBuf,
    pub(super) pager: Arc<PausePaging>,
    /// The template the VM was cloned from (a checkpoint's pages are relative to it).
    pub(super) template: Option<Template>,
    /// Set by a checkpoint that ends the container: the VM stops once the reply is out.
    pub(super) stop_after_reply: AtomicBool,
}

/// Serves `monitor.sock` on a thread: each request gets a fresh agent connection.
pub(super) fn serve_control(dir: &Path, ctx: Control) -> Result<()> {
    let path = dir.join(control::SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            husk_vmm::confine::thread_started(ThreadKind::Control);
            for conn in listener.incoming().flatten() {
                let reply = match control::read_request(&conn) {
                    Ok(req) => ctx.handle(req).unwrap_or_else(|e| Reply::Error {
                        message: format!("{e:#}"),
                    }),
                    Err(e) => Reply::Error {
                        message: format!("bad request: {e:#}"),
                    },
                };
                let _ = control::write_reply(&conn, &reply);
                if ctx.stop_after_reply.swap(false, Ordering::SeqCst) {
                    ctx.vm.stop();
                }
            }
        })?;
    Ok(())
}

impl Control {
    fn handle(&self, req: Request) -> Result<Reply> {
        let id = self.state.lock().unwrap().guest_id().to_string();
        match req {
            Request::Start => {
                self.ask(|a| a.start_container(&id))?;
                self.set(Status::Running)?;
            }
            Request::Kill { signal, all } => self.ask(|a| a.signal_container(&id, signal, all))?,
            // Pausing freezes the whole VM: no guest code runs until resume.
            // `paused` may page the memory out (see paging.rs). The container is paused
            // either way: a failed page-out leaves its memory in RAM, and says why.
            Request::Pause => {
                self.vm.pause()?;
                self.set(Status::Paused)?;
                if let Err(e) = self.pager.paused() {
                    log::error!("{e:#}");
                    let message = format!("paused, but its memory stays in RAM: {e:#}");
                    return Ok(Reply::Warning { message });
                }
            }
            // A page file that cannot be read back leaves the container paused.
            Request::Resume => {
                self.pager.resuming()?;
                self.vm.resume();
                self.set(Status::Running)?;
            }
            Request::Checkpoint { dir, leave_running } => {
                self.checkpoint(&dir, leave_running)?;
                if !leave_running {
                    self.set(Status::Stopped)?;
                    self.stop_after_reply.store(true, Ordering::SeqCst);
                }
            }
            Request::Ps => {
                return Ok(Reply::Pids {
                    pids: self.ask(|a| a.list_processes(&id))?,
                })
            }
        }
        Ok(Reply::Ok)
    }

    /// Writes the checkpoint image into `dir`: the VM's state and pages, then the manifest.
    /// Without `leave_running` the VM stays paused (the caller stops it); on an error
    /// whatever was written is removed and the container runs on.
    fn checkpoint(&self, dir: &Path, leave_running: bool) -> Result<()> {
        use husk_vmm::snapshot::AfterSnapshot;
        let after = match leave_running {
            true => AfterSnapshot::Resume,
            false => AfterSnapshot::StayPaused,
        };
        let was_paused = self.vm.is_paused();
        let written = self
            .vm
            .checkpoint(dir, self.pager.base(), after)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .and_then(|_| {
                let st = self.state.lock().unwrap().clone();
                let template = self.template.as_ref().map(checkpoint_image::template_ref);
                ImageManifest::new(dir, st.guest_id(), &st.bundle, template.transpose()?)?
                    .write(dir)
            });
        if let Err(e) = written {
            checkpoint_image::remove_image(dir);
            if !was_paused && self.vm.is_paused() {
                self.vm.resume();
            }
            return Err(e.context(format!("checkpointing into {}", dir.display())));
        }
        Ok(())
    }

    /// One request of a CLI command to the agent, on a fresh connection: a guest that stopped
    /// answering becomes an error well within the CLI's own wait ([`control::CALL_TIMEOUT`])
    /// that says where its vCPUs are. What the agent itself reports is passed on as it is.
    fn ask<T>(
        &self,
        request: impl FnOnce(&mut Client<UnixStream>) -> Result<T, ClientError>,
    ) -> Result<T> {
        let mut agent =
            agent_at(&self.uds, CONTROL_AGENT_TIMEOUT).map_err(|e| self.with_vcpu_report(e))?;
        request(&mut agent).map_err(|e| match e {
            ClientError::Io(_) | ClientError::Protocol(_) => self.with_vcpu_report(e.into()),
            other => other.into(),
        })
    }

    fn with_vcpu_report(&self, e: anyhow::Error) -> anyhow::Error {
        match self.vm.vcpu_report() {
            Ok(lines) => anyhow::anyhow!("{e:#} (the guest did not answer; {})", lines.join("; ")),
            Err(r) => anyhow::anyhow!("{e:#} (no vCPU report: {r})"),
        }
    }

    fn set(&self, status: Status) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        st.status = status;
        StateRoot::new(&self.root).save(&st)
    }
}

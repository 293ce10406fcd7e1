//! How the monitor gets its VM and readies the guest: a clone of a template, a restore of a
//! checkpoint image, or a cold boot; then the agent's requests that make a clone unique, mount
//! the shares and create the container.

use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context, Result};
use husk_agent::client::Client;
use husk_agent::proto::{Request as AgentRequest, Response};
use husk_templates::{Lease, Template};
use husk_vmm::ShareConfig;

use super::MonitorArgs;
use crate::agent_vm::{AgentVm, BootOptions, OwnDevices, AGENT_TIMEOUT};
use crate::assets;
use crate::checkpoint_image::{self, ImageManifest};
use crate::container::bundle::Bundle;
use crate::container::guest_plan::{GuestPlan, GUEST_ROOTFS};
use crate::container::trace::Trace;

/// Has the guest agent make a clone unique, mount the shares and create the container, as
/// the VM's origin requires. Returns the opening of a second agent connection, for stdio: it
/// is opened while the guest works, and its failure is the caller's to report.
pub(super) fn prepare_guest(
    vm: &mut AgentVm,
    args: &MonitorArgs,
    plan: &GuestPlan,
    cloned: bool,
    trace: &Trace,
) -> Result<Result<Client<UnixStream>>> {
    let restored = args.restore.is_some();
    let mut agent = match cloned || restored {
        true => vm.clone_agent(AGENT_TIMEOUT),
        false => vm.agent(AGENT_TIMEOUT),
    }
    .context("waiting for the guest agent")?;
    trace.mark("agent answering");
    let (what, requests) = guest_requests(args, plan, cloned)?;
    // A guest that stops answering fails the create instead of hanging it.
    agent.get_ref().set_read_timeout(Some(AGENT_TIMEOUT))?;
    agent
        .send_all(requests)
        .context("talking to the guest agent")?;
    // The stdio connection is opened while the guest works through those requests.
    let attach = vm.agent(AGENT_TIMEOUT);
    check_replies(vm, &mut agent, &what)?;
    trace.mark("guest prepared, container created");
    Ok(attach)
}

/// The requests that prepare the guest, each with what it does (for an error).
fn guest_requests(
    args: &MonitorArgs,
    plan: &GuestPlan,
    cloned: bool,
) -> Result<(Vec<&'static str>, Vec<AgentRequest>)> {
    let restored = args.restore.is_some();
    // A clone is made unique; a restored guest also needs the clock set (it stood still since
    // the checkpoint), but has its shares mounted and its container running already.
    let mut steps = Vec::new();
    if cloned || restored {
        steps.push(("making the clone unique", unique_request()?));
    }
    if !restored {
        steps.push(("mounting the shares in the guest", plan.mount_request()));
        let create = AgentRequest::CreateContainer {
            id: args.id.clone(),
            spec: plan.spec.clone(),
            rootfs: GUEST_ROOTFS.into(),
        };
        steps.push(("", create));
    }
    Ok(steps.into_iter().unzip())
}

pub(super) struct Cloned {
    /// Marks this monitor as a running clone of the template (the template stays meanwhile).
    pub(super) lease: Lease,
    pub(super) template: Template,
}

/// Restores the VM from template `name`, with this container's console, vsock socket and
/// directories in the template's share slots.
pub(super) fn clone_vm(
    name: &str,
    dir: &Path,
    plan: &GuestPlan,
) -> Result<(AgentVm, Option<Cloned>)> {
    let (template, lease) = open_template(name)?;
    let opts = own_devices(dir, template_shares(&template, plan));
    let vm = AgentVm::restore(&template.snapshot_dir(), opts)
        .with_context(|| format!("cloning template {name}"))?;
    Ok((vm, Some(Cloned { lease, template })))
}

/// Brings back the checkpoint in `image` with this container's console, vsock socket and
/// (possibly new) bundle's directories; the pages are relative to the template's memory, which
/// must be the one the checkpoint was taken against.
pub(super) fn restore_vm(
    image: &Path,
    manifest: Option<&ImageManifest>,
    dir: &Path,
    plan: &GuestPlan,
) -> Result<(AgentVm, Option<Cloned>)> {
    let manifest = manifest.context("restoring without the checkpoint's manifest")?;
    let (shares, cloned) = match &manifest.template {
        Some(t) => {
            let (template, lease) = open_template(&t.name)?;
            checkpoint_image::check_template(t, &template)?;
            let shares = template_shares(&template, plan);
            (shares, Some(Cloned { lease, template }))
        }
        None => (plan.shares.clone(), None),
    };
    let base = cloned
        .as_ref()
        .map(|c| checkpoint_image::template_memory(&c.template));
    let vm = AgentVm::restore_checkpoint(image, base.as_deref(), own_devices(dir, shares))
        .with_context(|| format!("restoring the checkpoint in {}", image.display()))?;
    Ok((vm, cloned))
}

fn open_template(name: &str) -> Result<(Template, Lease)> {
    let templates = husk_templates::Store::from_env();
    let Some(template) = templates.open(name)? else {
        anyhow::bail!("template {name} does not exist");
    };
    let lease = templates.lease(&template)?;
    Ok((template, lease))
}

/// The container's directories in the template's share slots.
fn template_shares(template: &Template, plan: &GuestPlan) -> Vec<ShareConfig> {
    let slots = usize::from(template.manifest.settings.share_slots);
    plan.slot_shares(slots, &template.placeholder())
}

/// This container's console, vsock socket and share directories for a restored VM.
fn own_devices(dir: &Path, shares: Vec<ShareConfig>) -> OwnDevices {
    OwnDevices {
        serial: husk_vmm::SerialOutput::File(dir.join("console.log")),
        vsock_path: dir.join("vsock.sock"),
        shares,
    }
}

/// Bytes of host randomness a clone's pool is reseeded with.
const CLONE_ENTROPY: usize = 64;

/// `CloneInit`: the host's wall clock and fresh entropy for a clone or a restored guest.
fn unique_request() -> Result<AgentRequest> {
    let mut entropy = [0u8; CLONE_ENTROPY];
    getrandom(&mut entropy)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the host clock is before 1970")?;
    Ok(AgentRequest::CloneInit {
        time_ns: now.as_nanos() as u64,
        entropy: entropy.to_vec(),
    })
}

/// Reads the replies to the requests sent with `send_all`, one per entry of `steps` (what
/// each request does); the first refused step is the error, named by its description (an
/// empty one, the create's, leaves the agent's message alone, as runc's would be).
fn check_replies(
    vm: &AgentVm,
    agent: &mut Client<UnixStream>,
    steps: &[&'static str],
) -> Result<()> {
    // A guest that never answers gets where its vCPUs are added to the error.
    let replies = agent
        .replies(steps.len())
        .context("talking to the guest agent")
        .map_err(|e| match vm.is_running() {
            true => vm.with_vcpu_report(e),
            false => e,
        })?;
    for (what, reply) in steps.iter().zip(replies) {
        match reply {
            Err(e) if what.is_empty() => return Err(anyhow::anyhow!("{e}")),
            Err(e) => return Err(anyhow::Error::new(e).context(*what)),
            Ok(Response::Ok | Response::Created { .. }) => {}
            Ok(other) => bail!("{what}: unexpected reply {other:?} from the guest agent"),
        }
    }
    Ok(())
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into the rest of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).context("getrandom");
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

/// A cold boot sized from `linux.resources` (see `Bundle::vm_size`).
pub(super) fn cold_boot_options(
    bundle: &Bundle,
    dir: &Path,
    plan: &GuestPlan,
) -> Result<BootOptions> {
    let (vcpus, memory_mib) = bundle.vm_size();
    Ok(BootOptions {
        vcpus,
        memory_mib,
        kernel: assets::kernel(None)?,
        initramfs: assets::initramfs(None)?,
        cmdline: String::new(),
        serial: husk_vmm::SerialOutput::File(dir.join("console.log")),
        disks: Vec::new(),
        shares: plan.shares.clone(),
        vsock_path: Some(dir.join("vsock.sock")),
    })
}

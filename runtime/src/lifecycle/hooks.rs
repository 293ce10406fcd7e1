//! The OCI hooks the host runs, and when. Hooks name host programs (podman's, CNI's, a GPU
//! vendor's), so every hook but `startContainer` runs on the host, from the `husk` process
//! doing the operation, in the bundle directory during `create` and in the caller's working
//! directory after it (as runc's, which changes into the bundle for `create` alone):
//!
//! - `prestart`, `createRuntime`, `createContainer`: in `create` (and `restore`, which runs the
//!   first two as runc's does), once the container exists in its guest and before `create`
//!   returns; status `creating`. runc runs `createContainer` in the container's namespaces;
//!   those live in the guest, so here it runs in the host's, as Kata's does.
//! - `startContainer`: in the guest, by the container's init, in its namespaces and root
//!   after `start`, right before the process execs (as runc's init does; see the agent's
//!   container helper): status `created`, pid the init's own (1 with a pid namespace).
//! - `poststart`: in `start`, once the process has exec'd; status `running`. (runc 1.1 runs it
//!   during `create`, against the spec; its later releases moved it to `start`.)
//! - `poststop`: in `delete`, once the container and everything it held are gone; status
//!   `stopped`.
//!
//! The hook's `pid` is the monitor's, the container's pid as Husk reports it.

use anyhow::Result;
use husk_agent::oci_hook::{self, HookContext};
use oci_spec::runtime::{Hook, Hooks};

use crate::container::state::{ContainerState, Status};

/// A lifecycle point whose hooks the host runs.
#[derive(Clone, Copy, Debug)]
pub(super) enum HostHook {
    Prestart,
    CreateRuntime,
    CreateContainer,
    Poststart,
    Poststop,
}

impl HostHook {
    fn name(self) -> &'static str {
        match self {
            HostHook::Prestart => "prestart",
            HostHook::CreateRuntime => "createRuntime",
            HostHook::CreateContainer => "createContainer",
            HostHook::Poststart => "poststart",
            HostHook::Poststop => "poststop",
        }
    }

    #[allow(deprecated)] // prestart: deprecated by the spec, still run by every runtime
    fn of(self, hooks: &Hooks) -> &[Hook] {
        let list = match self {
            HostHook::Prestart => hooks.prestart(),
            HostHook::CreateRuntime => hooks.create_runtime(),
            HostHook::CreateContainer => hooks.create_container(),
            HostHook::Poststart => hooks.poststart(),
            HostHook::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }

    /// Whether its hooks run in the bundle directory (else in the caller's).
    fn in_bundle(self) -> bool {
        self.status() == Status::Creating
    }

    /// The container's status its hooks are told.
    fn status(self) -> Status {
        match self {
            HostHook::Prestart | HostHook::CreateRuntime | HostHook::CreateContainer => {
                Status::Creating
            }
            HostHook::Poststart => Status::Running,
            HostHook::Poststop => Status::Stopped,
        }
    }
}

/// Runs the container's hooks of `point` in order; the first failure is the error.
pub(super) fn run(st: &ContainerState, point: HostHook) -> Result<()> {
    let hooks = st.hooks.as_ref().map(|h| point.of(h)).unwrap_or_default();
    if hooks.is_empty() {
        return Ok(());
    }
    let state = serde_json::to_vec(&st.hook_state(point.status()))?;
    let ctx = HookContext {
        state: &state,
        default_env: None,
        cwd: point.in_bundle().then_some(st.bundle.as_path()),
    };
    oci_hook::run_all(point.name(), hooks, &ctx).map_err(anyhow::Error::msg)
}

/// The hooks of a new container, in the spec's order: `prestart`, `createRuntime` and, unless
/// `restored` (its process already runs), `createContainer`.
pub(super) fn run_create(st: &ContainerState, restored: bool) -> Result<()> {
    run(st, HostHook::Prestart)?;
    run(st, HostHook::CreateRuntime)?;
    if !restored {
        run(st, HostHook::CreateContainer)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(script: &str) -> Hook {
        let mut h = Hook::default();
        h.set_path("/bin/sh".into());
        h.set_args(Some(vec!["sh".into(), "-c".into(), script.into()]));
        h
    }

    #[test]
    fn create_hooks_run_in_order_in_the_bundle_with_the_state() {
        let bundle = tempfile::tempdir().unwrap();
        let log = "read -r s; echo \"$0 $(pwd) $s\" >> log";
        let named = |name: &str| {
            let mut h = hook(log);
            h.set_args(Some(vec![name.into(), "-c".into(), log.into()]));
            Some(vec![h])
        };
        let mut hooks = Hooks::default();
        #[allow(deprecated)]
        hooks.set_prestart(named("prestart"));
        hooks.set_create_runtime(named("createRuntime"));
        hooks.set_create_container(named("createContainer"));
        hooks.set_poststop(Some(vec![hook("exit 1")]));
        let mut st = ContainerState::unknown("c1");
        st.bundle = bundle.path().to_path_buf();
        st.pid = 42;
        st.hooks = Some(hooks);
        run_create(&st, true).unwrap();
        run_create(&st, false).unwrap();
        let dir = bundle.path().display();
        let state = format!(
            r#"{{"ociVersion":"1.0.2-dev","id":"c1","status":"creating","pid":42,"bundle":"{dir}"}}"#
        );
        let expected: String = ["prestart", "createRuntime", "prestart", "createRuntime"]
            .iter()
            .chain(&["createContainer"])
            .map(|n| format!("{n} {dir} {state}\n"))
            .collect();
        let seen = std::fs::read_to_string(bundle.path().join("log")).unwrap();
        assert_eq!(seen, expected);
        let e = run(&st, HostHook::Poststop).unwrap_err().to_string();
        assert!(e.starts_with("error running poststop hook #0: "), "{e}");
    }
}

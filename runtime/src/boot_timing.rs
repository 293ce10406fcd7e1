//! `husk boot`: boot the default guest to a ready agent, report the time, power it off.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::agent_vm::{AgentVm, BootOptions, AGENT_TIMEOUT, POWEROFF_TIMEOUT};

/// Boots `opts`, runs the shell command `exec` in the guest once its agent answers (printing
/// its output), and powers the guest off; `started`: when this process started.
pub fn run(opts: BootOptions, exec: Option<&str>, started: Instant) -> Result<()> {
    let mut vm = AgentVm::start(opts)?;
    if std::env::var_os("HUSK_TRACE").is_some() {
        eprintln!("husk: VM built in {} ms", started.elapsed().as_millis());
    }
    let mut agent = vm.agent(AGENT_TIMEOUT).context("waiting for the agent")?;
    println!("agent ready in {} ms", started.elapsed().as_millis());
    if let Some(script) = exec {
        let req = husk_agent::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.to_string()],
            ..Default::default()
        };
        let mut out = std::io::stdout();
        let mut err = std::io::stderr();
        agent.exec_streaming(&req, &mut out, &mut err)?;
    }
    agent.poweroff().context("asking the agent to power off")?;
    drop(agent);
    vm.wait_timeout(POWEROFF_TIMEOUT)
}

//! What a container is made of, as both the lifecycle and the monitor see it: its bundle, what
//! the guest gets from it, its state directory, the template choice, signal names, and
//! whether its monitor still lives (and, when it is stuck, where).
pub mod bundle;
pub mod capabilities;
pub mod guest_plan;
pub mod rootfs_lookup;
pub mod signal;
pub mod state;
pub mod stuck_process;
pub mod template_choice;
pub mod trace;

/// Field 22 of /proc/PID/stat: tells a live process from a later one that reused its pid.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat_after_comm(&stat)?;
    // A zombie has finished: nobody reaped it yet (its parent may be a busy subreaper), but
    // waiting for it to end would wait forever.
    if rest.starts_with('Z') {
        return None;
    }
    rest.split(' ').nth(19)?.parse().ok()
}

/// The fields of a `/proc/…/stat` line after the command name, from the state (field 3) on.
/// The name (field 2) may hold spaces and parentheses; the fields after it follow the last ')'.
pub fn stat_after_comm(stat: &str) -> Option<&str> {
    stat.get(stat.rfind(')')? + 2..)
}

/// True while the monitor recorded in `state` still runs.
pub fn monitor_alive(state: &state::ContainerState) -> bool {
    state.pid > 0 && process_start_time(state.pid) == Some(state.pid_start_time)
}

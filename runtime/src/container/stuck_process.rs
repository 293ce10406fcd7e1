//! Where a stuck process's threads are, read from /proc: for an error that must say more than
//! "it did not answer" (the kernel function each thread sleeps in and the system call it is in).

use std::fs;

/// One line: each thread's name, state, wait channel and system call number, e.g.
/// `husk-vcpu0 S wchan=kvm_vcpu_block syscall=16; …`; empty when the process is gone.
pub fn thread_states(pid: i32) -> String {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let mut lines: Vec<String> = tasks
        .filter_map(|t| t.ok())
        .map(|t| thread_state(&t.path()))
        .collect();
    lines.sort();
    lines.join("; ")
}

fn thread_state(task: &std::path::Path) -> String {
    let read = |f: &str| fs::read_to_string(task.join(f)).unwrap_or_default();
    let comm = read("comm");
    let stat = read("stat");
    let state = super::stat_after_comm(&stat)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default();
    let wchan = read("wchan");
    // The first field of `syscall` is the number (or "running"); the rest are raw registers.
    let syscall = read("syscall");
    let nr = syscall.split_whitespace().next().unwrap_or("?");
    format!(
        "{} {state} wchan={} syscall={nr}",
        comm.trim(),
        wchan.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_thread_of_a_live_process() {
        let pid = std::process::id() as i32;
        let (started, wait) = std::sync::mpsc::channel();
        // The name is set as the thread starts: wait until it runs.
        let parked = std::thread::Builder::new()
            .name("parked-probe".into())
            .spawn(move || {
                started.send(()).unwrap();
                std::thread::park();
            })
            .unwrap();
        wait.recv().unwrap();
        let report = thread_states(pid);
        assert!(report.contains("parked-probe "), "{report}");
        assert!(report.contains(" wchan="), "{report}");
        parked.thread().unpark();
        parked.join().unwrap();
    }

    #[test]
    fn is_empty_for_a_process_that_is_gone() {
        assert_eq!(thread_states(i32::MAX), "");
    }
}

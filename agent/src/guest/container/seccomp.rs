//! OCI seccomp profiles compiled to BPF in pure Rust with `seccompiler` (no libseccomp, so the
//! static agent needs no C library beyond glibc).
//!
//! A seccompiler filter has one action for all its matches, while a profile gives each rule
//! its own. So a profile becomes a stack of filters, which the kernel runs all of, keeping the
//! most severe verdict:
//! - a *default* filter: any rule's syscall (with its argument conditions) -> allow, anything
//!   else -> the default action (omitted when the default is allow);
//! - one filter per distinct non-allow rule action: its rules -> that action, else allow.
//!
//! A rule's syscall thus gets its own action (the default filter allows it), and a syscall
//! that no rule matches gets the default action.

use std::collections::BTreeMap;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::syscalls;
use super::HelperResult;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Compiles a profile into the programs to install, in order.
pub fn compile(profile: &LinuxSeccomp) -> HelperResult<Vec<BpfProgram>> {
    check_arch(profile)?;
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut all = Rules::new();
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    for rule in profile.syscalls().as_deref().unwrap_or_default() {
        let act = action(rule.action(), rule.errno_ret())?;
        let rules = rule_conditions(rule)?;
        for number in rule_numbers(rule)? {
            add(&mut all, number, &rules);
            if act == SeccompAction::Allow {
                continue;
            }
            match by_action.iter_mut().find(|(a, _)| *a == act) {
                Some((_, r)) => add(r, number, &rules),
                None => {
                    let mut r = Rules::new();
                    add(&mut r, number, &rules);
                    by_action.push((act.clone(), r));
                }
            }
        }
    }
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(build(all, default, SeccompAction::Allow)?);
    }
    for (act, rules) in by_action {
        filters.push(build(rules, SeccompAction::Allow, act)?);
    }
    Ok(filters)
}

/// Installs compiled programs on the calling thread. Unlike `seccompiler::apply_filter` this
/// does not set no_new_privs: that is the spec's call (the caller needs CAP_SYS_ADMIN then).
pub fn install(programs: &[BpfProgram]) -> HelperResult<()> {
    for prog in programs {
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `fprog` points at a live, correctly sized BPF program; the kernel copies it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(format!("seccomp: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn add(rules: &mut Rules, number: i64, conds: &[SeccompRule]) {
    match rules.get_mut(&number) {
        // An empty list is unconditional: it already matches everything.
        Some(existing) if existing.is_empty() => {}
        Some(existing) if conds.is_empty() => existing.clear(),
        Some(existing) => existing.extend(conds.iter().cloned()),
        None => {
            rules.insert(number, conds.to_vec());
        }
    }
}

fn build(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> HelperResult<BpfProgram> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| format!("seccomp: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| format!("seccomp: {e}"))
}

/// Only x86_64 is compiled in; a profile listing only foreign architectures is an error.
fn check_arch(profile: &LinuxSeccomp) -> HelperResult<()> {
    let arches = profile.architectures().as_deref().unwrap_or_default();
    let native = [Arch::ScmpArchX86_64, Arch::ScmpArchNative];
    if arches.is_empty() || arches.iter().any(|a| native.contains(a)) {
        Ok(())
    } else {
        Err(format!(
            "seccomp: no supported architecture in {arches:?} (want SCMP_ARCH_X86_64)"
        ))
    }
}

fn action(act: LinuxSeccompAction, errno: Option<u32>) -> HelperResult<SeccompAction> {
    Ok(match act {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => {
            SeccompAction::Trace(errno.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp: SCMP_ACT_NOTIFY is not supported".into())
        }
    })
}

/// Syscall numbers of a rule. Like runc, names unknown on x86_64 are skipped (profiles list
/// syscalls of newer kernels and other architectures); a name that cannot be a syscall
/// name at all is an error.
fn rule_numbers(rule: &LinuxSyscall) -> HelperResult<Vec<i64>> {
    let mut out = Vec::new();
    for name in rule.names() {
        let plausible = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !plausible {
            return Err(format!("seccomp: invalid syscall name {name:?}"));
        }
        out.extend(syscalls::number(name));
    }
    Ok(out)
}

/// A rule's argument conditions as seccompiler rules (an empty list matches always). As in
/// runc, several conditions on the same argument are alternatives (libseccomp cannot AND
/// them); otherwise they all must hold.
fn rule_conditions(rule: &LinuxSyscall) -> HelperResult<Vec<SeccompRule>> {
    let args = rule.args().as_deref().unwrap_or_default();
    if args.is_empty() {
        return Ok(Vec::new());
    }
    let conds = args
        .iter()
        .map(condition)
        .collect::<HelperResult<Vec<_>>>()?;
    let same_index = args.len() > 1 && args.iter().all(|a| a.index() == args[0].index());
    let rules = if same_index {
        conds
            .into_iter()
            .map(|c| SeccompRule::new(vec![c]))
            .collect()
    } else {
        vec![SeccompRule::new(conds)]
    };
    rules
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("seccomp: {e}"))
}

fn condition(arg: &LinuxSeccompArg) -> HelperResult<SeccompCondition> {
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        // OCI: `value` is the mask, `valueTwo` what the masked argument must equal.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    let index = u8::try_from(arg.index()).map_err(|_| "seccomp: argument index out of range")?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| format!("seccomp: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn deny_list_compiles_to_one_filter() {
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
        }));
        assert_eq!(compile(&p).unwrap().len(), 1);
    }

    #[test]
    fn allow_list_with_args_and_kill() {
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [
                {"names": ["read", "write", "no_such_syscall_yet"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                          {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
                {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38,
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0,
                           "op": "SCMP_CMP_MASKED_EQ"}]}
            ]
        }));
        assert_eq!(compile(&p).unwrap().len(), 3);
    }

    #[test]
    fn bad_names_and_notify_are_errors() {
        let bad = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir!"], "action": "SCMP_ACT_ERRNO"}]
        }));
        assert!(compile(&bad).unwrap_err().contains("invalid syscall name"));
        let notify = profile(serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"}));
        assert!(compile(&notify).is_err());
        let arm = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_AARCH64"]
        }));
        assert!(compile(&arm).is_err());
    }

    #[test]
    fn syscall_table_is_sorted_and_knows_common_names() {
        assert!(syscalls::SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(syscalls::number("read"), Some(0));
        assert_eq!(syscalls::number("mkdirat"), Some(258));
        assert_eq!(syscalls::number("mseal"), Some(462));
        assert_eq!(syscalls::number("nope"), None);
    }
}

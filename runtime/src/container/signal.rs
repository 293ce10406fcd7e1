//! Signal names and numbers as `runc kill` accepts them: `9`, `KILL`, `SIGKILL`.

use std::str::FromStr;

use anyhow::{bail, Result};
use nix::sys::signal::Signal;

pub fn parse(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if Signal::try_from(n).is_ok() || (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal: {s}");
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    match Signal::from_str(&name) {
        Ok(sig) => Ok(sig as i32),
        Err(_) => bail!("invalid signal: {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("9").unwrap(), 9);
        assert_eq!(parse("KILL").unwrap(), 9);
        assert_eq!(parse("sigterm").unwrap(), 15);
        assert_eq!(parse("SIGHUP").unwrap(), 1);
        assert!(parse("NOPE").is_err());
        assert!(parse("0x").is_err());
        assert!(parse("99").is_err());
    }
}

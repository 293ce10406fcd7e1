//! Errors and log lines in runc's formats, because podman, conmon and containerd parse them.
//!
//! runc writes each log entry as logrus does: text (`time="…" level=error msg="…"`) or JSON
//! (`{"level":"error","msg":"…","time":"…"}`). Without `--log` the entry goes to stderr; with
//! `--log FILE` it goes to the file, and a command's failure also goes, bare, to stderr.
//!
//! [`Logger`] is the `husk` command's own; `monitor_log` is the container monitor's backend for
//! the `log` crate, through which the VMM reports what goes wrong in a running VM.

pub mod monitor_log;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// The name `--log-format` takes.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// What the global flags say about logging (`--log`, `--log-format`, `--debug`); `create`
/// hands them on to the container's monitor.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// The log file (absolute, as the monitor may resolve it from elsewhere); `None`: stderr
    /// for the command, the state directory for the monitor.
    pub file: Option<PathBuf>,
    pub format: LogFormat,
    /// Debug (and info) lines too, not only warnings and errors.
    pub debug: bool,
}

/// One log entry, with logrus's level names (`error`, `warning`, `info`, `debug`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub level: String,
    pub msg: String,
    pub time: String,
}

impl Entry {
    /// An entry stamped with the current time (RFC 3339, seconds, UTC, as runc writes it).
    pub fn now(level: &str, msg: &str) -> Entry {
        Entry {
            level: level.to_string(),
            msg: msg.to_string(),
            time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }

    /// The entry as one line of the log in `format`.
    pub fn line(&self, format: LogFormat) -> String {
        match format {
            // Serialized in field order: level, msg, time, as logrus writes them.
            LogFormat::Json => {
                let json = serde_json::to_string(self).unwrap_or_default();
                format!("{json}\n")
            }
            LogFormat::Text => format!(
                "time=\"{}\" level={} msg={}\n",
                self.time,
                self.level,
                serde_json::Value::String(self.msg.clone())
            ),
        }
    }
}

/// The `husk` command's log: its `--log` file, or stderr.
pub struct Logger {
    file: Option<Mutex<File>>,
    format: LogFormat,
    debug: bool,
}

impl Logger {
    pub fn new(log: Option<&Path>, format: LogFormat, debug: bool) -> Result<Logger> {
        let file = match log {
            Some(p) => Some(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening log file {}", p.display()))?,
            )),
            None => None,
        };
        Ok(Logger {
            file,
            format,
            debug,
        })
    }

    /// Reports a command's failure the way runc does.
    pub fn error(&self, msg: &str) {
        let line = Entry::now("error", msg).line(self.format);
        match &self.file {
            Some(_) => {
                self.append(&line);
                eprintln!("{msg}");
            }
            None => eprint!("{line}"),
        }
    }

    /// A warning: to the log file, or to stderr without one (where runc's logrus puts them;
    /// stdout stays the command's output alone).
    pub fn warn(&self, msg: &str) {
        self.entry(&Entry::now("warning", msg));
    }

    /// Writes `entry` as it is (its own level and time) where warnings go.
    pub fn entry(&self, entry: &Entry) {
        let line = entry.line(self.format);
        match &self.file {
            Some(_) => self.append(&line),
            None => eprint!("{line}"),
        }
    }

    /// A debug entry: only with `--debug`, and only to the log (stderr belongs to the caller).
    pub fn debug(&self, msg: &str) {
        if self.debug {
            self.append(&Entry::now("debug", msg).line(self.format));
        }
    }

    fn append(&self, line: &str) {
        if let Some(f) = &self.file {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_have_runcs_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        for format in [LogFormat::Text, LogFormat::Json] {
            Logger::new(Some(&path), format, false)
                .unwrap()
                .error("container \"x\" does not exist");
        }
        let log = std::fs::read_to_string(&path).unwrap();
        let mut lines = log.lines();
        let text = lines.next().unwrap();
        assert!(text.starts_with("time=\""), "{text}");
        assert!(
            text.ends_with(r#"level=error msg="container \"x\" does not exist""#),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(json["level"], "error");
        assert_eq!(json["msg"], "container \"x\" does not exist");
        assert!(json["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn a_json_entry_keeps_logrus_field_order() {
        let e = Entry {
            level: "warning".into(),
            msg: "m".into(),
            time: "t".into(),
        };
        assert_eq!(
            e.line(LogFormat::Json),
            "{\"level\":\"warning\",\"msg\":\"m\",\"time\":\"t\"}\n"
        );
    }

    #[test]
    fn warnings_and_copied_entries_go_to_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let logger = Logger::new(Some(&path), LogFormat::Json, false).unwrap();
        logger.warn("look at the monitor's log");
        let old = Entry {
            level: "error".into(),
            msg: "virtio-9p: worker failed".into(),
            time: "2026-01-01T00:00:00Z".into(),
        };
        logger.entry(&old);
        let log = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Entry> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0].level, "warning");
        assert_eq!(lines[0].msg, "look at the monitor's log");
        assert_eq!(lines[1], old);
    }
}

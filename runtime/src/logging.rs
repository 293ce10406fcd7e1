//! Errors and log lines in runc's formats, because podman, conmon and containerd parse them.
//!
//! runc writes each log entry as logrus does: text (`time="…" level=error msg="…"`) or JSON
//! (`{"level":"error","msg":"…","time":"…"}`). Without `--log` the entry goes to stderr; with
//! `--log FILE` it goes to the file and the bare message to stderr.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

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
        let line = self.format_entry("error", msg);
        match &self.file {
            Some(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
                eprintln!("{msg}");
            }
            None => eprint!("{line}"),
        }
    }

    /// A debug entry: only with `--debug`, and only to the log (stderr belongs to the caller).
    pub fn debug(&self, msg: &str) {
        if !self.debug {
            return;
        }
        if let Some(f) = &self.file {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(self.format_entry("debug", msg).as_bytes());
            }
        }
    }

    fn format_entry(&self, level: &str, msg: &str) -> String {
        let time = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        match self.format {
            LogFormat::Json => {
                let entry = serde_json::json!({ "level": level, "msg": msg, "time": time });
                format!("{entry}\n")
            }
            LogFormat::Text => format!(
                "time=\"{time}\" level={level} msg={}\n",
                serde_json::Value::String(msg.to_string())
            ),
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
}

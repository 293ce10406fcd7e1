//! The container monitor's backend for the `log` crate: what the VMM and the monitor log
//! (warnings and errors; debug and info lines too with `--debug`) in runc's format, appended
//! to the `--log` file `create` was given, or else to [`LOG_FILE`] in the container's state
//! directory. Error lines are also kept in [`ERRORS_FILE`] there, one JSON entry per line,
//! where `state` and `delete` find them whichever file the log is.
//!
//! A hostile guest can make a device log in a loop, so what a monitor writes is bounded:
//! - a line that repeats the one before (same level and message) is only counted; one "last
//!   message repeated N times" line follows when a different line comes, or at exit;
//! - a message is cut at [`MAX_MESSAGE_BYTES`];
//! - the monitor writes at most [`MAX_LOG_BYTES`] to its log, then one "log truncated" line,
//!   and drops every line after it;
//! - [`ERRORS_FILE`] keeps the first [`MAX_KEPT_ERRORS`] error lines.
//!
//! A monitor killed by its seccomp confinement cannot use the logger (its handler may not lock
//! or allocate): the handler writes its own error entry, in the log's format, on the files
//! [`MonitorLog::last_words_logs`] opened beforehand, past both bounds.
//!
//! So however long its guest keeps at it, a monitor adds at most 4 MiB and two lines to its
//! log, and 31 kept errors to the state directory (tmpfs, i.e. host RAM): under 28 KiB each
//! even when every character of a message needs escaping, about 200 bytes for a real one.

use std::cell::Cell;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use log::{Level, LevelFilter, Log, Metadata, Record};

use super::{Entry, LogFormat, LogOptions};

/// The monitor's log in the state directory, when `create` was given no `--log`.
pub const LOG_FILE: &str = "monitor.log";
/// The error lines the monitor logged, in the state directory, for `state` and `delete`.
pub const ERRORS_FILE: &str = "monitor.errors";
/// Bytes a monitor writes to its log at most: thousands of real lines, and small next to the
/// RAM a container's state directory (tmpfs) may hold.
pub const MAX_LOG_BYTES: u64 = 4 << 20;
/// Longest message kept (longer ones are cut): room for a 4096-byte guest path and its text.
pub const MAX_MESSAGE_BYTES: usize = 4608;
/// Error lines kept for `state` and `delete` (the first ones: what went wrong first explains
/// what follows), each at most a message and its level and time.
pub const MAX_KEPT_ERRORS: usize = 30;
/// Error entries [`read_errors`] reads past the kept ones: the one a seccomp kill writes.
const MAX_LAST_WORDS: usize = 1;

thread_local! {
    /// Set while the thread is in [`MonitorLog::log`].
    static LOGGING: Cell<bool> = const { Cell::new(false) };
}

/// The logger of one monitor process.
pub struct MonitorLog {
    level: LevelFilter,
    format: LogFormat,
    sink: Mutex<Sink>,
}

/// Installs the monitor's logger for this process and returns it. Logging never fails the
/// container: a log that cannot be opened drops its lines.
pub fn install(opts: &LogOptions, state_dir: &Path) -> &'static MonitorLog {
    let logger: &'static MonitorLog = Box::leak(Box::new(MonitorLog::open(opts, state_dir)));
    // Fails only if this process already has a logger (then that one keeps the lines).
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
        log_panics();
    }
    logger
}

/// Logs every panic as an error too, before the default hook prints it on stderr: a device
/// worker that panics leaves its guest waiting for an answer, and the monitor's stderr (its
/// caller's, who has gone) may be read by no one.
fn log_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        log::error!("thread {name} panicked: {info}");
        previous(info);
    }));
}

impl MonitorLog {
    /// The `--log` file, or [`LOG_FILE`] in `state_dir` when there is none or it cannot be
    /// opened.
    pub fn open(opts: &LogOptions, state_dir: &Path) -> MonitorLog {
        let given = opts
            .file
            .as_ref()
            .and_then(|p| Some((p.clone(), open_append(p).ok()?)));
        let (path, file) = match given {
            Some((path, f)) => (path, Some(f)),
            None => {
                let own = state_dir.join(LOG_FILE);
                let f = open_append(&own).ok();
                (own, f)
            }
        };
        MonitorLog {
            level: match opts.debug {
                true => LevelFilter::Debug,
                false => LevelFilter::Warn,
            },
            format: opts.format,
            sink: Mutex::new(Sink {
                path,
                file,
                written: 0,
                truncated: false,
                // Opened now: the first error may come from a thread confined to its own
                // files (a vCPU, the pager), which would be killed for opening one.
                errors: open_append(&state_dir.join(ERRORS_FILE)).ok(),
                kept_errors: 0,
                last: None,
                repeats: 0,
            }),
        }
    }

    /// Where the log goes.
    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    /// The files, each with its format, that a dying monitor's last line goes to when it cannot
    /// use the logger (the seccomp handler): the log, and [`ERRORS_FILE`].
    /// Appending, as the logger's own writes do, so that lines are never torn.
    pub fn last_words_logs(&self) -> Vec<(File, LogFormat)> {
        let sink = self.lock();
        let log = sink.file.as_ref().map(|f| (f, self.format));
        let errors = sink.errors.as_ref().map(|f| (f, LogFormat::Json));
        [log, errors]
            .into_iter()
            .flatten()
            .filter_map(|(f, format)| Some((f.try_clone().ok()?, format)))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Sink> {
        // A thread that panicked while logging left nothing half-done that matters here.
        self.sink.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Log for MonitorLog {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        // A panic while this thread holds the sink (its message logged by the panic hook)
        // must not wait for the sink forever.
        if !self.enabled(record.metadata()) || LOGGING.with(|l| l.replace(true)) {
            return;
        }
        let mut msg = Capped(String::new());
        let _ = write!(msg, "{}", record.args());
        self.lock().push(self, record.level(), msg.0);
        LOGGING.with(|l| l.set(false));
    }

    fn flush(&self) {
        self.lock().flush_repeats(self);
    }
}

/// The log file and what has been written to it.
struct Sink {
    path: PathBuf,
    file: Option<File>,
    /// Bytes this monitor wrote to `file`.
    written: u64,
    /// Set once [`MAX_LOG_BYTES`] is reached: nothing more is written.
    truncated: bool,
    /// [`ERRORS_FILE`], opened with the log.
    errors: Option<File>,
    kept_errors: usize,
    /// The last line written, and how often it came again since.
    last: Option<(Level, String)>,
    repeats: u64,
}

impl Sink {
    fn push(&mut self, log: &MonitorLog, level: Level, msg: String) {
        if let Some((l, m)) = &self.last {
            if *l == level && *m == msg {
                self.repeats = self.repeats.saturating_add(1);
                return;
            }
        }
        self.flush_repeats(log);
        self.write(log, level, &msg);
        self.last = Some((level, msg));
    }

    fn flush_repeats(&mut self, log: &MonitorLog) {
        let Some((level, _)) = self.last else {
            return;
        };
        if self.repeats > 0 {
            let note = format!("last message repeated {} times", self.repeats);
            self.repeats = 0;
            self.write(log, level, &note);
        }
    }

    fn write(&mut self, log: &MonitorLog, level: Level, msg: &str) {
        let entry = Entry::now(level_name(level), msg);
        if level == Level::Error {
            self.keep_error(&entry);
        }
        if self.truncated {
            return;
        }
        let mut line = entry.line(log.format);
        if self.written + line.len() as u64 > MAX_LOG_BYTES {
            self.truncated = true;
            let note = format!(
                "log truncated: this monitor wrote {} MiB; its further lines are dropped",
                MAX_LOG_BYTES >> 20
            );
            line = Entry::now("warning", &note).line(log.format);
        }
        if let Some(f) = &mut self.file {
            // One write per line: the file may be shared (O_APPEND) with husk commands.
            if f.write_all(line.as_bytes()).is_ok() {
                self.written += line.len() as u64;
            }
        }
    }

    fn keep_error(&mut self, entry: &Entry) {
        if self.kept_errors >= MAX_KEPT_ERRORS {
            return;
        }
        self.kept_errors += 1;
        if let Some(f) = &mut self.errors {
            let _ = f.write_all(entry.line(LogFormat::Json).as_bytes());
        }
    }
}

/// The error entries the monitor of the container in `state_dir` kept, oldest first, and the
/// one its seccomp kill wrote after them.
pub fn read_errors(state_dir: &Path) -> Vec<Entry> {
    let Ok(f) = File::open(state_dir.join(ERRORS_FILE)) else {
        return Vec::new();
    };
    let entries = MAX_KEPT_ERRORS + MAX_LAST_WORDS;
    // The monitor writes no more (a message escaped at worst to six bytes a character); a
    // file grown past that is read no further.
    let most = (entries * (MAX_MESSAGE_BYTES * 6 + 128)) as u64;
    BufReader::new(f.take(most))
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .take(entries)
        .collect()
}

/// Bytes of a failed monitor's log that `create`'s error carries at most: its last lines.
pub const MAX_REPORTED_BYTES: u64 = 8 << 10;

/// Where a monitor about to start will log, and how long that file is before it does: what
/// it logged can be read back when the create fails, before its state directory (which may
/// hold the log) is removed.
pub struct LogMark {
    path: PathBuf,
    start: u64,
}

impl LogMark {
    /// The log [`MonitorLog::open`] picks for `opts` and `state_dir`, as long as it is now.
    pub fn before_start(opts: &LogOptions, state_dir: &Path) -> LogMark {
        let path = opts
            .file
            .clone()
            .unwrap_or_else(|| state_dir.join(LOG_FILE));
        let start = std::fs::metadata(&path).map_or(0, |m| m.len());
        LogMark { path, start }
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole lines appended since the mark, the last [`MAX_REPORTED_BYTES`] of them;
    /// `None` if there are none.
    pub fn logged_since(&self) -> Option<String> {
        let mut f = File::open(&self.path).ok()?;
        let end = f.metadata().ok()?.len();
        let from = self.start.max(end.saturating_sub(MAX_REPORTED_BYTES));
        f.seek(SeekFrom::Start(from)).ok()?;
        let mut bytes = Vec::new();
        f.take(end.saturating_sub(from))
            .read_to_end(&mut bytes)
            .ok()?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if from > self.start {
            // Cut inside a line: that line's end only would mislead.
            let first_end = text.find('\n').map_or(text.len(), |i| i + 1);
            text.drain(..first_end);
        }
        let text = text.trim_end();
        (!text.is_empty()).then(|| text.to_string())
    }
}

/// logrus's name for a level.
fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "error",
        Level::Warn => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// A message being formatted, cut at [`MAX_MESSAGE_BYTES`] (a character is never split), so
/// that even formatting a huge value costs no more than that.
struct Capped(String);

impl std::fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = MAX_MESSAGE_BYTES.saturating_sub(self.0.len());
        if s.len() <= room {
            self.0.push_str(s);
            return Ok(());
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.0.push_str(&s[..end]);
        // Formatting stops here: the rest would be cut anyway.
        Err(std::fmt::Error)
    }
}

#[cfg(test)]
mod tests;

use super::*;

fn options(file: Option<PathBuf>, format: LogFormat, debug: bool) -> LogOptions {
    LogOptions {
        file,
        format,
        debug,
    }
}

fn log(logger: &MonitorLog, level: Level, msg: &str) {
    logger.log(
        &Record::builder()
            .level(level)
            .args(format_args!("{msg}"))
            .build(),
    );
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn without_log_file_text_lines_go_to_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let logger = MonitorLog::open(&options(None, LogFormat::Text, false), dir.path());
    assert_eq!(logger.path(), dir.path().join(LOG_FILE));
    log(&logger, Level::Error, "virtio-9p: worker failed: \"EIO\"");
    log(&logger, Level::Warn, "virtio-vsock: dropping bad tx packet");
    log(&logger, Level::Info, "not without --debug");
    let text = lines(&dir.path().join(LOG_FILE));
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(text[0].starts_with("time=\""), "{}", text[0]);
    assert!(
        text[0].ends_with(r#" level=error msg="virtio-9p: worker failed: \"EIO\"""#),
        "{}",
        text[0]
    );
    assert!(text[1].contains(" level=warning msg="), "{}", text[1]);
    let kept = read_errors(dir.path());
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].msg, "virtio-9p: worker failed: \"EIO\"");
    assert_eq!(kept[0].level, "error");
}

#[test]
fn a_log_file_gets_json_lines_and_debug_ones_with_debug() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("oci-log");
    let logger = MonitorLog::open(
        &options(Some(file.clone()), LogFormat::Json, true),
        dir.path(),
    );
    assert_eq!(logger.path(), file);
    log(&logger, Level::Debug, "virtio-9p: request type 110 failed");
    log(&logger, Level::Error, "lazy page-in stopped the VM");
    let json: Vec<Entry> = lines(&file)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 2);
    assert_eq!(json[0].level, "debug");
    assert_eq!(json[1].level, "error");
    assert_eq!(json[1].msg, "lazy page-in stopped the VM");
    assert!(json[1].time.ends_with('Z'), "{}", json[1].time);
    assert!(!dir.path().join(LOG_FILE).exists());
    // The kept errors are there whichever file the log is.
    assert_eq!(read_errors(dir.path()), json[1..]);
}

#[test]
fn a_log_file_that_cannot_be_opened_falls_back_to_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("no/such/dir/log");
    let logger = MonitorLog::open(&options(Some(bad), LogFormat::Text, false), dir.path());
    log(&logger, Level::Warn, "still seen");
    assert_eq!(logger.path(), dir.path().join(LOG_FILE));
    assert_eq!(lines(&logger.path()).len(), 1);
}

#[test]
fn a_repeated_line_is_counted_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let logger = MonitorLog::open(&options(None, LogFormat::Text, false), dir.path());
    for _ in 0..1000 {
        log(
            &logger,
            Level::Error,
            "virtio-9p: no room for an error reply",
        );
    }
    log(&logger, Level::Warn, "something else");
    log(&logger, Level::Warn, "something else");
    logger.flush();
    let text = lines(&logger.path());
    assert_eq!(text.len(), 4, "{text:?}");
    assert!(text[0].ends_with("msg=\"virtio-9p: no room for an error reply\""));
    assert!(text[1].ends_with("level=error msg=\"last message repeated 999 times\""));
    assert!(text[2].ends_with("level=warning msg=\"something else\""));
    assert!(text[3].ends_with("level=warning msg=\"last message repeated 1 times\""));
    // Flushing again has nothing more to say.
    logger.flush();
    assert_eq!(lines(&logger.path()).len(), 4);
}

#[test]
fn a_flood_stops_at_the_bound_with_one_truncation_line() {
    let dir = tempfile::tempdir().unwrap();
    let logger = MonitorLog::open(&options(None, LogFormat::Json, false), dir.path());
    let mut sent = 0u64;
    let mut i = 0u64;
    // Distinct lines, so that only the size bound stops them.
    while sent < 2 * MAX_LOG_BYTES {
        let msg = format!(
            "virtio-vsock: dropping bad tx packet {i}: {}",
            "x".repeat(200)
        );
        sent += msg.len() as u64;
        log(&logger, Level::Error, &msg);
        i += 1;
    }
    let size = std::fs::metadata(logger.path()).unwrap().len();
    assert!(size <= MAX_LOG_BYTES + 512, "{size} bytes");
    assert!(size > MAX_LOG_BYTES - 512, "{size} bytes");
    let text = lines(&logger.path());
    let truncated: Vec<&String> = text.iter().filter(|l| l.contains("truncated")).collect();
    assert_eq!(truncated.len(), 1);
    assert_eq!(text.last(), Some(truncated[0]));
    let last: Entry = serde_json::from_str(truncated[0]).unwrap();
    assert_eq!(last.level, "warning");
    let kept = read_errors(dir.path());
    assert_eq!(kept.len(), MAX_KEPT_ERRORS);
    assert!(kept[0]
        .msg
        .starts_with("virtio-vsock: dropping bad tx packet 0:"));
}

#[test]
fn a_long_message_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let logger = MonitorLog::open(&options(None, LogFormat::Json, false), dir.path());
    // Multi-byte characters: the cut must not split one.
    log(&logger, Level::Warn, &"é".repeat(MAX_MESSAGE_BYTES));
    let e: Entry = serde_json::from_str(&lines(&logger.path())[0]).unwrap();
    assert!(e.msg.len() <= MAX_MESSAGE_BYTES && e.msg.len() > MAX_MESSAGE_BYTES - 4);
}

#[test]
fn a_mark_reads_back_only_what_was_logged_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shared.log");
    std::fs::write(&file, "an earlier command's line\n").unwrap();
    let opts = options(Some(file.clone()), LogFormat::Text, false);
    let mark = LogMark::before_start(&opts, dir.path());
    assert_eq!(mark.path(), file);
    assert_eq!(mark.logged_since(), None);
    let logger = MonitorLog::open(&opts, dir.path());
    log(&logger, Level::Warn, "virtio-9p: cannot reopen fid 3");
    log(&logger, Level::Error, "restore failed");
    let logged = mark.logged_since().unwrap();
    assert_eq!(logged.lines().count(), 2, "{logged}");
    assert!(logged.contains("cannot reopen fid 3") && logged.contains("restore failed"));
    assert!(!logged.contains("earlier"));
    let own = LogMark::before_start(&options(None, LogFormat::Text, false), dir.path());
    assert_eq!(own.path(), dir.path().join(LOG_FILE));
}

#[test]
fn a_mark_reads_back_whole_lines_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(None, LogFormat::Text, false);
    let mark = LogMark::before_start(&opts, dir.path());
    let logger = MonitorLog::open(&opts, dir.path());
    for i in 0..1000 {
        log(&logger, Level::Warn, &format!("line {i}"));
    }
    let logged = mark.logged_since().unwrap();
    assert!(
        logged.len() as u64 <= MAX_REPORTED_BYTES,
        "{}",
        logged.len()
    );
    assert!(logged.lines().all(|l| l.starts_with("time=\"")), "{logged}");
    assert!(logged.ends_with("msg=\"line 999\""), "{logged}");
    assert!(!logged.contains("msg=\"line 0\""));
}

#[test]
fn a_panicking_thread_is_logged_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("monitor.log");
    // The process's logger and panic hook from here on; no other test installs one.
    install(
        &options(Some(file.clone()), LogFormat::Json, false),
        dir.path(),
    );
    let worker = std::thread::Builder::new()
        .name("virtio-test".into())
        .spawn(|| panic!("request out of bounds"))
        .unwrap();
    assert!(worker.join().is_err());
    let text = lines(&file);
    assert!(
        text.iter().any(|l| l.contains(r#""level":"error""#)
            && l.contains("thread virtio-test panicked")
            && l.contains("request out of bounds")),
        "{text:?}"
    );
}

//! The line a dying confined process leaves, built without allocating (it is built in a signal
//! handler): on a fixed stack buffer, in each format it goes out in: the bare message, or an
//! error entry in logrus's text or JSON format (the monitor's log), stamped with the time.

/// How a log given to [`super::Limits`] writes its lines: logrus's two formats, as runc (and so
/// the monitor) writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `time="2006-01-02T15:04:05Z" level=error msg="…"`
    Text,
    /// `{"level":"error","msg":"…","time":"2006-01-02T15:04:05Z"}`
    Json,
}

/// Room for the longest message (a syscall's number and name, a thread kind, an errno) with an
/// entry's fields around it; a longer one is cut.
const LINE_BYTES: usize = 256;

/// A line built on the stack.
pub(super) struct Line {
    buf: [u8; LINE_BYTES],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; LINE_BYTES],
            len: 0,
        }
    }
}

impl Line {
    pub(super) fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    pub(super) fn push_number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }

    /// Pushes `n` with at least `width` digits (`n` not negative).
    fn push_padded(&mut self, n: i64, width: usize) {
        let mut digits = 1;
        let mut rest = n / 10;
        while rest > 0 {
            digits += 1;
            rest /= 10;
        }
        for _ in digits..width {
            self.push(b"0");
        }
        self.push_number(n);
    }

    /// Pushes `bytes` as the inside of a JSON string (logrus quotes a text entry's message the
    /// same way).
    fn push_escaped(&mut self, bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for &b in bytes {
            match b {
                b'"' | b'\\' => self.push(&[b'\\', b]),
                b'\n' => self.push(b"\\n"),
                0..=0x1f => self.push(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]),
                _ => self.push(&[b]),
            }
        }
    }

    /// Pushes `secs` since the epoch (UTC) as RFC 3339 with seconds, as runc stamps entries.
    fn push_time(&mut self, secs: i64) {
        let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_date(days);
        self.push_padded(year, 4);
        self.push(b"-");
        self.push_padded(month, 2);
        self.push(b"-");
        self.push_padded(day, 2);
        self.push(b"T");
        self.push_padded(of_day / 3600, 2);
        self.push(b":");
        self.push_padded(of_day / 60 % 60, 2);
        self.push(b":");
        self.push_padded(of_day % 60, 2);
        self.push(b"Z");
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The bare message and a newline.
    pub(super) fn plain(msg: &[u8]) -> Line {
        let mut line = Line::default();
        line.push(msg);
        line.push(b"\n");
        line
    }

    /// An error entry holding `msg`, stamped `secs` since the epoch, in `format`.
    pub(super) fn error_entry(format: LogFormat, msg: &[u8], secs: i64) -> Line {
        use EntryPart::{Fixed, Message, Time};
        let parts = match format {
            LogFormat::Text => [
                Fixed(b"time=\""),
                Time,
                Fixed(b"\" level=error msg=\""),
                Message,
                Fixed(b"\"\n"),
            ],
            LogFormat::Json => [
                Fixed(b"{\"level\":\"error\",\"msg\":\""),
                Message,
                Fixed(b"\",\"time\":\""),
                Time,
                Fixed(b"\"}\n"),
            ],
        };
        let mut line = Line::default();
        for part in parts {
            match part {
                Fixed(bytes) => line.push(bytes),
                Message => line.push_escaped(msg),
                Time => line.push_time(secs),
            }
        }
        line
    }
}

/// What an entry is made of, in the order its format puts them.
enum EntryPart {
    Fixed(&'static [u8]),
    Message,
    Time,
}

/// The Gregorian (year, month, day) of `days` since 1970-01-01 (Howard Hinnant's
/// days-to-civil algorithm: eras of 400 years, years starting in March).
fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Seconds since the epoch now; 0 if the clock cannot be read. clock_gettime is
/// async-signal-safe, and every thread kind's allow-list has it (for when it is not served by
/// the vDSO).
pub(super) fn now_secs() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we own.
    match unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } {
        0 => ts.tv_sec,
        _ => 0,
    }
}

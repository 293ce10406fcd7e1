//! The figures the benchmarks print (min/median/max and p50/p99 of a sample, in milliseconds),
//! and the KiB fields they read from /proc.

use std::time::Duration;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// min / median / max of a sample, in milliseconds.
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        let mut v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stats {
            min: v[0],
            median,
            max: v[n - 1],
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "min {:.1} ms, median {:.1} ms, max {:.1} ms",
            self.min, self.median, self.max
        )
    }
}

/// p50 and p99 (nearest rank) of a sample, in milliseconds.
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(samples: &[Duration]) -> Self {
        let mut v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
        v.sort_by(f64::total_cmp);
        let rank = (v.len() as f64 * 0.99).ceil() as usize;
        Self {
            p50: Stats::of(samples).median,
            p99: v[rank.clamp(1, v.len()) - 1],
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p50 {:.2} ms, p99 {:.2} ms", self.p50, self.p99)
    }
}

/// The number of a `Name:   123 kB` line of /proc/meminfo or smaps_rollup; `name` with its colon.
pub(crate) fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_samples() {
        let d = |ms| Duration::from_millis(ms);
        let s = Stats::of(&[d(30), d(10), d(20)]);
        assert_eq!((s.min, s.median, s.max), (10.0, 20.0, 30.0));
        let s = Stats::of(&[d(40), d(10), d(20), d(30)]);
        assert_eq!(s.median, 25.0);
    }

    #[test]
    fn p99_is_the_nearest_rank() {
        let d: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        let p = Percentiles::of(&d);
        assert_eq!((p.p50, p.p99), (10.5, 20.0));
    }

    #[test]
    fn kib_field_reads_meminfo_and_smaps_rollup() {
        let meminfo =
            "MemTotal:        6091756 kB\nMemFree:  5000 kB\nMemAvailable:    5812340 kB\n";
        assert_eq!(kib_field(meminfo, "MemAvailable:"), Some(5_812_340));
        let rollup = "55d0c0000000-7ffc0000000 ---p 00000000 00:00 0 [rollup]\n\
                      Rss:               41236 kB\nPss:               20118 kB\n\
                      Pss_Anon:          12000 kB\n";
        assert_eq!(kib_field(rollup, "Pss:"), Some(20_118));
        assert_eq!(kib_field(rollup, "Swap:"), None);
    }
}

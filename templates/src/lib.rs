//! Template store: warmed guest snapshots cloned copy-on-write (filled by the templates issue).

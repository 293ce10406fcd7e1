//! Helpers for the tests that run inside the lab (tests/lab/run).

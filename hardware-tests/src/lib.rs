//! Castellan tests against real HSMs and Ledgers, run when a device is named.
//!
//! # The skip scheme
//! Rust's test harness has no "skipped" outcome: a test that finds no device and returns is
//! reported `ok`, a silent pass. So the real-device suite (`tests/hardware.rs`) is a test target
//! with a harness of its own (`harness = false`) that runs every [`runner::Case`] and prints one
//! line per case — `ok`, `FAILED: …`, or `SKIPPED: set CASTELLAN_… to run against a real …`,
//! naming the variable the case needs — and a summary (`12 passed, 3 skipped, 0 failed`).
//! Skips are never counted as passes, and:
//! - `CASTELLAN_HW_REQUIRE=yubihsm,ledger,pkcs11` (or `all`) turns a skip of those devices into
//!   a failure, so a hardware CI runner whose device vanished goes red instead of green;
//! - cases that need a person (unplugging a device, confirming on a Ledger) also need
//!   `CASTELLAN_HW_INTERACTIVE=1`, and say so when skipped;
//! - the unit test `every_case_is_reported_skipped_without_devices` checks that, with no device
//!   named, every case reports itself skipped by name with the variable it needs.
//!
//! The same behavioural checks ([`suite`]) run in CI against the `yubihsm` crate's MockHsm
//! (`tests/yubihsm_mockhsm.rs`, debug builds only).

pub mod env;
pub mod runner;
pub mod suite;

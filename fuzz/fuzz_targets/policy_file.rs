//! Fuzz target `policy_file`: see [`castellan_fuzz::policy_file`] for the invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| castellan_fuzz::policy_file(data));

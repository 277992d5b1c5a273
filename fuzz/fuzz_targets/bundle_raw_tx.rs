//! Fuzz target `bundle_raw_tx`: see [`castellan_fuzz::bundle_raw_tx`] for the invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| castellan_fuzz::bundle_raw_tx(data));

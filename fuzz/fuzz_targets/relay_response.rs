//! Fuzz target `relay_response`: see [`castellan_fuzz::relay_response`] for the invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| castellan_fuzz::relay_response(data));

//! Fuzz target `sign_request`: see [`castellan_fuzz::sign_request`] for the invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| castellan_fuzz::sign_request(data));

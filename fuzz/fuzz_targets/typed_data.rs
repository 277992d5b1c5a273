//! Fuzz target `typed_data`: see [`castellan_fuzz::typed_data`] for the invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| castellan_fuzz::typed_data(data));

//! Castellan end-to-end tests over the real binaries.

pub mod anvil;
pub mod python;
pub mod relays;
pub mod softhsm;

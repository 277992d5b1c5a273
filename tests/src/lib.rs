//! Castellan end-to-end tests over the real binaries.

pub mod anvil;
pub mod deploy_assets;
pub mod python;
pub mod relays;
pub mod softhsm;

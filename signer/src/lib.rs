//! Castellan signer: HSM key backends, signing pipeline, store, audit, mTLS API.
//!
//! The signer is the only Castellan process that can produce a signature, and it holds no key
//! material itself: every signature is made by a [`backend::KeyBackend`].

pub mod audit;
pub mod backend;
pub mod config;
pub mod eth;
pub mod hardening;
pub mod sched;
pub mod server;
pub mod store;

//! Castellan wire types and typed mTLS client.
//!
//! Shared by the signer, the submitter, keyctl, the tests and strategy hosts.

pub mod client;
pub mod devpki;
pub mod serve;
pub mod signer;
pub mod submitter;
pub mod tls;

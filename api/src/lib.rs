//! Castellan wire types and typed mTLS client.

pub mod submitter;

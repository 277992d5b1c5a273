//! Castellan wire types and typed mTLS client.

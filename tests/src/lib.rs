//! Castellan end-to-end tests over the real binaries.

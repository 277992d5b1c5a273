//! Castellan tests against real HSMs and Ledgers, run when a device is named.

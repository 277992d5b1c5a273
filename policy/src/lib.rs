//! Castellan policy engine: pure, no I/O, no clock.

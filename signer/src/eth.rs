//! Ethereum payloads signed through a key backend (being written).

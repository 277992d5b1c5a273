//! PKCS#11 key backend (being written).

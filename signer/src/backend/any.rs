//! [`AnyBackend`]: the backend chosen by configuration, behind one type.
//!
//! The signing pipeline (`Signer<B, S>`) is generic over one [`KeyBackend`]; the daemon picks the
//! backend at run time from `signer.toml`, so it uses this enum, which dispatches each call to
//! the configured device.

use k256::ecdsa::VerifyingKey;

use super::ledger::LedgerBackend;
use super::pkcs11::Pkcs11Backend;
use super::yubihsm::YubiHsmBackend;
use super::{BackendError, EthSignature, Health, KeyBackend, KeyInfo, KeyRef, SignRequest};
use crate::config::BackendConfig;

/// One of the key backends, chosen at run time.
///
/// # Security
/// Adds nothing and removes nothing: every call is the chosen backend's, with its guarantees.
#[derive(Debug)]
pub enum AnyBackend {
    /// A PKCS#11 token.
    Pkcs11(Pkcs11Backend),
    /// A YubiHSM 2 over its native protocol.
    YubiHsm(YubiHsmBackend),
    /// A Ledger over USB HID.
    Ledger(LedgerBackend),
}

impl AnyBackend {
    /// Opens and self-checks the configured backend (see each backend's `open`).
    pub async fn open(config: &BackendConfig) -> Result<Self, BackendError> {
        match config {
            BackendConfig::Pkcs11(c) => Pkcs11Backend::open(c).map(Self::Pkcs11),
            BackendConfig::YubiHsm(c) => {
                // Connecting and authenticating block on the network: off the runtime.
                let c = c.clone();
                tokio::task::spawn_blocking(move || YubiHsmBackend::open(&c))
                    .await
                    .map_err(|e| BackendError::Unavailable(format!("YubiHSM open: {e}")))?
                    .map(Self::YubiHsm)
            }
            BackendConfig::Ledger(c) => LedgerBackend::open(c).await.map(Self::Ledger),
        }
    }

    /// The kind of backend, for logs: `pkcs11`, `yubihsm` or `ledger`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pkcs11(_) => "pkcs11",
            Self::YubiHsm(_) => "yubihsm",
            Self::Ledger(_) => "ledger",
        }
    }
}

impl KeyBackend for AnyBackend {
    async fn generate(&self, label: &str) -> Result<KeyInfo, BackendError> {
        match self {
            Self::Pkcs11(b) => b.generate(label).await,
            Self::YubiHsm(b) => b.generate(label).await,
            Self::Ledger(b) => b.generate(label).await,
        }
    }

    async fn key_info(&self, key: &KeyRef) -> Result<KeyInfo, BackendError> {
        match self {
            Self::Pkcs11(b) => b.key_info(key).await,
            Self::YubiHsm(b) => b.key_info(key).await,
            Self::Ledger(b) => b.key_info(key).await,
        }
    }

    async fn find_by_label(&self, label: &str) -> Result<KeyInfo, BackendError> {
        match self {
            Self::Pkcs11(b) => b.find_by_label(label).await,
            Self::YubiHsm(b) => b.find_by_label(label).await,
            Self::Ledger(b) => b.find_by_label(label).await,
        }
    }

    async fn sign(
        &self,
        key: &KeyRef,
        expected: &VerifyingKey,
        request: SignRequest,
    ) -> Result<EthSignature, BackendError> {
        match self {
            Self::Pkcs11(b) => b.sign(key, expected, request).await,
            Self::YubiHsm(b) => b.sign(key, expected, request).await,
            Self::Ledger(b) => b.sign(key, expected, request).await,
        }
    }

    async fn destroy(&self, key: &KeyRef) -> Result<(), BackendError> {
        match self {
            Self::Pkcs11(b) => b.destroy(key).await,
            Self::YubiHsm(b) => b.destroy(key).await,
            Self::Ledger(b) => b.destroy(key).await,
        }
    }

    fn health(&self) -> Health {
        match self {
            Self::Pkcs11(b) => b.health(),
            Self::YubiHsm(b) => b.health(),
            Self::Ledger(b) => b.health(),
        }
    }
}

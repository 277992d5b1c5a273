//! Key backends: the only places a Castellan key exists.
//!
//! Three kinds of device implement [`KeyBackend`]:
//! - PKCS#11 tokens ([`pkcs11`]): SoftHSM in tests; YubiHSM 2's PKCS#11 module, Nitrokey HSM,
//!   AWS CloudHSM and Thales Luna in production. They sign bare 32-byte digests.
//! - a YubiHSM 2 over its native protocol ([`yubihsm`]): also digests.
//! - a Ledger ([`ledger`]): signs whole payloads (it shows the transaction or message on its screen and hashes
//!   it itself), never a bare digest.
//!
//! So a [`SignRequest`] always carries both the digest and the payload it was computed from. A
//! digest signer uses the digest; a payload signer uses the payload; either way the caller (the
//! `eth` module) checks that the returned signature recovers, over the digest, to the key's address.
//!
//! # Security
//! No backend ever exposes private key material: keys are generated on the device as
//! non-extractable objects, and the only operations offered are "public key", "sign" and
//! "destroy". Every [`EthSignature`] a backend returns is low-s, carries its y-parity, and has been
//! checked to verify against the key's public key over the request's digest.

pub mod any;
pub mod ecdsa;
pub mod ledger;
pub mod pkcs11;
pub mod yubihsm;

use std::fmt;
use std::future::Future;

use alloy::consensus::TypedTransaction;
use alloy::dyn_abi::TypedData;
use alloy::primitives::{Address, B256, Signature};
use k256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};

/// Where a key version lives: the backend reference stored in the key registry.
///
/// A reference names a key object; it is never the key itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyRef {
    /// A key pair on a PKCS#11 token, found by its `CKA_LABEL` and `CKA_ID`.
    Pkcs11 {
        /// `CKA_LABEL` of both the private and the public key object.
        label: String,
        /// `CKA_ID` of both objects, as lowercase hex.
        id: String,
    },
    /// An asymmetric key object on a YubiHSM 2, by its object id.
    #[serde(rename = "yubihsm")]
    YubiHsm {
        /// The object id (1..=0xfffe) of the `EcK256` asymmetric key.
        object_id: u16,
    },
    /// A key a Ledger derives from its seed, by its BIP-32 path (e.g. `m/44'/60'/0'/0/0`).
    Ledger {
        /// The derivation path, `m/` followed by `/`-separated indices, `'` marking hardened.
        path: String,
    },
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pkcs11 { label, id } => write!(f, "pkcs11:{label}#{id}"),
            Self::YubiHsm { object_id } => write!(f, "yubihsm:{object_id:#06x}"),
            Self::Ledger { path } => write!(f, "ledger:{path}"),
        }
    }
}

/// A key known to a backend: its reference, public key and Ethereum address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// How to find the key object again.
    pub key_ref: KeyRef,
    /// The secp256k1 public key read from the device.
    pub public_key: VerifyingKey,
    /// The Ethereum address derived from `public_key`.
    pub address: Address,
}

/// What is being signed, in the form a payload-signing device (a Ledger) needs.
///
/// Digest-signing devices ignore everything but [`SignRequest::digest`].
#[derive(Clone, Debug)]
pub enum Payload {
    /// A bare digest with no further structure (for example a relay-auth hash's EIP-191 digest
    /// when the device signs digests only). Payload-signing devices refuse it.
    Digest,
    /// An unsigned transaction; the digest is its EIP-2718 signing hash.
    Transaction(Box<TypedTransaction>),
    /// An EIP-191 `personal_sign` message (the raw bytes, before the prefix).
    PersonalMessage(Vec<u8>),
    /// EIP-712 typed data; the digest is its `eip712_signing_hash`.
    TypedData(Box<TypedData>),
}

/// One signing request to a backend.
#[derive(Clone, Debug)]
pub struct SignRequest {
    /// The 32-byte digest the signature must verify over.
    pub digest: B256,
    /// The structured payload `digest` was computed from.
    pub payload: Payload,
}

impl SignRequest {
    /// A request for a bare digest.
    pub fn digest(digest: B256) -> Self {
        Self {
            digest,
            payload: Payload::Digest,
        }
    }
}

/// An Ethereum ECDSA signature: `r`, low `s`, and the y-parity, verified against the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthSignature(Signature);

impl EthSignature {
    /// Wraps a signature that the caller has verified: low-s, and recovering over the digest to the
    /// expected public key. Only backends construct these.
    pub(crate) fn new_verified(sig: Signature) -> Self {
        Self(sig)
    }

    /// The alloy signature (y-parity form).
    pub fn signature(&self) -> Signature {
        self.0
    }
}

/// Health of a backend, for `/ready` and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Logged in, sessions open, signing.
    Ready,
    /// Lost the device or its sessions; reconnecting with backoff. Requests fail fast meanwhile.
    Recovering {
        /// The last error, for operators (never a secret).
        reason: String,
    },
    /// Shut down; no further requests will be served.
    Stopped,
}

/// A device that holds secp256k1 keys and signs with them.
///
/// # Security
/// Implementations generate keys on the device as non-extractable, never return key material, and
/// return only signatures that verify against the key's public key over the request's digest. They
/// never block the async runtime: device calls run on worker threads of their own.
pub trait KeyBackend: Send + Sync + 'static {
    /// Generates a new secp256k1 key pair on the device, non-extractable, signing only.
    fn generate(&self, label: &str) -> impl Future<Output = Result<KeyInfo, BackendError>> + Send;

    /// Reads the public key of an existing key and derives its address.
    fn key_info(&self, key: &KeyRef) -> impl Future<Output = Result<KeyInfo, BackendError>> + Send;

    /// Finds a key by its label alone (the id is looked up).
    fn find_by_label(
        &self,
        label: &str,
    ) -> impl Future<Output = Result<KeyInfo, BackendError>> + Send;

    /// Signs. `key` must be a key this backend holds; `expected` is its public key as recorded,
    /// and the signature is checked against it before it is returned.
    fn sign(
        &self,
        key: &KeyRef,
        expected: &VerifyingKey,
        request: SignRequest,
    ) -> impl Future<Output = Result<EthSignature, BackendError>> + Send;

    /// Deletes the key's objects from the device. Irreversible.
    fn destroy(&self, key: &KeyRef) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The backend's current health.
    fn health(&self) -> Health;
}

/// Errors from a key backend.
///
/// Messages name the failing device function and its return code; they never contain a PIN,
/// password or key material.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The PKCS#11 module could not be loaded (missing file, not a PKCS#11 library).
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad {
        /// The module path from the configuration.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// No token with the configured label is present.
    #[error("no token labelled {0:?} is present")]
    TokenNotFound(String),
    /// Login refused: the PIN is wrong, locked, or expired.
    #[error("login to token {token:?} refused: {rv}")]
    LoginFailed {
        /// The token label.
        token: String,
        /// The PKCS#11 return code (for example `CKR_PIN_INCORRECT`).
        rv: String,
    },
    /// The PIN could not be read from its file or environment variable.
    #[error("cannot read the PIN: {0}")]
    PinSource(String),
    /// No key with that reference or label exists on the device.
    #[error("key not found: {0}")]
    KeyNotFound(String),
    /// A key with that label already exists.
    #[error("a key labelled {0:?} already exists")]
    KeyExists(String),
    /// The key on the device is not what the registry says (wrong curve, wrong public key).
    #[error("key {key} does not match: {reason}")]
    KeyMismatch {
        /// The key reference.
        key: String,
        /// What differs.
        reason: String,
    },
    /// A PKCS#11 function failed; carries the function name and return code.
    #[error("PKCS#11 {function} failed: {rv}")]
    Pkcs11 {
        /// The PKCS#11 function, for example `C_Sign`.
        function: String,
        /// The return code, for example `CKR_SESSION_HANDLE_INVALID`.
        rv: String,
    },
    /// The device returned a signature that is malformed or does not verify against the key.
    #[error("device returned an invalid signature: {0}")]
    BadSignature(String),
    /// The backend lost its device or sessions and is reconnecting.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The request waited longer than its deadline.
    #[error("backend did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The backend cannot sign this kind of payload.
    #[error("unsupported payload: {0}")]
    Unsupported(String),
    /// The backend has been shut down.
    #[error("backend stopped")]
    Stopped,
    /// Authentication to the device was refused (a YubiHSM auth key id or password is wrong).
    #[error("authentication to {device} refused: {reason}")]
    AuthFailed {
        /// The device (e.g. `YubiHSM 2 at http://127.0.0.1:12345`, auth key 1).
        device: String,
        /// What the device or library said (never the password).
        reason: String,
    },
    /// A YubiHSM 2 command failed; carries the command and the device's or library's error.
    #[error("YubiHSM {command} failed: {reason}")]
    YubiHsm {
        /// The command, for example `Sign ECDSA`.
        command: String,
        /// The error, for example `HSM error: object not found`.
        reason: String,
    },
    /// The person at the Ledger refused the request on the device (status word 0x6985).
    #[error("the request was rejected on the Ledger")]
    UserRejected,
    /// The Ledger is locked: unlock it with its PIN (status word 0x5515).
    #[error("the Ledger is locked: unlock it with its PIN")]
    DeviceLocked,
    /// The Ethereum app is not open on the Ledger (status word 0x6d00 or 0x6e00).
    #[error("the Ethereum app is not open on the Ledger (status word {0:#06x})")]
    AppNotOpen(u16),
    /// The Ledger answered with another error status word.
    #[error("the Ledger answered {instruction} with status word {status:#06x}")]
    LedgerStatus {
        /// The instruction, for example `SIGN`.
        instruction: String,
        /// The status word.
        status: u16,
    },
}

impl BackendError {
    /// Whether retrying the same request later may succeed (the device or session was lost).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout(_))
    }
}

/// Deserializes a device timeout written as `"250ms"`, `"2s"` or `"1m"` (every backend's config).
pub(crate) fn device_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_device_duration(&text).map_err(serde::de::Error::custom)
}

/// Parses `"250ms"`, `"2s"` or `"1m"`.
pub(crate) fn parse_device_duration(text: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {text:?} needs a unit (ms, s or m)"))?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("duration {text:?} does not start with a number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {text:?} is too long")),
        _ => Err(format!("duration {text:?}: unit must be ms, s or m")),
    }
}

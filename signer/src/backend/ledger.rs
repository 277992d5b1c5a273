//! Ledger key backend: the Ethereum app on a Ledger, over USB HID (coins-ledger 0.13, as alloy's
//! Ledger signer uses it).
//!
//! # Design
//! - A Ledger signs whole payloads, which it shows on its screen and hashes itself: transactions
//!   (`SIGN`, INS 0x04), `personal_sign` messages (INS 0x08) and EIP-712 data (INS 0x0C, the
//!   domain separator and struct hash). It never signs a bare digest: [`Payload::Digest`] is
//!   refused with [`BackendError::Unsupported`].
//! - Every key is a BIP-32 derivation path ([`KeyRef::Ledger`]); [`KeyBackend::key_info`] reads
//!   the key's public key and address from the device (INS 0x02, no confirmation), which is how
//!   the signer checks each registered version against the registry at start.
//! - The APDUs are built here and sent through a [`LedgerTransport`] (one APDU in, data ‖ status
//!   word out), so that tests script the device at the APDU level; [`HidTransport`] is the real
//!   one. Exchanges are serialised: a multi-chunk request is never interleaved with another.
//! - Requests wait for the person at the device with a deadline and fail with
//!   [`BackendError::Timeout`]. Status words become typed errors: 0x6985
//!   [`BackendError::UserRejected`], 0x6d00 / 0x6e00 [`BackendError::AppNotOpen`], 0x5515
//!   [`BackendError::DeviceLocked`].
//! - The device's `v` byte is ignored (for EIP-155 transactions it is truncated to a byte): the
//!   returned `r‖s` goes through [`super::ecdsa::eth_signature_from_rs`], which verifies it
//!   against the key over the request's digest and computes the y-parity.
//!
//! Chunks: the first APDU of a request has P1 = 0x00, the following ones P1 = 0x80, P2 = 0x00;
//! data is cut into chunks of the largest size ≤ 255 that does not leave a last chunk of exactly
//! 3 bytes (alloy's workaround for <https://github.com/LedgerHQ/app-ethereum/issues/409>), so a
//! payload of 255·k + 3 bytes is split differently from Ledger's own client. An empty-data APDU
//! carries no Lc byte (as coins-ledger sends it).

use std::future::Future;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use alloy::consensus::SignableTransaction;
use alloy::primitives::Address;
use coins_ledger::common::{APDUCommand, APDUData};
use coins_ledger::errors::LedgerError;
use coins_ledger::transports::{Ledger, LedgerAsync};
use k256::ecdsa::VerifyingKey;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::yubihsm::config_duration as duration;
use super::{
    BackendError, EthSignature, Health, KeyBackend, KeyInfo, KeyRef, Payload, SignRequest, ecdsa,
};

/// CLA of the Ethereum app.
pub const CLA: u8 = 0xe0;
/// INS: get public key and address.
pub const INS_GET_PUBLIC_KEY: u8 = 0x02;
/// INS: sign a transaction.
pub const INS_SIGN: u8 = 0x04;
/// INS: sign a `personal_sign` message.
pub const INS_SIGN_PERSONAL_MESSAGE: u8 = 0x08;
/// INS: sign EIP-712 data given as domain separator and struct hash.
pub const INS_SIGN_EIP712: u8 = 0x0c;
/// P1 of every chunk after the first.
pub const P1_MORE: u8 = 0x80;

/// Status word: success.
pub const SW_OK: u16 = 0x9000;
/// Status word: the user rejected the request on the device.
pub const SW_USER_REJECTED: u16 = 0x6985;
/// Status word: instruction not supported (the Ethereum app is not open).
pub const SW_INS_NOT_SUPPORTED: u16 = 0x6d00;
/// Status word: class not supported (the dashboard or another app is open).
pub const SW_CLA_NOT_SUPPORTED: u16 = 0x6e00;
/// Status word: the device is locked.
pub const SW_LOCKED: u16 = 0x5515;
/// Status word some older firmwares send when the device is locked.
pub const SW_LOCKED_LEGACY: u16 = 0x6b0c;

/// Deepest derivation path the Ethereum app accepts.
pub const MAX_PATH_DEPTH: usize = 10;

/// One command APDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Apdu {
    /// Class.
    pub cla: u8,
    /// Instruction.
    pub ins: u8,
    /// Parameter 1.
    pub p1: u8,
    /// Parameter 2.
    pub p2: u8,
    /// Data (at most 255 bytes).
    pub data: Vec<u8>,
}

impl Apdu {
    /// The bytes on the wire: `CLA INS P1 P2 [Lc data]` (no Lc when the data is empty).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.data.len());
        out.extend_from_slice(&[self.cla, self.ins, self.p1, self.p2]);
        if !self.data.is_empty() {
            // Chunks are at most 255 bytes (see `chunk_size`), so the length fits.
            out.push(u8::try_from(self.data.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(&self.data);
        }
        out
    }
}

/// A way to exchange APDUs with a Ledger: the real HID device, or a script in tests.
pub trait LedgerTransport: Send + Sync + 'static {
    /// Sends one APDU and returns the whole response: data ‖ status word (2 bytes, big-endian).
    /// Errors are transport failures (no device, unplugged), not status words.
    fn exchange(&self, apdu: &Apdu) -> impl Future<Output = Result<Vec<u8>, BackendError>> + Send;
}

/// Configuration of a [`LedgerBackend`], as embedded in `signer.toml`:
///
/// ```toml
/// [backend]
/// type = "ledger"
/// sign_timeout = "2m"       # how long a person has to confirm on the device
/// address_timeout = "10s"   # reading an address needs no confirmation
/// ```
///
/// The keys' derivation paths are in the key registry ([`KeyRef::Ledger`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Deadline of one signing request (the person at the device must confirm within it).
    #[serde(default = "default_sign_timeout", deserialize_with = "duration")]
    pub sign_timeout: Duration,
    /// Deadline of reading a public key and address.
    #[serde(default = "default_address_timeout", deserialize_with = "duration")]
    pub address_timeout: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            sign_timeout: default_sign_timeout(),
            address_timeout: default_address_timeout(),
        }
    }
}

impl LedgerConfig {
    /// Checks the timeouts.
    pub fn validate(&self) -> Result<(), BackendError> {
        if self.sign_timeout.is_zero() || self.address_timeout.is_zero() {
            return Err(BackendError::Unavailable(
                "invalid Ledger configuration: timeouts must not be zero".into(),
            ));
        }
        Ok(())
    }
}

/// A Ledger's Ethereum app used as a [`KeyBackend`].
///
/// # Security
/// The device holds the seed and shows what it signs; this backend sends it the whole payload
/// and never a bare digest, and returns a signature only after verifying it against the key's
/// expected public key over the request's digest (so a device that signed something else, or
/// with another key, yields [`BackendError::BadSignature`]).
pub struct LedgerBackend<T: LedgerTransport = HidTransport> {
    transport: Mutex<T>,
    config: LedgerConfig,
    health: StdMutex<Health>,
}

impl<T: LedgerTransport> std::fmt::Debug for LedgerBackend<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerBackend")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LedgerBackend<HidTransport> {
    /// Opens the first Ledger on USB HID.
    pub async fn open(config: &LedgerConfig) -> Result<Self, BackendError> {
        config.validate()?;
        let transport = HidTransport::open().await?;
        Ok(Self::with_transport(transport, config.clone()))
    }
}

impl<T: LedgerTransport> LedgerBackend<T> {
    /// A backend over `transport` (a scripted one in tests).
    pub fn with_transport(transport: T, config: LedgerConfig) -> Self {
        Self {
            transport: Mutex::new(transport),
            config,
            health: StdMutex::new(Health::Ready),
        }
    }

    /// Reads the public key and address at `path` and checks that they agree.
    async fn read_key(&self, path: &str) -> Result<KeyInfo, BackendError> {
        let path_bytes = path_to_bytes(path)?;
        let key_ref = KeyRef::Ledger {
            path: path.to_owned(),
        };
        let apdus = [Apdu {
            cla: CLA,
            ins: INS_GET_PUBLIC_KEY,
            p1: 0x00, // no confirmation on the device
            p2: 0x00, // no chain code
            data: path_bytes,
        }];
        let data = self
            .run("GET_PUBLIC_KEY", &apdus, self.config.address_timeout)
            .await?;
        let (public_key, address) =
            parse_address_response(&data).map_err(|reason| BackendError::KeyMismatch {
                key: key_ref.to_string(),
                reason,
            })?;
        Ok(KeyInfo {
            key_ref,
            public_key,
            address,
        })
    }

    /// Sends `apdus` in order under the transport lock, within `timeout`; returns the data of
    /// the last answer.
    async fn run(
        &self,
        instruction: &str,
        apdus: &[Apdu],
        timeout: Duration,
    ) -> Result<Vec<u8>, BackendError> {
        let exchange = async {
            let transport = self.transport.lock().await;
            let mut last = Vec::new();
            for apdu in apdus {
                let answer = match transport.exchange(apdu).await {
                    Ok(answer) => answer,
                    Err(e) => {
                        self.set_health(Health::Recovering {
                            reason: e.to_string(),
                        });
                        return Err(e);
                    }
                };
                self.set_health(Health::Ready);
                last = check_status(instruction, answer)?;
            }
            Ok(last)
        };
        // Dropping the exchange on timeout releases the lock; the device may still be showing
        // the request, and answers the next one with an error until the person dismisses it.
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_elapsed) => Err(BackendError::Timeout(timeout)),
        }
    }

    fn set_health(&self, health: Health) {
        if let Ok(mut h) = self.health.lock() {
            *h = health;
        }
    }
}

impl<T: LedgerTransport> KeyBackend for LedgerBackend<T> {
    /// A Ledger derives keys from its seed: "generating" reads the key at the derivation path
    /// given as `label` (e.g. `m/44'/60'/0'/0/1`).
    async fn generate(&self, label: &str) -> Result<KeyInfo, BackendError> {
        self.find_by_label(label).await
    }

    async fn key_info(&self, key: &KeyRef) -> Result<KeyInfo, BackendError> {
        self.read_key(ledger_path(key)?).await
    }

    /// The label of a Ledger key is its derivation path.
    async fn find_by_label(&self, label: &str) -> Result<KeyInfo, BackendError> {
        if !label.starts_with("m/") {
            return Err(BackendError::Unsupported(format!(
                "a Ledger key is named by its derivation path (m/44'/60'/…), not {label:?}"
            )));
        }
        self.read_key(label).await
    }

    async fn sign(
        &self,
        key: &KeyRef,
        expected: &VerifyingKey,
        request: SignRequest,
    ) -> Result<EthSignature, BackendError> {
        let path = path_to_bytes(ledger_path(key)?)?;
        let (instruction, ins, payload) = sign_payload(&path, &request)?;
        let apdus = chunk_apdus(ins, &payload);
        let data = self
            .run(instruction, &apdus, self.config.sign_timeout)
            .await?;
        // v ‖ r ‖ s; v is ignored (see the module documentation).
        if data.len() != 65 {
            return Err(BackendError::BadSignature(format!(
                "the Ledger returned {} bytes, expected 65 (v ‖ r ‖ s)",
                data.len()
            )));
        }
        ecdsa::eth_signature_from_rs(&request.digest, expected, &data[1..])
    }

    async fn destroy(&self, key: &KeyRef) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(format!(
            "{key}: a Ledger key is derived from the device's seed and cannot be destroyed"
        )))
    }

    fn health(&self) -> Health {
        self.health.lock().map_or(Health::Stopped, |h| h.clone())
    }
}

/// The instruction name, INS and data (path first) of a signing request.
///
/// Public for tests and tools that check the bytes sent to the device.
pub fn sign_payload(
    path: &[u8],
    request: &SignRequest,
) -> Result<(&'static str, u8, Vec<u8>), BackendError> {
    let mut payload = path.to_vec();
    match &request.payload {
        Payload::Digest => Err(BackendError::Unsupported(
            "a Ledger signs transactions, personal messages and EIP-712 data, never a bare digest"
                .into(),
        )),
        Payload::Transaction(tx) => {
            payload.extend_from_slice(&tx.encoded_for_signing());
            Ok(("SIGN", INS_SIGN, payload))
        }
        Payload::PersonalMessage(message) => {
            let len = u32::try_from(message.len()).map_err(|_| {
                BackendError::Unsupported("a personal message longer than 4 GiB".into())
            })?;
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(message);
            Ok(("SIGN_PERSONAL_MESSAGE", INS_SIGN_PERSONAL_MESSAGE, payload))
        }
        Payload::TypedData(data) => {
            let hash_struct = data
                .hash_struct()
                .map_err(|e| BackendError::Unsupported(format!("EIP-712 data: {e}")))?;
            payload.extend_from_slice(data.domain.separator().as_slice());
            payload.extend_from_slice(hash_struct.as_slice());
            Ok(("SIGN_EIP712", INS_SIGN_EIP712, payload))
        }
    }
}

/// Cuts `payload` into the APDUs of one request: P1 0x00 then 0x80, P2 0x00.
pub fn chunk_apdus(ins: u8, payload: &[u8]) -> Vec<Apdu> {
    let size = chunk_size(payload.len());
    payload
        .chunks(size)
        .enumerate()
        .map(|(i, chunk)| Apdu {
            cla: CLA,
            ins,
            p1: if i == 0 { 0x00 } else { P1_MORE },
            p2: 0x00,
            data: chunk.to_vec(),
        })
        .collect()
}

/// The largest chunk size ≤ 255 that does not leave a last chunk of exactly 3 bytes.
pub fn chunk_size(len: usize) -> usize {
    (1..=255usize).rev().find(|i| len % i != 3).unwrap_or(255)
}

/// A derivation path (`m/44'/60'/0'/0/0`, `'` or `h` marking hardened indices) as the app wants
/// it: the depth, then each index as a big-endian u32.
pub fn path_to_bytes(path: &str) -> Result<Vec<u8>, BackendError> {
    let bad = |why: &str| BackendError::KeyNotFound(format!("derivation path {path:?}: {why}"));
    let rest = path
        .strip_prefix("m/")
        .ok_or_else(|| bad("must start with m/"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.is_empty() || parts.len() > MAX_PATH_DEPTH {
        return Err(bad("must have 1 to 10 levels"));
    }
    let mut out = Vec::with_capacity(1 + 4 * parts.len());
    // At most 10 levels, checked above.
    out.push(u8::try_from(parts.len()).unwrap_or(u8::MAX));
    for part in parts {
        let (digits, hardened) = match part.strip_suffix(['\'', 'h']) {
            Some(d) => (d, true),
            None => (part, false),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("each level is a number, optionally followed by '"));
        }
        let index: u32 = digits.parse().map_err(|_| bad("index too large"))?;
        if index >= 0x8000_0000 {
            return Err(bad("index too large"));
        }
        let index = if hardened { index | 0x8000_0000 } else { index };
        out.extend_from_slice(&index.to_be_bytes());
    }
    Ok(out)
}

/// Parses the GET_PUBLIC_KEY answer (`len ‖ 04‖X‖Y ‖ len ‖ ASCII hex address`) and checks that
/// the address is the public key's.
pub fn parse_address_response(data: &[u8]) -> Result<(VerifyingKey, Address), String> {
    let (&key_len, rest) = data.split_first().ok_or("empty answer")?;
    let key_len = usize::from(key_len);
    let key = rest.get(..key_len).ok_or("answer shorter than its key")?;
    let rest = &rest[key_len..];
    let (&addr_len, rest) = rest.split_first().ok_or("answer has no address")?;
    let addr = rest
        .get(..usize::from(addr_len))
        .ok_or("answer shorter than its address")?;
    let public_key =
        VerifyingKey::from_sec1_bytes(key).map_err(|_| "not a secp256k1 public key".to_owned())?;
    let derived = Address::from_public_key(&public_key);
    let text = std::str::from_utf8(addr).map_err(|_| "address is not ASCII".to_owned())?;
    let stated: Address = text
        .trim_start_matches("0x")
        .parse()
        .map_err(|_| format!("address {text:?} is not an address"))?;
    if stated != derived {
        return Err(format!(
            "the device states address {stated} but its public key is {derived}'s"
        ));
    }
    Ok((public_key, derived))
}

/// Splits off and checks the status word; returns the data.
fn check_status(instruction: &str, mut answer: Vec<u8>) -> Result<Vec<u8>, BackendError> {
    if answer.len() < 2 {
        return Err(BackendError::Unavailable(format!(
            "the Ledger answered {instruction} with {} bytes, no status word",
            answer.len()
        )));
    }
    let sw = u16::from_be_bytes([answer[answer.len() - 2], answer[answer.len() - 1]]);
    answer.truncate(answer.len() - 2);
    match sw {
        SW_OK => Ok(answer),
        SW_USER_REJECTED => Err(BackendError::UserRejected),
        SW_INS_NOT_SUPPORTED | SW_CLA_NOT_SUPPORTED => Err(BackendError::AppNotOpen(sw)),
        SW_LOCKED | SW_LOCKED_LEGACY => Err(BackendError::DeviceLocked),
        status => Err(BackendError::LedgerStatus {
            instruction: instruction.to_owned(),
            status,
        }),
    }
}

fn ledger_path(key: &KeyRef) -> Result<&str, BackendError> {
    match key {
        KeyRef::Ledger { path } => Ok(path),
        other => Err(BackendError::KeyNotFound(format!(
            "{other} is not a Ledger key"
        ))),
    }
}

fn default_sign_timeout() -> Duration {
    Duration::from_secs(120)
}

fn default_address_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The real device: the first Ledger on USB HID, through coins-ledger (which runs the HID I/O on
/// a thread of its own, so an exchange never blocks the async runtime). A lost device is opened
/// again on the next exchange.
pub struct HidTransport {
    device: Mutex<Option<Ledger>>,
}

impl std::fmt::Debug for HidTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HidTransport").finish_non_exhaustive()
    }
}

impl HidTransport {
    /// Opens the first Ledger found on USB HID.
    pub async fn open() -> Result<Self, BackendError> {
        let device = open_hid().await?;
        Ok(Self {
            device: Mutex::new(Some(device)),
        })
    }
}

impl LedgerTransport for HidTransport {
    async fn exchange(&self, apdu: &Apdu) -> Result<Vec<u8>, BackendError> {
        let mut device = self.device.lock().await;
        if device.is_none() {
            *device = Some(open_hid().await?);
        }
        let Some(ledger) = device.as_ref() else {
            return Err(BackendError::Unavailable("no Ledger is open".into()));
        };
        let command = APDUCommand {
            cla: apdu.cla,
            ins: apdu.ins,
            p1: apdu.p1,
            p2: apdu.p2,
            data: APDUData::new(&apdu.data),
            response_len: None,
        };
        let answer = raw_answer(ledger.exchange(&command).await);
        if answer.is_err() {
            // Unplugged or gone: open the device again on the next exchange.
            *device = None;
        }
        answer
    }
}

/// coins-ledger's answer as data ‖ status word: it turns the status words it knows (0x6985,
/// 0x6d00, 0x6e00, …) into errors and passes unknown ones (0x5515) through; give them all back
/// as status words, and keep errors for transport failures.
fn raw_answer(
    result: Result<coins_ledger::common::APDUAnswer, LedgerError>,
) -> Result<Vec<u8>, BackendError> {
    match result {
        Ok(answer) => Ok(answer.to_vec()),
        Err(LedgerError::BadRetcode(code)) => Ok((code as u16).to_be_bytes().to_vec()),
        Err(LedgerError::UnknownAPDUCode(code)) => Ok(code.to_be_bytes().to_vec()),
        Err(e) => Err(BackendError::Unavailable(format!("Ledger transport: {e}"))),
    }
}

async fn open_hid() -> Result<Ledger, BackendError> {
    // Opening enumerates HID devices: blocking, so off the runtime.
    tokio::task::spawn_blocking(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BackendError::Unavailable(format!("Ledger: {e}")))?;
        rt.block_on(Ledger::init())
            .map_err(|e| BackendError::Unavailable(format!("no Ledger found on USB HID: {e}")))
    })
    .await
    .map_err(|e| BackendError::Unavailable(format!("Ledger: {e}")))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            hex::encode(path_to_bytes("m/44'/60'/0'/0/0").unwrap()),
            "058000002c8000003c800000000000000000000000"
        );
        assert_eq!(
            path_to_bytes("m/44h/60h/1h").unwrap(),
            path_to_bytes("m/44'/60'/1'").unwrap()
        );
        for bad in [
            "44'/60'",
            "m/",
            "m/x",
            "m/2147483648",
            "m/1/2/3/4/5/6/7/8/9/10/11",
        ] {
            assert!(path_to_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chunk_sizes_avoid_a_last_chunk_of_three() {
        for len in 0..2000usize {
            let size = chunk_size(len);
            assert!((1..=255).contains(&size));
            if len > 0 {
                assert_ne!(len % size, 3, "len {len}");
            }
        }
        assert_eq!(chunk_size(71), 255);
        assert_eq!(chunk_size(258), 254);
    }

    #[test]
    fn the_hid_transport_gives_status_words_back() {
        use coins_ledger::common::{APDUAnswer, APDUResponseCodes};
        for (code, sw) in [
            (APDUResponseCodes::ConditionsNotSatisfied, 0x6985u16),
            (APDUResponseCodes::InsNotSupported, 0x6d00),
            (APDUResponseCodes::ClaNotSupported, 0x6e00),
        ] {
            let raw = raw_answer(Err(LedgerError::BadRetcode(code))).unwrap();
            assert_eq!(raw, sw.to_be_bytes().to_vec());
        }
        let locked = APDUAnswer::from_answer(vec![0x55, 0x15]).unwrap();
        let raw = raw_answer(Ok(locked)).unwrap();
        assert!(matches!(
            check_status("SIGN", raw),
            Err(BackendError::DeviceLocked)
        ));
        let raw = raw_answer(Err(LedgerError::BadRetcode(
            APDUResponseCodes::ConditionsNotSatisfied,
        )))
        .unwrap();
        assert!(matches!(
            check_status("SIGN", raw),
            Err(BackendError::UserRejected)
        ));
        assert!(matches!(
            raw_answer(Err(LedgerError::BackendGone)),
            Err(BackendError::Unavailable(_))
        ));
    }

    #[test]
    fn status_words() {
        assert!(matches!(
            check_status("SIGN", vec![0x69, 0x85]),
            Err(BackendError::UserRejected)
        ));
        assert!(matches!(
            check_status("SIGN", vec![0x6d, 0x00]),
            Err(BackendError::AppNotOpen(0x6d00))
        ));
        assert!(matches!(
            check_status("SIGN", vec![0x55, 0x15]),
            Err(BackendError::DeviceLocked)
        ));
        assert!(matches!(
            check_status("SIGN", vec![0x6a, 0x80]),
            Err(BackendError::LedgerStatus { status: 0x6a80, .. })
        ));
        assert_eq!(check_status("SIGN", vec![1, 0x90, 0x00]).unwrap(), vec![1]);
    }
}

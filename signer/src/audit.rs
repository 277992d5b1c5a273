//! The audit chain: record format, canonical bytes, hashing, checkpoints and verification.
//!
//! This module is pure (no database, no I/O besides writing an export to a `Write`), so `keyctl`
//! and tests can verify an exported chain without a store. The store ([`crate::store`]) appends
//! records inside the same transaction as the state change they describe.
//!
//! # Record
//! Every request, decision, refusal, approval, signature, failure, key change, freeze and policy
//! change is one [`AuditRecord`]:
//!
//! | field        | type                                   |
//! |--------------|----------------------------------------|
//! | `seq`        | integer, 1, 2, 3 … with no gaps        |
//! | `prev_hash`  | `0x` + 64 lowercase hex: the previous record's `hash`; 32 zero bytes for seq 1 |
//! | `at`         | integer, unix time in milliseconds     |
//! | `kind`       | string, one of [`AuditKind`]           |
//! | `request_id` | string or `null`                       |
//! | `identity`   | string or `null` (the client identity or operator) |
//! | `payload`    | JSON object                            |
//! | `hash`       | `0x` + 64 lowercase hex                |
//!
//! # Canonical form and hash (step by step)
//! The hash is `keccak256(canonical_json(record without its "hash" member))`, where
//! `canonical_json` is this subset of the JSON Canonicalization Scheme (RFC 8785):
//! 1. Take the record as a JSON object with exactly the seven members `at`, `identity`, `kind`,
//!    `payload`, `prev_hash`, `request_id`, `seq` (drop `hash`).
//! 2. Serialise with no whitespace at all (`,` and `:` separators, nothing around them).
//! 3. Object members (at every depth, including inside `payload`) are sorted by key, comparing
//!    keys by Unicode code point (equivalently: by their UTF-8 bytes).
//! 4. Integers are written in decimal without sign for non-negatives, `-` for negatives, no
//!    leading zeros, no exponent. Non-integer numbers are not allowed anywhere in a record
//!    (quantities are strings), so a record containing one is rejected when it is made.
//! 5. `true`, `false` and `null` as themselves.
//! 6. Strings are written in double quotes; `"` becomes `\"`, `\` becomes `\\`; the control
//!    characters U+0008, U+0009, U+000A, U+000C, U+000D become `\b`, `\t`, `\n`, `\f`, `\r`; every
//!    other character below U+0020 becomes `\u00xx` with lowercase hex; every other character,
//!    non-ASCII included, is written as itself in UTF-8.
//! 7. Hash the resulting UTF-8 bytes with keccak256 (Ethereum's, not SHA3-256).
//!
//! This is exactly what Python's `json.dumps(obj, sort_keys=True, separators=(",", ":"),
//! ensure_ascii=False).encode()` produces for such an object, so `scripts/verify_audit.py`
//! recomputes hashes with the standard library plus a keccak implementation.
//!
//! # Checkpoints
//! Every N records (configured by the signer; see [`crate::store::checkpoint_if_due`]) a record of
//! kind `checkpoint` is appended whose payload is
//! `{"seq": S, "hash": "0x…", "signer": "0x<address>", "signature": "0x<65 bytes r‖s‖v>"}`:
//! the audit key's signature over the chain head (record `S`, whose hash is `hash`) at the time
//! the checkpoint was made. The signature is an EIP-191 `personal_sign` signature over the 32
//! raw bytes of `hash`: the signed digest is
//! `keccak256("\x19Ethereum Signed Message:\n32" ‖ hash)` ([`checkpoint_digest`]), and `v` is 27 or
//! 28. Since a record's hash covers its `seq` and, through `prev_hash`, every earlier record, one
//! valid checkpoint proves that the whole prefix up to `S` is unchanged — even against someone who
//! can rewrite the database and recompute every hash, which plain hash links alone do not stop.
//! The audit key is an HSM-held key used for nothing else; a Ledger can sign it too, since it is a
//! personal message.
//!
//! # Security
//! [`verify_chain`] detects an altered record (hash mismatch), a dropped record (seq gap), records
//! out of order (seq or `prev_hash` mismatch), and a rewritten prefix (checkpoint mismatch or bad
//! checkpoint signature). It cannot by itself detect that records after the last checkpoint were
//! truncated from the end: compare the head with the signer's reported head, or checkpoint often.

use std::fmt;
use std::io::Write;

use alloy::primitives::{Address, B256, Signature, eip191_hash_message, keccak256};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A point in time: milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// The current wall-clock time. The store and the policy never call this themselves: time is
    /// an argument, so tests control it.
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self(ms)
    }

    /// This time plus `ms` milliseconds (saturating).
    pub fn plus_ms(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }
}

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// What an audit record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A signing decision committed before the HSM is called: limits reserved, request allowed.
    Decision,
    /// A decision refused by the store's re-check (freeze, key status, pause, limit).
    Refusal,
    /// A signature was produced (the outcome of a decision).
    Signature,
    /// Signing failed after a decision; its reservations were released.
    Failure,
    /// A request that needs approvals was recorded as pending, or its status changed.
    Pending,
    /// An approval was recorded for a pending request.
    Approval,
    /// A budget grant was recorded.
    Grant,
    /// A key version was registered, activated, or changed status.
    KeyChange,
    /// The global freeze was set or lifted, or a key was paused or unpaused.
    Freeze,
    /// A policy was loaded or changed.
    PolicyChange,
    /// A submitter-reported outcome (breaker accounting), or another operational event.
    Event,
    /// A signed checkpoint of the chain head.
    Checkpoint,
}

impl AuditKind {
    /// The kind's name as it appears in the canonical form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decision => "decision",
            Self::Refusal => "refusal",
            Self::Signature => "signature",
            Self::Failure => "failure",
            Self::Pending => "pending",
            Self::Approval => "approval",
            Self::Grant => "grant",
            Self::KeyChange => "key_change",
            Self::Freeze => "freeze",
            Self::PolicyChange => "policy_change",
            Self::Event => "event",
            Self::Checkpoint => "checkpoint",
        }
    }

    /// Parses a kind name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "decision" => Self::Decision,
            "refusal" => Self::Refusal,
            "signature" => Self::Signature,
            "failure" => Self::Failure,
            "pending" => Self::Pending,
            "approval" => Self::Approval,
            "grant" => Self::Grant,
            "key_change" => Self::KeyChange,
            "freeze" => Self::Freeze,
            "policy_change" => Self::PolicyChange,
            "event" => Self::Event,
            "checkpoint" => Self::Checkpoint,
            _ => return None,
        })
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The contents of a record before it is placed in the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    /// When it happened.
    pub at: UnixMillis,
    /// What it is.
    pub kind: AuditKind,
    /// The request it belongs to, if any.
    pub request_id: Option<String>,
    /// Who asked (client identity or operator), if anyone.
    pub identity: Option<String>,
    /// Details; a JSON object with no non-integer numbers.
    pub payload: Value,
}

/// What [`AuditEntry::validate`] checks of a payload: a JSON object with no non-integer number.
pub(crate) fn validate_payload(payload: &Value) -> Result<(), AuditError> {
    if !payload.is_object() {
        return Err(AuditError::Malformed(
            "payload must be a JSON object".into(),
        ));
    }
    check_integers_only(payload)
}

impl AuditEntry {
    /// Checks that the payload is an object and contains no non-integer number.
    pub fn validate(&self) -> Result<(), AuditError> {
        validate_payload(&self.payload)
    }

    /// Places the entry after `prev` (or at seq 1 for `None`), computing its hash.
    pub fn seal(self, prev: Option<(u64, B256)>) -> Result<AuditRecord, AuditError> {
        Ok(self.seal_with_payload(prev)?.0)
    }

    /// [`AuditEntry::seal`], also returning the payload's canonical JSON text (what the store
    /// keeps), computed once for both.
    pub fn seal_with_payload(
        self,
        prev: Option<(u64, B256)>,
    ) -> Result<(AuditRecord, String), AuditError> {
        self.validate()?;
        let (seq, prev_hash) = match prev {
            None => (1, B256::ZERO),
            Some((s, h)) => (
                s.checked_add(1)
                    .ok_or_else(|| AuditError::Malformed("seq overflow".into()))?,
                h,
            ),
        };
        let mut record = AuditRecord {
            seq,
            prev_hash,
            at: self.at,
            kind: self.kind,
            request_id: self.request_id,
            identity: self.identity,
            payload: self.payload,
            hash: B256::ZERO,
        };
        let (bytes, range) = record.canonical_bytes_and_payload();
        record.hash = keccak256(&bytes);
        let payload = bytes
            .get(range)
            .and_then(|p| std::str::from_utf8(p).ok())
            .ok_or_else(|| AuditError::Malformed("payload is not UTF-8".into()))?
            .to_owned();
        Ok((record, payload))
    }
}

/// One record of the audit chain.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRecord {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// The previous record's hash (zero for seq 1).
    pub prev_hash: B256,
    /// When it happened.
    pub at: UnixMillis,
    /// What it is.
    pub kind: AuditKind,
    /// The request it belongs to, if any.
    pub request_id: Option<String>,
    /// Who asked, if anyone.
    pub identity: Option<String>,
    /// Details (a JSON object).
    pub payload: Value,
    /// `keccak256` of the canonical bytes (see the module docs).
    pub hash: B256,
}

impl AuditRecord {
    /// The canonical bytes of every field but `hash` (see the module docs).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        self.canonical_bytes_and_payload().0
    }

    /// The canonical bytes, and where in them the canonical payload is.
    fn canonical_bytes_and_payload(&self) -> (Vec<u8>, std::ops::Range<usize>) {
        write_record(
            self.seq,
            &self.prev_hash,
            self.at,
            self.kind,
            self.request_id.as_deref(),
            self.identity.as_deref(),
            |out| write_canonical(out, &self.payload),
        )
    }

    /// Recomputes the hash from the other fields.
    pub fn compute_hash(&self) -> B256 {
        keccak256(self.canonical_bytes())
    }

    /// The record as one line of the JSON-lines export (canonical form plus `hash`; no newline).
    pub fn to_json_line(&self) -> String {
        let mut v = self.to_json_value();
        if let Value::Object(m) = &mut v {
            m.insert("hash".into(), Value::String(hex32(&self.hash)));
        }
        let mut out = Vec::new();
        write_canonical(&mut out, &v);
        // The writer emits only valid UTF-8 (it copies `str`s and ASCII).
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Parses one export line.
    pub fn from_json_line(line: &str) -> Result<Self, AuditError> {
        let v: Value =
            serde_json::from_str(line).map_err(|e| AuditError::Malformed(e.to_string()))?;
        let Value::Object(m) = v else {
            return Err(AuditError::Malformed(
                "a record must be a JSON object".into(),
            ));
        };
        let allowed = [
            "at",
            "hash",
            "identity",
            "kind",
            "payload",
            "prev_hash",
            "request_id",
            "seq",
        ];
        if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(AuditError::Malformed(format!("unknown member {k:?}")));
        }
        let get = |k: &str| {
            m.get(k)
                .ok_or_else(|| AuditError::Malformed(format!("missing member {k:?}")))
        };
        let u = |k: &str| {
            get(k)?
                .as_u64()
                .ok_or_else(|| AuditError::Malformed(format!("{k} must be an unsigned integer")))
        };
        let opt_s = |k: &str| -> Result<Option<String>, AuditError> {
            match get(k)? {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                _ => Err(AuditError::Malformed(format!(
                    "{k} must be a string or null"
                ))),
            }
        };
        let h = |k: &str| -> Result<B256, AuditError> {
            get(k)?
                .as_str()
                .and_then(parse_hex32)
                .ok_or_else(|| AuditError::Malformed(format!("{k} must be 0x + 64 hex digits")))
        };
        let kind_s = get("kind")?
            .as_str()
            .ok_or_else(|| AuditError::Malformed("kind must be a string".into()))?;
        let kind = AuditKind::parse(kind_s)
            .ok_or_else(|| AuditError::Malformed(format!("unknown kind {kind_s:?}")))?;
        let payload = get("payload")?.clone();
        let record = Self {
            seq: u("seq")?,
            prev_hash: h("prev_hash")?,
            at: UnixMillis(u("at")?),
            kind,
            request_id: opt_s("request_id")?,
            identity: opt_s("identity")?,
            payload,
            hash: h("hash")?,
        };
        Ok(record)
    }

    fn to_json_value(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("seq".into(), Value::from(self.seq));
        m.insert("prev_hash".into(), Value::String(hex32(&self.prev_hash)));
        m.insert("at".into(), Value::from(self.at.0));
        m.insert("kind".into(), Value::String(self.kind.as_str().into()));
        m.insert(
            "request_id".into(),
            self.request_id.clone().map_or(Value::Null, Value::String),
        );
        m.insert(
            "identity".into(),
            self.identity.clone().map_or(Value::Null, Value::String),
        );
        m.insert("payload".into(), self.payload.clone());
        Value::Object(m)
    }
}

/// Writes records as JSON lines (one canonical record with its `hash` per line).
pub fn write_jsonl<'a, W: Write>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    mut w: W,
) -> std::io::Result<()> {
    for r in records {
        w.write_all(r.to_json_line().as_bytes())?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// Reads a JSON-lines export (empty lines ignored).
pub fn read_jsonl(text: &str) -> Result<Vec<AuditRecord>, AuditError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(AuditRecord::from_json_line)
        .collect()
}

/// The payload of a `checkpoint` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointPayload {
    /// The seq of the chain head that was signed.
    pub seq: u64,
    /// That record's hash.
    pub hash: B256,
    /// The audit key's address.
    pub signer: Address,
    /// EIP-191 signature over `hash` (see [`checkpoint_digest`]).
    pub signature: Signature,
}

impl CheckpointPayload {
    /// The payload as the JSON object stored in the record.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "seq": self.seq,
            "hash": hex32(&self.hash),
            "signer": format!("{:#x}", self.signer),
            "signature": format!("0x{}", hex::encode(self.signature.as_bytes())),
        })
    }

    /// Parses a checkpoint record's payload.
    pub fn from_json(v: &Value) -> Result<Self, AuditError> {
        let bad = |what: &str| AuditError::Malformed(format!("checkpoint payload: {what}"));
        let seq = v
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("seq"))?;
        let hash = v
            .get("hash")
            .and_then(Value::as_str)
            .and_then(parse_hex32)
            .ok_or_else(|| bad("hash"))?;
        let signer = v
            .get("signer")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Address>().ok())
            .ok_or_else(|| bad("signer"))?;
        let sig_bytes = v
            .get("signature")
            .and_then(Value::as_str)
            .and_then(|s| s.strip_prefix("0x"))
            .and_then(|s| hex::decode(s).ok())
            .ok_or_else(|| bad("signature"))?;
        let signature = Signature::from_raw(&sig_bytes).map_err(|_| bad("signature"))?;
        Ok(Self {
            seq,
            hash,
            signer,
            signature,
        })
    }

    /// Checks that the signature recovers to `expected` (and to the stated `signer`).
    pub fn verify_signature(&self, expected: Address) -> Result<(), String> {
        if self.signer != expected {
            return Err(format!(
                "checkpoint names signer {:#x}, expected audit key {expected:#x}",
                self.signer
            ));
        }
        let recovered = self
            .signature
            .recover_address_from_prehash(&checkpoint_digest(&self.hash))
            .map_err(|e| format!("checkpoint signature does not recover: {e}"))?;
        if recovered != expected {
            return Err(format!(
                "checkpoint signature recovers to {recovered:#x}, expected {expected:#x}"
            ));
        }
        Ok(())
    }
}

/// The digest an audit key signs for a checkpoint over `head_hash`: EIP-191 version `0x45`,
/// `keccak256("\x19Ethereum Signed Message:\n32" ‖ head_hash)`.
pub fn checkpoint_digest(head_hash: &B256) -> B256 {
    eip191_hash_message(head_hash.as_slice())
}

/// An HSM-held audit key: which key signs checkpoints, and its public key and address.
#[derive(Clone, Debug)]
pub struct AuditKey {
    /// Where the key lives.
    pub key_ref: crate::backend::KeyRef,
    /// Its public key, as registered.
    pub public_key: k256::ecdsa::VerifyingKey,
    /// Its address (what verifiers are given).
    pub address: Address,
}

/// Signs a checkpoint over the chain head `(seq, hash)` with the audit key.
///
/// # Security
/// The backend checks the signature against `key.public_key` before returning it; this function
/// also checks that it recovers to `key.address`, so a checkpoint that verifies is always made.
pub async fn sign_checkpoint<B: crate::backend::KeyBackend>(
    backend: &B,
    key: &AuditKey,
    head: (u64, B256),
) -> Result<CheckpointPayload, AuditError> {
    let (seq, hash) = head;
    let request = crate::backend::SignRequest {
        digest: checkpoint_digest(&hash),
        payload: crate::backend::Payload::PersonalMessage(hash.to_vec()),
    };
    let sig = backend
        .sign(&key.key_ref, &key.public_key, request)
        .await
        .map_err(|e| AuditError::Checkpoint(e.to_string()))?;
    let payload = CheckpointPayload {
        seq,
        hash,
        signer: key.address,
        signature: sig.signature(),
    };
    payload
        .verify_signature(key.address)
        .map_err(AuditError::Checkpoint)?;
    Ok(payload)
}

/// What is wrong with a chain, at the first bad record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainProblem {
    /// The record's contents do not hash to its stored hash: it was altered.
    Altered {
        /// The hash recomputed from the contents.
        computed: B256,
        /// The hash stored with the record.
        stored: B256,
    },
    /// The record's seq is not the one expected: records before it were dropped (found > expected)
    /// or records are out of order or duplicated (found < expected).
    SeqGap {
        /// The seq that should have come next.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// The record does not link to its predecessor: reordered, or a record was dropped and the
    /// later ones renumbered.
    PrevHashMismatch {
        /// The predecessor's hash.
        expected: B256,
        /// The record's `prev_hash`.
        found: B256,
    },
    /// A checkpoint's payload is malformed, names a record whose hash differs, or its signature is
    /// not the audit key's.
    BadCheckpoint(String),
    /// The chain does not start where it should (seq 1 with a zero `prev_hash`, or the anchor).
    BadStart(String),
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Altered { computed, stored } => write!(
                f,
                "altered: contents hash to {computed:#x}, stored hash {stored:#x}"
            ),
            Self::SeqGap { expected, found } if found > expected => write!(
                f,
                "seq gap: expected {expected}, found {found} (records dropped or moved)"
            ),
            Self::SeqGap { expected, found } => write!(
                f,
                "seq out of order: expected {expected}, found {found} (reordered or duplicated)"
            ),
            Self::PrevHashMismatch { expected, found } => write!(
                f,
                "prev_hash {found:#x} does not match the previous record's hash {expected:#x} \
                 (reordered or dropped)"
            ),
            Self::BadCheckpoint(why) => write!(f, "bad checkpoint: {why}"),
            Self::BadStart(why) => write!(f, "bad start: {why}"),
        }
    }
}

/// A failed verification: the first bad record and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {problem}")]
pub struct ChainError {
    /// The seq of the first bad record (as stored in it).
    pub seq: u64,
    /// What is wrong.
    pub problem: ChainProblem,
}

/// What a successful verification covered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSummary {
    /// Number of records verified.
    pub records: u64,
    /// The last record's seq and hash (the head), if any record was given.
    pub head: Option<(u64, B256)>,
    /// Number of checkpoints whose signature was verified.
    pub checkpoints: u64,
    /// The highest seq covered by a verified checkpoint signature.
    pub signed_through: Option<u64>,
}

/// Verifies a whole chain from seq 1. See [`verify_chain_from`].
pub fn verify_chain(
    records: &[AuditRecord],
    audit_key_address: Option<Address>,
) -> Result<ChainSummary, ChainError> {
    verify_chain_from(records, None, audit_key_address)
}

/// Verifies records that continue after `anchor` (the seq and hash of the record before the first
/// one given; `None` means the chain starts at seq 1 with a zero `prev_hash`).
///
/// For each record in order: the hash is recomputed (altered), the seq must be the previous plus
/// one (dropped/reordered), `prev_hash` must equal the previous hash (reordered/dropped), and a
/// checkpoint must name a record whose hash it matches (when that record is among those given)
/// and, if `audit_key_address` is given, carry a signature by that address. Returns the first
/// failure.
pub fn verify_chain_from(
    records: &[AuditRecord],
    anchor: Option<(u64, B256)>,
    audit_key_address: Option<Address>,
) -> Result<ChainSummary, ChainError> {
    let (mut expected_seq, mut expected_prev) = match anchor {
        None => (1u64, B256::ZERO),
        Some((s, h)) => (s.saturating_add(1), h),
    };
    let first_seq = expected_seq;
    let mut hashes: Vec<B256> = Vec::with_capacity(records.len());
    let mut checkpoints = 0u64;
    let mut signed_through = None;
    for r in records {
        let fail = |problem| ChainError {
            seq: r.seq,
            problem,
        };
        let computed = r.compute_hash();
        if computed != r.hash {
            return Err(fail(ChainProblem::Altered {
                computed,
                stored: r.hash,
            }));
        }
        if r.seq != expected_seq {
            return Err(fail(ChainProblem::SeqGap {
                expected: expected_seq,
                found: r.seq,
            }));
        }
        if r.prev_hash != expected_prev {
            return Err(fail(ChainProblem::PrevHashMismatch {
                expected: expected_prev,
                found: r.prev_hash,
            }));
        }
        if r.kind == AuditKind::Checkpoint {
            let cp = CheckpointPayload::from_json(&r.payload)
                .map_err(|e| fail(ChainProblem::BadCheckpoint(e.to_string())))?;
            if cp.seq >= r.seq {
                return Err(fail(ChainProblem::BadCheckpoint(format!(
                    "names seq {} which is not before the checkpoint",
                    cp.seq
                ))));
            }
            if cp.seq >= first_seq {
                let idx = usize::try_from(cp.seq - first_seq).unwrap_or(usize::MAX);
                match hashes.get(idx) {
                    Some(h) if *h == cp.hash => {}
                    Some(h) => {
                        return Err(fail(ChainProblem::BadCheckpoint(format!(
                            "signs hash {:#x} for seq {} but that record's hash is {h:#x}",
                            cp.hash, cp.seq
                        ))));
                    }
                    None => {
                        return Err(fail(ChainProblem::BadCheckpoint(format!(
                            "names unknown seq {}",
                            cp.seq
                        ))));
                    }
                }
            } else if let Some((s, h)) = anchor
                && s == cp.seq
                && h != cp.hash
            {
                return Err(fail(ChainProblem::BadCheckpoint(format!(
                    "signs hash {:#x} for the anchor seq {s} whose hash is {h:#x}",
                    cp.hash
                ))));
            }
            if let Some(addr) = audit_key_address {
                cp.verify_signature(addr)
                    .map_err(|e| fail(ChainProblem::BadCheckpoint(e)))?;
                checkpoints += 1;
                signed_through = Some(signed_through.map_or(cp.seq, |s: u64| s.max(cp.seq)));
            }
        }
        hashes.push(r.hash);
        expected_prev = r.hash;
        expected_seq = r.seq.saturating_add(1);
    }
    if records.is_empty() && anchor.is_none() {
        return Ok(ChainSummary {
            records: 0,
            head: None,
            checkpoints: 0,
            signed_through: None,
        });
    }
    Ok(ChainSummary {
        records: records.len() as u64,
        head: records.last().map(|r| (r.seq, r.hash)),
        checkpoints,
        signed_through,
    })
}

/// Errors building or parsing audit records.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// A record or payload is not in the required form.
    #[error("malformed audit record: {0}")]
    Malformed(String),
    /// Signing or checking a checkpoint failed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

/// `0x` + 64 lowercase hex digits.
pub fn hex32(h: &B256) -> String {
    format!("0x{}", hex::encode(h.as_slice()))
}

/// Parses `0x` + 64 hex digits.
pub fn parse_hex32(s: &str) -> Option<B256> {
    let digits = s.strip_prefix("0x")?;
    if digits.len() != 64 {
        return None;
    }
    let bytes = hex::decode(digits).ok()?;
    Some(B256::from_slice(&bytes))
}

/// Writes `v` in the canonical form of the module docs.
pub fn write_canonical(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        // Only integers reach here for validated records; a float is written in serde_json's
        // shortest form so that an unvalidated value still serialises (and fails to verify).
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                write_u64(out, u);
            } else {
                out.extend_from_slice(n.to_string().as_bytes());
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        Value::Object(m) => {
            // Sort explicitly: serde_json's map order depends on its `preserve_order` feature,
            // which any crate in the build may turn on. (Keys of a map are distinct, so an
            // unstable sort gives the one sorted order.)
            let mut sorted: Vec<(&str, &Value)> = m.iter().map(|(k, v)| (k.as_str(), v)).collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write_canonical(out, item);
            }
            out.push(b'}');
        }
    }
}

/// Canonical bytes of a JSON value (see the module docs).
pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(&mut out, v);
    out
}

/// The canonical bytes of a record (see the module docs) whose payload `write_payload` writes,
/// and where in them the payload is.
fn write_record(
    seq: u64,
    prev_hash: &B256,
    at: UnixMillis,
    kind: AuditKind,
    request_id: Option<&str>,
    identity: Option<&str>,
    write_payload: impl FnOnce(&mut Vec<u8>),
) -> (Vec<u8>, std::ops::Range<usize>) {
    let mut out = Vec::with_capacity(1024);
    // Members in sorted key order: at, identity, kind, payload, prev_hash, request_id, seq.
    out.extend_from_slice(b"{\"at\":");
    write_u64(&mut out, at.0);
    out.extend_from_slice(b",\"identity\":");
    write_opt_str(&mut out, identity);
    out.extend_from_slice(b",\"kind\":");
    write_str(&mut out, kind.as_str());
    out.extend_from_slice(b",\"payload\":");
    let start = out.len();
    write_payload(&mut out);
    let payload = start..out.len();
    out.extend_from_slice(b",\"prev_hash\":\"0x");
    let mut hex = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    if hex::encode_to_slice(prev_hash.as_slice(), &mut hex).is_ok() {
        out.extend_from_slice(&hex);
    }
    out.extend_from_slice(b"\",\"request_id\":");
    write_opt_str(&mut out, request_id);
    out.extend_from_slice(b",\"seq\":");
    write_u64(&mut out, seq);
    out.push(b'}');
    (out, payload)
}

/// Places a record after `prev` (or at seq 1 for `None`) from a payload that is already in
/// canonical form — a JSON object written with [`write_canonical`] and [`write_canonical_str`],
/// members sorted, integers only — and returns its `(seq, hash)`. The store's fast path for the
/// records of every signing request, which builds no [`Value`]. A payload that is not canonical
/// yields a record that fails verification, never a different accepted one.
pub fn seal_canonical(
    prev: Option<(u64, B256)>,
    at: UnixMillis,
    kind: AuditKind,
    request_id: Option<&str>,
    identity: Option<&str>,
    payload: &str,
) -> Result<(u64, B256), AuditError> {
    let (seq, prev_hash) = match prev {
        None => (1, B256::ZERO),
        Some((s, h)) => (
            s.checked_add(1)
                .ok_or_else(|| AuditError::Malformed("seq overflow".into()))?,
            h,
        ),
    };
    let (bytes, _) = write_record(seq, &prev_hash, at, kind, request_id, identity, |out| {
        out.extend_from_slice(payload.as_bytes())
    });
    Ok((seq, keccak256(&bytes)))
}

/// Writes `s` as a canonical JSON string (quoted and escaped as the module docs say).
pub fn write_canonical_str(out: &mut Vec<u8>, s: &str) {
    write_str(out, s);
}

/// Writes `v` as a canonical JSON integer.
pub fn write_canonical_u64(out: &mut Vec<u8>, v: u64) {
    write_u64(out, v);
}

/// Decimal digits of `v`, without allocating.
fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        // `v % 10` is below 10, so the cast cannot truncate.
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    // Copy runs of bytes that need no escape in one go. Only `"`, `\\` and ASCII controls are
    // escaped; every other byte (including each byte of a multi-byte UTF-8 character) is copied
    // as it is, exactly as the per-character form did.
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            b if b < 0x20 => {
                out.extend_from_slice(&bytes[run..i]);
                run = i + 1;
                out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(escape);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

fn check_integers_only(v: &Value) -> Result<(), AuditError> {
    match v {
        Value::Number(n) if !(n.is_i64() || n.is_u64()) => Err(AuditError::Malformed(format!(
            "non-integer number {n} in payload (write quantities as strings)"
        ))),
        Value::Array(items) => items.iter().try_for_each(check_integers_only),
        Value::Object(m) => m.values().try_for_each(check_integers_only),
        _ => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::backend::{
        BackendError, EthSignature, Health, KeyBackend, KeyInfo, KeyRef, SignRequest,
    };
    use k256::ecdsa::{SigningKey, VerifyingKey};
    use serde_json::json;

    /// A software key backend for unit tests of checkpoints only. Never compiled outside tests.
    pub(crate) struct TestBackend {
        key: SigningKey,
    }

    impl TestBackend {
        pub(crate) fn new(seed: u8) -> Self {
            let mut bytes = [0u8; 32];
            bytes[31] = seed.max(1);
            bytes[0] = 0x42;
            Self {
                key: SigningKey::from_bytes((&bytes).into()).expect("valid scalar"),
            }
        }

        pub(crate) fn audit_key(&self) -> AuditKey {
            let public_key = *self.key.verifying_key();
            AuditKey {
                key_ref: KeyRef::Pkcs11 {
                    label: "audit".into(),
                    id: "01".into(),
                },
                public_key,
                address: Address::from_public_key(&public_key),
            }
        }
    }

    impl KeyBackend for TestBackend {
        async fn generate(&self, _label: &str) -> Result<KeyInfo, BackendError> {
            Err(BackendError::Unsupported("test backend".into()))
        }
        async fn key_info(&self, key: &KeyRef) -> Result<KeyInfo, BackendError> {
            let k = self.audit_key();
            Ok(KeyInfo {
                key_ref: key.clone(),
                public_key: k.public_key,
                address: k.address,
            })
        }
        async fn find_by_label(&self, _label: &str) -> Result<KeyInfo, BackendError> {
            Err(BackendError::Unsupported("test backend".into()))
        }
        async fn sign(
            &self,
            _key: &KeyRef,
            expected: &VerifyingKey,
            request: SignRequest,
        ) -> Result<EthSignature, BackendError> {
            if expected != self.key.verifying_key() {
                return Err(BackendError::KeyMismatch {
                    key: "test".into(),
                    reason: "public key differs".into(),
                });
            }
            let (sig, recid) = self
                .key
                .sign_prehash_recoverable(request.digest.as_slice())
                .map_err(|e| BackendError::BadSignature(e.to_string()))?;
            let sig = Signature::from_signature_and_parity(sig, recid.is_y_odd()).normalized_s();
            Ok(EthSignature::new_verified(sig))
        }
        async fn destroy(&self, _key: &KeyRef) -> Result<(), BackendError> {
            Ok(())
        }
        fn health(&self) -> Health {
            Health::Ready
        }
    }

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            at: UnixMillis(1_700_000_000_000 + i),
            kind: AuditKind::Decision,
            request_id: Some(format!("req-{i}")),
            identity: Some("spiffe://castellan/strategy-a".into()),
            payload: json!({"n": i, "amount": "1000", "nested": {"z": 1, "a": [true, null, "x\n\u{1}é"]}}),
        }
    }

    pub(crate) fn chain(n: u64) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let prev = out.last().map(|r| (r.seq, r.hash));
            out.push(entry(i).seal(prev).expect("seal"));
        }
        out
    }

    #[test]
    fn canonical_bytes_are_sorted_and_compact() {
        let r = entry(7).seal(None).expect("seal");
        let s = String::from_utf8(r.canonical_bytes()).expect("utf8");
        assert_eq!(
            s,
            format!(
                "{{\"at\":1700000000007,\"identity\":\"spiffe://castellan/strategy-a\",\
                 \"kind\":\"decision\",\"payload\":{{\"amount\":\"1000\",\"n\":7,\
                 \"nested\":{{\"a\":[true,null,\"x\\n\\u0001é\"],\"z\":1}}}},\
                 \"prev_hash\":\"0x{}\",\"request_id\":\"req-7\",\"seq\":1}}",
                "0".repeat(64)
            )
        );
        assert_eq!(r.hash, keccak256(s.as_bytes()));
    }

    #[test]
    fn string_escaping_matches_serde_json() {
        // serde_json escapes exactly as the canonical form says (\" \\ \b \t \n \f \r, other
        // controls as \u00xx, everything else as itself), so it is an independent check of the
        // byte-run writer.
        let samples = [
            "",
            "plain",
            "q\"uo\\te",
            "\u{0}\u{1}\u{8}\t\n\u{b}\u{c}\r\u{1f} \u{7f}",
            "é漢字🙂\"mixed\\\n",
            "key:searcher-hot:value:3600",
        ];
        for s in samples {
            let mut out = Vec::new();
            write_canonical_str(&mut out, s);
            let expected = serde_json::to_string(s).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{s:?}");
        }
        for v in [0u64, 7, 10, 99, 1_800_000_000_000, u64::MAX] {
            let mut out = Vec::new();
            write_canonical_u64(&mut out, v);
            assert_eq!(out, v.to_string().into_bytes());
        }
    }

    #[test]
    fn floats_are_rejected() {
        let mut e = entry(1);
        e.payload = json!({"x": 1.5});
        assert!(matches!(e.seal(None), Err(AuditError::Malformed(_))));
        let mut e = entry(1);
        e.payload = json!([1]);
        assert!(matches!(e.seal(None), Err(AuditError::Malformed(_))));
    }

    #[test]
    fn json_line_roundtrip() {
        let c = chain(3);
        let mut buf = Vec::new();
        write_jsonl(&c, &mut buf).expect("write");
        let back = read_jsonl(std::str::from_utf8(&buf).expect("utf8")).expect("read");
        assert_eq!(back, c);
        assert!(
            AuditRecord::from_json_line(
                &c[0]
                    .to_json_line()
                    .replace("\"seq\":1", "\"seq\":1,\"x\":2")
            )
            .is_err()
        );
    }

    #[test]
    fn verification_passes_on_an_intact_chain() {
        let c = chain(10);
        let s = verify_chain(&c, None).expect("valid");
        assert_eq!(s.records, 10);
        assert_eq!(s.head, Some((10, c[9].hash)));
        // A suffix verifies from its anchor.
        let s = verify_chain_from(&c[4..], Some((4, c[3].hash)), None).expect("valid suffix");
        assert_eq!(s.records, 6);
        // But not from the wrong anchor.
        let e = verify_chain_from(&c[4..], Some((4, c[2].hash)), None).expect_err("bad anchor");
        assert_eq!(e.seq, 5);
    }

    #[test]
    fn altered_record_is_named() {
        let mut c = chain(10);
        c[5].payload["amount"] = json!("999999");
        let e = verify_chain(&c, None).expect_err("altered");
        assert_eq!(e.seq, 6);
        assert!(matches!(e.problem, ChainProblem::Altered { .. }));
    }

    #[test]
    fn altered_and_rehashed_record_breaks_the_link() {
        let mut c = chain(10);
        c[5].identity = Some("mallory".into());
        c[5].hash = c[5].compute_hash();
        let e = verify_chain(&c, None).expect_err("relinked");
        assert_eq!(e.seq, 7);
        assert!(matches!(e.problem, ChainProblem::PrevHashMismatch { .. }));
    }

    #[test]
    fn dropped_record_is_named() {
        let mut c = chain(10);
        c.remove(3);
        let e = verify_chain(&c, None).expect_err("dropped");
        assert_eq!(e.seq, 5);
        assert_eq!(
            e.problem,
            ChainProblem::SeqGap {
                expected: 4,
                found: 5
            }
        );
        // Dropping the first record is caught too.
        let c = chain(3);
        let e = verify_chain(&c[1..], None).expect_err("dropped first");
        assert_eq!(e.seq, 2);
    }

    #[test]
    fn swapped_records_are_named() {
        let mut c = chain(10);
        c.swap(3, 4);
        let e = verify_chain(&c, None).expect_err("swapped");
        assert_eq!(e.seq, 5);
        assert_eq!(
            e.problem,
            ChainProblem::SeqGap {
                expected: 4,
                found: 5
            }
        );
        // Swapping contents but keeping seqs (renumbered, rehashed) breaks the prev_hash links.
        let mut c = chain(10);
        let (a, b) = (c[3].clone(), c[4].clone());
        c[3] = AuditRecord { seq: 4, ..b };
        c[4] = AuditRecord { seq: 5, ..a };
        c[3].hash = c[3].compute_hash();
        c[4].hash = c[4].compute_hash();
        let e = verify_chain(&c, None).expect_err("swapped and rehashed");
        assert_eq!(e.seq, 4);
        assert!(matches!(e.problem, ChainProblem::PrevHashMismatch { .. }));
    }

    #[tokio::test]
    async fn checkpoint_signatures_verify() {
        let backend = TestBackend::new(1);
        let key = backend.audit_key();
        let mut c = chain(5);
        let head = (c[4].seq, c[4].hash);
        let cp = sign_checkpoint(&backend, &key, head).await.expect("sign");
        assert_eq!(
            CheckpointPayload::from_json(&cp.to_json()).expect("parse"),
            cp
        );
        let rec = AuditEntry {
            at: UnixMillis(1),
            kind: AuditKind::Checkpoint,
            request_id: None,
            identity: None,
            payload: cp.to_json(),
        }
        .seal(Some(head))
        .expect("seal");
        c.push(rec);
        let s = verify_chain(&c, Some(key.address)).expect("valid");
        assert_eq!(s.checkpoints, 1);
        assert_eq!(s.signed_through, Some(5));

        // A different audit key is rejected.
        let other = TestBackend::new(2).audit_key().address;
        let e = verify_chain(&c, Some(other)).expect_err("wrong key");
        assert_eq!(e.seq, 6);
        assert!(matches!(e.problem, ChainProblem::BadCheckpoint(_)));

        // A forged signature (by another key, claiming the audit key's address) is rejected.
        let forger = TestBackend::new(3);
        let mut forged = sign_checkpoint(&forger, &forger.audit_key(), head)
            .await
            .expect("sign");
        forged.signer = key.address;
        let mut c2 = c.clone();
        c2[5].payload = forged.to_json();
        c2[5].hash = c2[5].compute_hash();
        let e = verify_chain(&c2, Some(key.address)).expect_err("forged");
        assert_eq!(e.seq, 6);
        assert!(matches!(e.problem, ChainProblem::BadCheckpoint(_)));

        // Rewriting the signed prefix and recomputing every hash is caught by the checkpoint.
        let mut c3 = c.clone();
        c3[2].payload["amount"] = json!("1");
        for i in 2..5 {
            if i > 0 {
                c3[i].prev_hash = c3[i - 1].hash;
            }
            c3[i].hash = c3[i].compute_hash();
        }
        c3[5].prev_hash = c3[4].hash;
        c3[5].hash = c3[5].compute_hash();
        let e = verify_chain(&c3, Some(key.address)).expect_err("rewritten");
        assert_eq!(e.seq, 6);
        assert!(matches!(e.problem, ChainProblem::BadCheckpoint(_)));
    }
}

//! Turning a device's bare ECDSA signature (`r‖s` or DER, no recovery id) into an Ethereum
//! signature: low-s, with its y-parity, verified against the key.
//!
//! Shared by every digest-signing backend (PKCS#11, YubiHSM 2).
//!
//! # Security
//! Every conversion here is the verification step for a device signature: it returns a signature
//! only if it verifies over the digest against the expected public key, so a device (or a cached
//! handle) that signed with the wrong key, or a corrupted reply, yields
//! [`BackendError::BadSignature`] and never a signature.
//!
//! The check computes the ECDSA verification point `R = u1·G + u2·Q` (`u1 = z·s⁻¹`,
//! `u2 = r·s⁻¹`), which *is* the verification (`R.x mod n == r`), and reads the y-parity off
//! `R.y` instead of trying both recovery ids (each a further multiplication). Two ways to compute
//! the same `R`:
//! - [`eth_signature_from_rs`] / [`eth_signature_from_der`]: one double-scalar multiplication
//!   with k256's [`LinearCombination`] (Shamir's trick, GLV). No set-up; for one-off keys.
//! - [`eth_signature_from_rs_prepared`] / [`eth_signature_from_der_prepared`] with a
//!   [`PreparedKey`]: `u1·G` and `u2·Q` from fixed-base tables of precomputed multiples of `G`
//!   (built once per process) and of `Q` (built once per key, ≈ 2 ms, ≈ 200 KiB): ≈ 32 µs a
//!   conversion against ≈ 130 µs before (`cargo bench -p castellan-signer --bench pkcs11`, 2-core
//!   CI machine). [`PreparedKeyCache`] keeps them for a backend.
//!
//! Both compute `s⁻¹` with alloy's variable-time Lehmer inversion (`U256::inv_mod`, ≈ 1 µs
//! against ≈ 13 µs for k256's), checked with one k256 multiplication (`s·s⁻¹ = 1`).
//!
//! Both paths accept and refuse exactly the same inputs and return the same signature: the tests
//! check them against each other and against recovery.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use alloy::primitives::{B256, Signature, U256};
use k256::ecdsa::VerifyingKey;
use k256::elliptic_curve::group::Group;
use k256::elliptic_curve::ops::{Invert, LinearCombination, Reduce};
use k256::elliptic_curve::point::AffineCoordinates;
use k256::elliptic_curve::scalar::IsHigh;
use k256::elliptic_curve::subtle::CtOption;
use k256::elliptic_curve::{BatchNormalize, PrimeField};
use k256::{AffinePoint, FieldBytes, ProjectivePoint, Scalar};

use super::{BackendError, EthSignature};

/// Converts a raw `r‖s` signature (64 bytes, big-endian, as PKCS#11 `CKM_ECDSA` returns for
/// secp256k1) over `digest` into a verified, low-s Ethereum signature.
///
/// # Security
/// Returns a signature only if it verifies over `digest` against `key`.
pub fn eth_signature_from_rs(
    digest: &B256,
    key: &VerifyingKey,
    rs: &[u8],
) -> Result<EthSignature, BackendError> {
    let (r, s) = split_rs(rs)?;
    eth_signature_from_scalars(digest, key, r, s)
}

/// Converts a DER `ECDSA-Sig-Value` (`SEQUENCE { r INTEGER, s INTEGER }`, as some devices and
/// the YubiHSM 2 return) over `digest` into a verified, low-s Ethereum signature.
///
/// # Security
/// Returns a signature only if it verifies over `digest` against `key`.
pub fn eth_signature_from_der(
    digest: &B256,
    key: &VerifyingKey,
    der: &[u8],
) -> Result<EthSignature, BackendError> {
    let (r, s) = split_der(der)?;
    eth_signature_from_scalars(digest, key, &r, &s)
}

/// [`eth_signature_from_rs`] with a [`PreparedKey`]: the same result, about four times faster.
///
/// # Security
/// Returns a signature only if it verifies over `digest` against `key`'s public key; accepts and
/// refuses exactly what [`eth_signature_from_rs`] does.
pub fn eth_signature_from_rs_prepared(
    digest: &B256,
    key: &PreparedKey,
    rs: &[u8],
) -> Result<EthSignature, BackendError> {
    let (r, s) = split_rs(rs)?;
    eth_signature_from_scalars_prepared(digest, key, r, s)
}

/// [`eth_signature_from_der`] with a [`PreparedKey`]: the same result, about four times faster.
///
/// # Security
/// Returns a signature only if it verifies over `digest` against `key`'s public key; accepts and
/// refuses exactly what [`eth_signature_from_der`] does.
pub fn eth_signature_from_der_prepared(
    digest: &B256,
    key: &PreparedKey,
    der: &[u8],
) -> Result<EthSignature, BackendError> {
    let (r, s) = split_der(der)?;
    eth_signature_from_scalars_prepared(digest, key, &r, &s)
}

/// Builds the process-wide table of multiples of `G` (≈ 4 ms, ≈ 370 KiB) now rather than on the
/// first prepared conversion. Optional: a backend calls it from a thread of its own at start so
/// the first signature does not wait for it.
pub fn prepare_generator() {
    LazyLock::force(&GENERATOR_TABLE);
}

/// A public key with a table of precomputed multiples, for fast verification of many signatures
/// by that key. Cheap to clone (the table is shared).
///
/// # Security
/// The table holds only multiples of the public key. It is built from k256's own group operations
/// and, when built, checked against k256's scalar multiplication; should that check ever fail,
/// the key falls back to the unprepared computation, so a `PreparedKey` is never less exact than
/// the [`VerifyingKey`] it was made from.
#[derive(Clone)]
pub struct PreparedKey {
    key: VerifyingKey,
    /// `None` only if the table failed its self-check (a bug; logged).
    table: Option<Arc<FixedBaseTable>>,
}

impl PreparedKey {
    /// Builds the key's table: about 2 ms of CPU in a release build (≈ 2 400 additions, one
    /// batched inversion and a self-check), ≈ 200 KiB. Do this off the async runtime. (The
    /// process-wide table of `G` is built on the first prepared conversion, or by
    /// [`prepare_generator`].)
    pub fn new(key: &VerifyingKey) -> Self {
        let q = ProjectivePoint::from(*key.as_affine());
        let table = FixedBaseTable::new(q, KEY_WINDOW);
        let table = if table.self_check(&q) {
            Some(Arc::new(table))
        } else {
            tracing::error!("precomputed table for a public key failed its self-check; not used");
            None
        };
        Self { key: *key, table }
    }

    /// The public key this was prepared from.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }
}

impl std::fmt::Debug for PreparedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedKey")
            .field("key", &self.key)
            .field("table", &self.table.is_some())
            .finish()
    }
}

/// A bounded, thread-safe cache of [`PreparedKey`]s by public key, for a backend that verifies
/// signatures of whatever key its callers name.
///
/// When full, the least recently used key is dropped (and rebuilt if it is used again).
pub struct PreparedKeyCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

struct CacheInner {
    /// Keyed by the compressed SEC1 encoding of the public key.
    map: HashMap<Box<[u8]>, (PreparedKey, u64)>,
    tick: u64,
}

impl PreparedKeyCache {
    /// Default capacity: at ≈ 200 KiB a key, 256 keys are ≈ 52 MiB.
    pub const DEFAULT_CAPACITY: usize = 256;

    /// A cache holding at most `capacity` keys (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(CacheInner {
                map: HashMap::new(),
                tick: 0,
            }),
        }
    }

    /// The prepared form of `key`, built (outside the lock, ≈ 2 ms) on first use.
    ///
    /// # Security
    /// Entries are found by the full public key, so the table returned is always `key`'s own.
    pub fn get(&self, key: &VerifyingKey) -> PreparedKey {
        let id = key.to_sec1_bytes();
        if let Some(found) = self.lookup(&id) {
            return found;
        }
        let prepared = PreparedKey::new(key);
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        // Another thread may have built it meanwhile: keep one.
        if let Some((existing, used)) = inner.map.get_mut(&id) {
            *used = tick;
            return existing.clone();
        }
        if inner.map.len() >= self.capacity {
            let oldest = inner
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                inner.map.remove(&oldest);
            }
        }
        inner.map.insert(id, (prepared.clone(), tick));
        prepared
    }

    /// How many keys are cached.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no key is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, id: &[u8]) -> Option<PreparedKey> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let (prepared, used) = inner.map.get_mut(id)?;
        *used = tick;
        Some(prepared.clone())
    }

    // Poisoning: nothing panics while the lock is held and every step leaves the map consistent,
    // so a poisoned lock is used as is.
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for PreparedKeyCache {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

impl std::fmt::Debug for PreparedKeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedKeyCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

// ---- private ----------------------------------------------------------------------------------

/// Window width (bits) of a key's table: ⌈257/7⌉ = 37 windows × 64 points ≈ 200 KiB, so at
/// most 37 additions for `u2·Q`. (Measured here: 6 bits ≈ 120 KiB is ≈ 3 µs slower a signature;
/// 8 bits ≈ 360 KiB ≈ 3 µs faster.)
const KEY_WINDOW: usize = 7;
/// Window width of the generator's table (one per process): 33 windows × 128 points ≈ 370 KiB,
/// at most 33 additions for `u1·G`. (Wider windows measured only marginally faster here, 1–3 µs
/// for 2–10 times the memory: the table outgrows the L2 cache.)
const GENERATOR_WINDOW: usize = 8;

/// Multiples of `G` for [`FixedBaseTable::add_mul`], built on first use (≈ 4 ms); `None` only
/// if it failed its self-check (a bug; logged), and then prepared keys use the reference path.
static GENERATOR_TABLE: LazyLock<Option<FixedBaseTable>> = LazyLock::new(|| {
    let g = ProjectivePoint::GENERATOR;
    let table = FixedBaseTable::new(g, GENERATOR_WINDOW);
    if table.self_check(&g) {
        Some(table)
    } else {
        tracing::error!("precomputed table for the generator failed its self-check; not used");
        None
    }
});

fn split_rs(rs: &[u8]) -> Result<(&[u8], &[u8]), BackendError> {
    if rs.len() != 64 {
        return Err(BackendError::BadSignature(format!(
            "expected 64 bytes r||s, got {}",
            rs.len()
        )));
    }
    Ok(rs.split_at(32))
}

fn split_der(der: &[u8]) -> Result<(FieldBytes, FieldBytes), BackendError> {
    // k256's DER parser is strict (minimal integers, no trailing data) and range-checks r and s.
    let sig = k256::ecdsa::Signature::from_der(der)
        .map_err(|_| BackendError::BadSignature("malformed DER ECDSA signature".into()))?;
    Ok(sig.split_bytes())
}

/// The reference path: `R` with one double-scalar multiplication.
fn eth_signature_from_scalars(
    digest: &B256,
    key: &VerifyingKey,
    r_bytes: &[u8],
    s_bytes: &[u8],
) -> Result<EthSignature, BackendError> {
    convert(digest, r_bytes, s_bytes, |u1, u2| {
        let q = ProjectivePoint::from(*key.as_affine());
        ProjectivePoint::lincomb(&ProjectivePoint::GENERATOR, u1, &q, u2)
    })
}

/// The fast path: `R` from the two fixed-base tables.
fn eth_signature_from_scalars_prepared(
    digest: &B256,
    key: &PreparedKey,
    r_bytes: &[u8],
    s_bytes: &[u8],
) -> Result<EthSignature, BackendError> {
    let (Some(g_table), Some(q_table)) = (GENERATOR_TABLE.as_ref(), key.table.as_deref()) else {
        return eth_signature_from_scalars(digest, &key.key, r_bytes, s_bytes);
    };
    convert(digest, r_bytes, s_bytes, |u1, u2| {
        let u1_g = g_table.add_mul(ProjectivePoint::IDENTITY, u1);
        q_table.add_mul(u1_g, u2)
    })
}

/// Parses `(r, s)`, computes `R = u1·G + u2·Q` with `verification_point(u1, u2)`, checks
/// `R.x == r`, then normalises to low-s and sets the y-parity.
fn convert(
    digest: &B256,
    r_bytes: &[u8],
    s_bytes: &[u8],
    verification_point: impl FnOnce(&Scalar, &Scalar) -> ProjectivePoint,
) -> Result<EthSignature, BackendError> {
    let r = nonzero_scalar(r_bytes).ok_or_else(|| bad("r is zero or not below the group order"))?;
    let s = nonzero_scalar(s_bytes).ok_or_else(|| bad("s is zero or not below the group order"))?;
    // z: the digest as an integer reduced mod n (the digest is exactly 256 bits, the size of n).
    let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&FieldBytes::from(digest.0));

    // s is non-zero and n prime, so the inverse exists. s is public (it is half of the
    // signature), so a variable-time inversion leaks nothing.
    let s_inv = invert_public(&s).ok_or_else(|| bad("s is not invertible"))?;
    let u1 = z * s_inv;
    let u2 = r * s_inv;
    let big_r = verification_point(&u1, &u2);
    if bool::from(big_r.is_identity()) {
        return Err(bad("verification point is at infinity"));
    }
    let affine = big_r.to_affine();
    // R.x is a field element (< p); when it is ≥ n, Ethereum's recovery id cannot express it
    // (probability ~2⁻¹²⁸), so such a signature is refused rather than reduced.
    let x_mod_n: Scalar = Option::from(Scalar::from_repr(affine.x()))
        .ok_or_else(|| bad("R.x is not below the group order"))?;
    if x_mod_n != r {
        return Err(bad("signature does not verify against the key"));
    }
    let mut y_odd = bool::from(affine.y_is_odd());

    // Low-s (EIP-2): (r, n−s) verifies with −R, whose y has the other parity.
    let s = if bool::from(s.is_high()) {
        y_odd = !y_odd;
        -s
    } else {
        s
    };
    let sig = Signature::new(
        U256::from_be_slice(&r.to_bytes()),
        U256::from_be_slice(&s.to_bytes()),
        y_odd,
    );
    Ok(EthSignature::new_verified(sig))
}

/// The secp256k1 group order n, as alloy's `U256` (little-endian limbs; checked against k256's
/// in the tests).
const ORDER: U256 = U256::from_limbs([
    0xbfd2_5e8c_d036_4141,
    0xbaae_dce6_af48_a03b,
    0xffff_ffff_ffff_fffe,
    0xffff_ffff_ffff_ffff,
]);

/// `s⁻¹ mod n` for a **public** non-zero `s`, in variable time: alloy's (ruint's) Lehmer
/// inversion, checked with one k256 multiplication; should that ever disagree, k256's own
/// inversion decides. So the result is exactly k256's.
fn invert_public(s: &Scalar) -> Option<Scalar> {
    let fast = U256::from_be_bytes::<32>(s.to_bytes().into())
        .inv_mod(ORDER)
        .and_then(|inv| Option::<Scalar>::from(Scalar::from_repr(inv.to_be_bytes::<32>().into())))
        .filter(|inv| *inv * s == Scalar::ONE);
    fast.or_else(|| Option::from(Invert::invert_vartime(s)))
}

/// Precomputed multiples of a fixed point `P` for fixed-base scalar multiplication with signed
/// windows of `window` bits: entry `(i, j)` is `(j+1)·2^(window·i)·P` for `j < 2^(window−1)`,
/// affine. A scalar's signed digits `dᵢ ∈ [−2^(window−1), 2^(window−1)]` then give
/// `k·P = Σ dᵢ·2^(window·i)·P` with one mixed addition per non-zero digit and no doubling.
///
/// # Security
/// **Variable time**: which entries are read and how many additions are made depend on the
/// scalar. That is acceptable only because every input here is public — the signature, the digest
/// and the public key; this table must never be used with a secret scalar.
struct FixedBaseTable {
    window: usize,
    /// `windows × 2^(window−1)` entries, window by window. None is the identity: `P` has prime
    /// order n and each entry is `P` times a number that is not a multiple of n (a power of two
    /// times a small factor).
    points: Vec<AffinePoint>,
}

impl FixedBaseTable {
    fn new(base: ProjectivePoint, window: usize) -> Self {
        let half = 1usize << (window - 1);
        let windows = windows(window);
        let mut projective = Vec::with_capacity(windows * half);
        let mut base_i = base; // 2^(window·i)·P
        for _ in 0..windows {
            let mut multiple = base_i;
            projective.push(multiple);
            for _ in 1..half {
                multiple += &base_i;
                projective.push(multiple);
            }
            // multiple = 2^(window−1)·base_i, so its double is the next window's base.
            base_i = multiple.double();
        }
        // One field inversion for the whole table (Montgomery's trick).
        let points = <ProjectivePoint as BatchNormalize<[ProjectivePoint]>>::batch_normalize(
            projective.as_slice(),
        );
        Self { window, points }
    }

    /// Checks the table against k256's constant-time scalar multiplication for a few scalars
    /// that touch every window (both digit signs, zero digits, the largest scalar).
    fn self_check(&self, base: &ProjectivePoint) -> bool {
        if self.points.len() != windows(self.window) << (self.window - 1) {
            return false;
        }
        let max = -Scalar::ONE; // n − 1: every window, and the final carry
        let mixed: Scalar =
            Option::from(Scalar::from_repr(FieldBytes::from([0xa5; 32]))).unwrap_or(Scalar::ONE);
        [max, mixed, Scalar::ONE, Scalar::ZERO]
            .iter()
            .all(|k| self.add_mul(ProjectivePoint::IDENTITY, k) == *base * k)
    }

    /// `acc + k·P`, in variable time (see the type's security note).
    fn add_mul(&self, mut acc: ProjectivePoint, k: &Scalar) -> ProjectivePoint {
        let window = self.window;
        let half = 1u64 << (window - 1);
        let full = 1u64 << window;
        let mask = full - 1;
        let limbs = le_limbs(k);
        let mut carry = 0u64;
        for i in 0..windows(window) {
            let v = bits(&limbs, i * window, mask) + carry;
            // Signed digit: v ∈ [0, 2^window]; above half it is v − 2^window with a carry up.
            let (magnitude, negative) = if v > half {
                carry = 1;
                (full - v, true)
            } else {
                carry = 0;
                (v, false)
            };
            if magnitude == 0 {
                continue;
            }
            // magnitude ∈ [1, half] and i < windows, so the index is in the table (the length
            // is checked by `self_check`). Were it not, the sum would be wrong and the signature
            // refused: this path can fail closed, never open.
            let index = i * (half as usize) + (magnitude as usize - 1);
            if let Some(point) = self.points.get(index) {
                if negative {
                    acc -= point;
                } else {
                    acc += point;
                }
            }
        }
        // k < n < 2^256 and the windows cover 257 bits, so the top window never carries.
        debug_assert_eq!(carry, 0);
        acc
    }
}

/// Windows of `window` bits needed for a 256-bit scalar in signed digits: they cover 257 bits,
/// so the last digit absorbs the carry.
fn windows(window: usize) -> usize {
    257usize.div_ceil(window)
}

/// A scalar as little-endian 64-bit limbs, with a zero limb on top for windows past bit 255.
fn le_limbs(k: &Scalar) -> [u64; 5] {
    let bytes = k.to_bytes();
    let mut limbs = [0u64; 5];
    for (i, chunk) in bytes.rchunks_exact(8).enumerate() {
        let mut limb = [0u8; 8];
        limb.copy_from_slice(chunk);
        limbs[i] = u64::from_be_bytes(limb);
    }
    limbs
}

/// The bits of `limbs` from `position` on, masked with `mask` (at most 63 bits).
fn bits(limbs: &[u64; 5], position: usize, mask: u64) -> u64 {
    let (limb, offset) = (position / 64, position % 64);
    let low = limbs.get(limb).copied().unwrap_or(0) >> offset;
    let high = match offset {
        0 => 0,
        _ => limbs.get(limb + 1).copied().unwrap_or(0) << (64 - offset),
    };
    (low | high) & mask
}

/// A 32-byte big-endian integer as a scalar in [1, n), or None.
fn nonzero_scalar(bytes: &[u8]) -> Option<Scalar> {
    let bytes: [u8; 32] = bytes.try_into().ok()?;
    let repr = FieldBytes::from(bytes);
    let scalar: CtOption<Scalar> = Scalar::from_repr(repr);
    let scalar: Scalar = Option::from(scalar)?;
    if bool::from(scalar.is_zero()) {
        return None;
    }
    Some(scalar)
}

fn bad(reason: &str) -> BackendError {
    BackendError::BadSignature(reason.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use k256::ecdsa::SigningKey;
    use k256::ecdsa::signature::hazmat::PrehashSigner;
    use rand::RngCore;

    fn random_digest() -> B256 {
        let mut d = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut d);
        B256::from(d)
    }

    /// Signs with k256 (always low-s) and returns key, digest and (r, s) bytes.
    fn k256_signature() -> (SigningKey, B256, [u8; 32], [u8; 32]) {
        let key = SigningKey::random(&mut rand::thread_rng());
        let digest = random_digest();
        let sig: k256::ecdsa::Signature = key.sign_prehash(digest.as_slice()).unwrap();
        let (r, s) = sig.split_bytes();
        (key, digest, r.into(), s.into())
    }

    fn high_s(s: [u8; 32]) -> [u8; 32] {
        let s = Scalar::from_repr(s.into()).unwrap();
        (-s).to_bytes().into()
    }

    fn n_half() -> U256 {
        // (n − 1) / 2 for secp256k1.
        U256::from_str_radix(
            "7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0",
            16,
        )
        .unwrap()
    }

    fn check(key: &SigningKey, digest: &B256, sig: EthSignature) {
        let sig = sig.signature();
        assert!(sig.s() <= n_half(), "not low-s");
        // Independent check: alloy's recovery (k256 recover_from_prehash with the y-parity).
        let recovered = sig.recover_address_from_prehash(digest).unwrap();
        let expected = alloy::primitives::Address::from_public_key(key.verifying_key());
        assert_eq!(recovered, expected);
    }

    #[test]
    fn low_and_high_s_inputs_recover_to_the_key() {
        for i in 0..200 {
            let (key, digest, r, s) = k256_signature();
            let s = if i % 2 == 0 { s } else { high_s(s) };
            let mut rs = [0u8; 64];
            rs[..32].copy_from_slice(&r);
            rs[32..].copy_from_slice(&s);
            let sig = eth_signature_from_rs(&digest, key.verifying_key(), &rs).unwrap();
            check(&key, &digest, sig);
            assert_eq!(sig.signature().r(), U256::from_be_bytes(r));
        }
    }

    #[test]
    fn high_s_is_normalised_and_parity_flipped() {
        let (key, digest, r, s) = k256_signature();
        let mut low = [0u8; 64];
        low[..32].copy_from_slice(&r);
        low[32..].copy_from_slice(&s);
        let mut high = low;
        high[32..].copy_from_slice(&high_s(s));
        let a = eth_signature_from_rs(&digest, key.verifying_key(), &low).unwrap();
        let b = eth_signature_from_rs(&digest, key.verifying_key(), &high).unwrap();
        // Both encodings of the same signature normalise to the same low-s form and parity.
        assert_eq!(a, b);
        assert_eq!(a.signature().s(), U256::from_be_bytes(s));
    }

    #[test]
    fn der_input_is_accepted() {
        for _ in 0..50 {
            let key = SigningKey::random(&mut rand::thread_rng());
            let digest = random_digest();
            let sig: k256::ecdsa::Signature = key.sign_prehash(digest.as_slice()).unwrap();
            let der = sig.to_der();
            let out = eth_signature_from_der(&digest, key.verifying_key(), der.as_bytes()).unwrap();
            check(&key, &digest, out);
            // A high-s DER signature normalises to the same result.
            let (r, s) = sig.split_bytes();
            let high = k256::ecdsa::Signature::from_scalars(r, high_s(s.into())).unwrap();
            let out2 =
                eth_signature_from_der(&digest, key.verifying_key(), high.to_der().as_bytes())
                    .unwrap();
            assert_eq!(out, out2);
        }
    }

    #[test]
    fn corrupted_signature_is_rejected() {
        let (key, digest, r, s) = k256_signature();
        let mut rs = [0u8; 64];
        rs[..32].copy_from_slice(&r);
        rs[32..].copy_from_slice(&s);
        rs[40] ^= 0x01;
        let err = eth_signature_from_rs(&digest, key.verifying_key(), &rs).unwrap_err();
        assert!(matches!(err, BackendError::BadSignature(_)), "{err:?}");
    }

    #[test]
    fn wrong_key_or_digest_is_rejected() {
        let (key, digest, r, s) = k256_signature();
        let mut rs = [0u8; 64];
        rs[..32].copy_from_slice(&r);
        rs[32..].copy_from_slice(&s);
        let other = SigningKey::random(&mut rand::thread_rng());
        let err = eth_signature_from_rs(&digest, other.verifying_key(), &rs).unwrap_err();
        assert!(matches!(err, BackendError::BadSignature(_)));
        let err = eth_signature_from_rs(&random_digest(), key.verifying_key(), &rs).unwrap_err();
        assert!(matches!(err, BackendError::BadSignature(_)));
    }

    #[test]
    fn out_of_range_components_are_rejected() {
        let (key, digest, r, s) = k256_signature();
        let n: [u8; 32] =
            hex::decode("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141")
                .unwrap()
                .try_into()
                .unwrap();
        let cases: [([u8; 32], [u8; 32]); 5] =
            [([0; 32], s), (r, [0; 32]), (n, s), (r, n), (r, [0xff; 32])];
        for (r, s) in cases {
            let mut rs = [0u8; 64];
            rs[..32].copy_from_slice(&r);
            rs[32..].copy_from_slice(&s);
            let err = eth_signature_from_rs(&digest, key.verifying_key(), &rs).unwrap_err();
            assert!(matches!(err, BackendError::BadSignature(_)), "{err:?}");
        }
        for len in [0usize, 63, 65, 72] {
            let err =
                eth_signature_from_rs(&digest, key.verifying_key(), &vec![1u8; len]).unwrap_err();
            assert!(matches!(err, BackendError::BadSignature(_)));
        }
        let err = eth_signature_from_der(&digest, key.verifying_key(), &[0x30, 0x00]).unwrap_err();
        assert!(matches!(err, BackendError::BadSignature(_)));
    }

    // ---- the prepared (fixed-base table) path against the reference ----

    use k256::elliptic_curve::Field;
    use proptest::prelude::*;

    fn rs_bytes(r: &[u8; 32], s: &[u8; 32]) -> [u8; 64] {
        let mut rs = [0u8; 64];
        rs[..32].copy_from_slice(r);
        rs[32..].copy_from_slice(s);
        rs
    }

    /// Both paths on the same input; they must agree exactly, on the signature or on refusing.
    fn both(digest: &B256, key: &PreparedKey, rs: &[u8]) -> Option<EthSignature> {
        let reference = eth_signature_from_rs(digest, key.verifying_key(), rs);
        let fast = eth_signature_from_rs_prepared(digest, key, rs);
        match (&reference, &fast) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(BackendError::BadSignature(a)), Err(BackendError::BadSignature(b))) => {
                assert_eq!(a, b, "both refuse, for the same reason");
            }
            _ => panic!("paths disagree: reference {reference:?}, prepared {fast:?}"),
        }
        fast.ok()
    }

    fn n_bytes() -> [u8; 32] {
        hex::decode("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141")
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// 2²⁵⁶ − 2¹²⁹: ones in the top half only, but bit 128 (n's top half ends in …fe).
    fn high_half_ones() -> Scalar {
        let mut bytes = [0u8; 32];
        bytes[..16].fill(0xff);
        bytes[15] = 0xfe;
        Scalar::from_repr(bytes.into()).unwrap()
    }

    #[test]
    fn order_and_public_inversion_match_k256() {
        use k256::elliptic_curve::Curve;
        use k256::elliptic_curve::bigint::Encoding;
        let k256_order = k256::Secp256k1::ORDER.to_be_bytes();
        assert_eq!(ORDER, U256::from_be_slice(&k256_order));
        assert_eq!(ORDER.to_be_bytes::<32>(), n_bytes());
        let mut scalars = vec![
            Scalar::ONE,
            -Scalar::ONE,
            Scalar::from(2u64),
            high_half_ones(),
        ];
        for _ in 0..200 {
            scalars.push(Scalar::generate_vartime(&mut rand::thread_rng()));
        }
        for s in scalars {
            let expected: Scalar = Option::from(s.invert()).unwrap();
            assert_eq!(invert_public(&s), Some(expected));
        }
        assert_eq!(invert_public(&Scalar::ZERO), None);
    }

    #[test]
    fn table_multiplication_matches_k256() {
        let mut rng = rand::thread_rng();
        let p = ProjectivePoint::from(*SigningKey::random(&mut rng).verifying_key().as_affine());
        let mut scalars = vec![
            Scalar::ZERO,
            Scalar::ONE,
            -Scalar::ONE,
            -Scalar::from(2u64),
            Scalar::from(u64::MAX),
            high_half_ones(),
        ];
        // Every power of two, and every run of ones: all digit patterns and carries.
        let mut power = Scalar::ONE;
        let mut ones = Scalar::ZERO;
        for _ in 0..256 {
            ones += power;
            scalars.push(power);
            scalars.push(ones);
            power = power.double();
        }
        for _ in 0..32 {
            scalars.push(Scalar::generate_vartime(&mut rng));
        }
        for window in [4, 5, 6, 7, 8] {
            let table = FixedBaseTable::new(p, window);
            assert!(table.self_check(&p));
            for k in &scalars {
                assert_eq!(
                    table.add_mul(ProjectivePoint::IDENTITY, k),
                    p * k,
                    "w={window}"
                );
            }
            // The accumulator is added to, not replaced.
            let k = Scalar::generate_vartime(&mut rng);
            assert_eq!(table.add_mul(p, &k), p + p * k);
        }
        let g = GENERATOR_TABLE.as_ref().unwrap();
        for k in &scalars {
            assert_eq!(
                g.add_mul(ProjectivePoint::IDENTITY, k),
                ProjectivePoint::GENERATOR * k
            );
        }
    }

    proptest! {
        // Each case builds a key's table (slow in a debug build): fewer cases.
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// For random keys, digests and k256 signatures, low-s and high-s: the prepared path
        /// returns exactly the reference's signature, which recovers to the key (alloy/k256).
        #[test]
        fn prepared_matches_reference_and_recovery(
            seed in any::<[u8; 32]>(),
            digest in any::<[u8; 32]>(),
            high in any::<bool>(),
        ) {
            let Ok(key) = SigningKey::from_bytes(&seed.into()) else {
                return Ok(()); // 0 or ≥ n: not a key (probability ~2⁻¹²⁸)
            };
            let digest = B256::from(digest);
            let sig: k256::ecdsa::Signature = key.sign_prehash(digest.as_slice()).unwrap();
            let (r, s) = sig.split_bytes();
            let (r, s): ([u8; 32], [u8; 32]) = (r.into(), s.into());
            let s_in = if high { high_s(s) } else { s };
            let prepared = PreparedKey::new(key.verifying_key());
            let out = both(&digest, &prepared, &rs_bytes(&r, &s_in)).unwrap();
            check(&key, &digest, out);
            prop_assert_eq!(out.signature().r(), U256::from_be_bytes(r));
            prop_assert_eq!(out.signature().s(), U256::from_be_bytes(s));
            // k256's own recovery id for its low-s signature gives the same parity.
            let (_, recid) = key.sign_prehash_recoverable(digest.as_slice()).unwrap();
            prop_assert_eq!(out.signature().v(), recid.is_y_odd());
            // DER input, same answer.
            let der = k256::ecdsa::Signature::from_scalars(r, s_in).unwrap().to_der();
            let from_der = eth_signature_from_der_prepared(&digest, &prepared, der.as_bytes());
            prop_assert_eq!(from_der.unwrap(), out);
        }
    }

    /// A few prepared keys shared by the cases below (a table per case is slow in debug builds).
    static KEYS: LazyLock<Vec<(SigningKey, PreparedKey)>> = LazyLock::new(|| {
        (0..4)
            .map(|_| {
                let key = SigningKey::random(&mut rand::thread_rng());
                let prepared = PreparedKey::new(key.verifying_key());
                (key, prepared)
            })
            .collect()
    });

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A flipped bit anywhere in r, s or the digest, or another key: the prepared path refuses
        /// exactly when the reference does (here: always), and otherwise agrees with it.
        #[test]
        fn prepared_refuses_exactly_what_the_reference_refuses(
            which in 0usize..4,
            other in 1usize..4,
            digest in any::<[u8; 32]>(),
            high in any::<bool>(),
            bit in 0usize..(3 * 256),
        ) {
            let (key, prepared) = &KEYS[which];
            let digest = B256::from(digest);
            let sig: k256::ecdsa::Signature = key.sign_prehash(digest.as_slice()).unwrap();
            let (r, s) = sig.split_bytes();
            let s: [u8; 32] = if high { high_s(s.into()) } else { s.into() };
            let mut rs = rs_bytes(&r.into(), &s);
            prop_assert!(both(&digest, prepared, &rs).is_some());

            // Another key: refused by both.
            let (_, wrong) = &KEYS[(which + other) % 4];
            prop_assert!(both(&digest, wrong, &rs).is_none());

            let mut digest = digest;
            if bit < 512 {
                rs[bit / 8] ^= 1 << (bit % 8);
            } else {
                let b = bit - 512;
                digest.0[b / 8] ^= 1 << (b % 8);
            }
            prop_assert!(both(&digest, prepared, &rs).is_none());
        }
    }

    /// u1 = 0: a digest of 0, or of n (which reduces to 0), takes the path where `u1·G` adds
    /// nothing. Signed with the private key directly (k256 signs any prehash, but check z = 0).
    #[test]
    fn zero_digest_u1_is_zero() {
        for digest in [B256::ZERO, B256::from(n_bytes())] {
            for (key, prepared) in KEYS.iter() {
                let sig: k256::ecdsa::Signature = key.sign_prehash(digest.as_slice()).unwrap();
                let (r, s) = sig.split_bytes();
                for s in [s.into(), high_s(s.into())] {
                    let out = both(&digest, prepared, &rs_bytes(&r.into(), &s)).unwrap();
                    check(key, &digest, out);
                }
            }
        }
    }

    /// `R = u1·G + u2·Q` at infinity (z = −r·d) is refused by both paths, for the same reason.
    #[test]
    fn verification_point_at_infinity_is_refused() {
        for (key, prepared) in KEYS.iter() {
            let d: Scalar = *key.as_nonzero_scalar().as_ref();
            for _ in 0..8 {
                let r = Scalar::generate_vartime(&mut rand::thread_rng());
                let s = Scalar::generate_vartime(&mut rand::thread_rng());
                let z = -(r * d);
                let digest = B256::from(<[u8; 32]>::from(z.to_bytes()));
                let rs = rs_bytes(&r.to_bytes().into(), &s.to_bytes().into());
                let err = eth_signature_from_rs_prepared(&digest, prepared, &rs).unwrap_err();
                assert!(
                    matches!(&err, BackendError::BadSignature(m) if m.contains("infinity")),
                    "{err:?}"
                );
                assert!(both(&digest, prepared, &rs).is_none());
            }
        }
    }

    #[test]
    fn prepared_refuses_malformed_input() {
        let (key, prepared) = &KEYS[0];
        let digest = random_digest();
        let sig: k256::ecdsa::Signature = key.sign_prehash(digest.as_slice()).unwrap();
        let (r, s) = sig.split_bytes();
        let (r, s): ([u8; 32], [u8; 32]) = (r.into(), s.into());
        let n = n_bytes();
        for (r, s) in [([0; 32], s), (r, [0; 32]), (n, s), (r, n), (r, [0xff; 32])] {
            assert!(both(&digest, prepared, &rs_bytes(&r, &s)).is_none());
        }
        for len in [0usize, 63, 65, 72] {
            let err = eth_signature_from_rs_prepared(&digest, prepared, &vec![1u8; len]);
            assert!(matches!(err, Err(BackendError::BadSignature(_))));
        }
        let err = eth_signature_from_der_prepared(&digest, prepared, &[0x30, 0x00]);
        assert!(matches!(err, Err(BackendError::BadSignature(_))));
    }

    #[test]
    fn cache_is_bounded_and_returns_the_keys_own_table() {
        let cache = PreparedKeyCache::new(2);
        assert!(cache.is_empty());
        let keys: Vec<_> = KEYS.iter().map(|(k, _)| *k.verifying_key()).collect();
        let a = cache.get(&keys[0]);
        let b = cache.get(&keys[1]);
        assert_eq!(a.verifying_key(), &keys[0]);
        assert_eq!(b.verifying_key(), &keys[1]);
        // A hit shares the table.
        let a2 = cache.get(&keys[0]);
        assert!(Arc::ptr_eq(
            a.table.as_ref().unwrap(),
            a2.table.as_ref().unwrap()
        ));
        // keys[1] is now the least recently used: a third key evicts it, not keys[0].
        let c = cache.get(&keys[2]);
        assert_eq!(c.verifying_key(), &keys[2]);
        assert_eq!(cache.len(), 2);
        let a3 = cache.get(&keys[0]);
        assert!(Arc::ptr_eq(
            a.table.as_ref().unwrap(),
            a3.table.as_ref().unwrap()
        ));
        let b2 = cache.get(&keys[1]);
        assert!(!Arc::ptr_eq(
            b.table.as_ref().unwrap(),
            b2.table.as_ref().unwrap()
        ));
        assert_eq!(cache.len(), 2);
        // Every cached key verifies its own signatures.
        for (key, _) in KEYS.iter().take(3) {
            let digest = random_digest();
            let sig: k256::ecdsa::Signature = key.sign_prehash(digest.as_slice()).unwrap();
            let (r, s) = sig.split_bytes();
            let prepared = cache.get(key.verifying_key());
            both(&digest, &prepared, &rs_bytes(&r.into(), &s.into())).unwrap();
        }
    }
}

//! Turning a device's bare ECDSA signature (`r‖s` or DER, no recovery id) into an Ethereum
//! signature: low-s, with its y-parity, verified against the key.
//!
//! Shared by every digest-signing backend (PKCS#11, YubiHSM 2).
//!
//! # Security
//! [`eth_signature_from_rs`] and [`eth_signature_from_der`] are the verification step for a
//! device signature: they return a signature only if it verifies over the digest against the
//! expected public key, so a device (or a cached handle) that signed with the wrong key, or a
//! corrupted reply, yields [`BackendError::BadSignature`] and never a signature.
//!
//! The check costs one double-scalar multiplication (Shamir's trick through
//! [`LinearCombination`]): it computes the ECDSA verification point `R = z·s⁻¹·G + r·s⁻¹·Q`,
//! which *is* the verification (`R.x mod n == r`), and reads the y-parity off `R.y` instead of
//! trying both recovery ids (each a further multiplication).

use alloy::primitives::{B256, Signature, U256};
use k256::ecdsa::VerifyingKey;
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::group::Group;
use k256::elliptic_curve::ops::{Invert, LinearCombination, Reduce};
use k256::elliptic_curve::point::AffineCoordinates;
use k256::elliptic_curve::scalar::IsHigh;
use k256::elliptic_curve::subtle::CtOption;
use k256::{FieldBytes, ProjectivePoint, Scalar};

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
    if rs.len() != 64 {
        return Err(BackendError::BadSignature(format!(
            "expected 64 bytes r||s, got {}",
            rs.len()
        )));
    }
    let (r, s) = rs.split_at(32);
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
    // k256's DER parser is strict (minimal integers, no trailing data) and range-checks r and s.
    let sig = k256::ecdsa::Signature::from_der(der)
        .map_err(|_| BackendError::BadSignature("malformed DER ECDSA signature".into()))?;
    let (r, s) = sig.split_bytes();
    eth_signature_from_scalars(digest, key, &r, &s)
}

/// The core: verifies `(r, s)` over `digest` against `key` with one double-scalar
/// multiplication, then normalises to low-s and sets the y-parity.
fn eth_signature_from_scalars(
    digest: &B256,
    key: &VerifyingKey,
    r_bytes: &[u8],
    s_bytes: &[u8],
) -> Result<EthSignature, BackendError> {
    let r = nonzero_scalar(r_bytes).ok_or_else(|| bad("r is zero or not below the group order"))?;
    let s = nonzero_scalar(s_bytes).ok_or_else(|| bad("s is zero or not below the group order"))?;
    // z: the digest as an integer reduced mod n (the digest is exactly 256 bits, the size of n).
    let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&FieldBytes::from(digest.0));

    // s is non-zero, so the inverse exists. s is public (it is half of the signature), so the
    // variable-time inversion (about 2.5x faster here) leaks nothing.
    let s_inv: Scalar =
        Option::from(Invert::invert_vartime(&s)).ok_or_else(|| bad("s is not invertible"))?;
    let u1 = z * s_inv;
    let u2 = r * s_inv;
    let q = ProjectivePoint::from(*key.as_affine());
    let big_r = ProjectivePoint::lincomb(&ProjectivePoint::GENERATOR, &u1, &q, &u2);
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
}

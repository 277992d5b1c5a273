//! `X-Flashbots-Signature` (relays.md §2): an EIP-191 personal_sign, by the relay-auth key, over
//! the ASCII text `"0x" + lowercase_hex(keccak256(body))` of the exact body bytes sent.
//!
//! The submitter holds no key: it hashes the body and asks a [`RelayAuthSigner`] (the signer's
//! relay-auth key, through the signer's API) for the signature, then checks that the answer
//! recovers to the address the signer named before putting it in a header.

use std::future::Future;
use std::pin::Pin;

use alloy::primitives::{Address, B256, Signature, eip191_hash_message, keccak256};

/// A boxed, sendable future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Header name (relays lower-case it; HTTP header names are case-insensitive).
pub const FLASHBOTS_SIGNATURE_HEADER: &str = "x-flashbots-signature";

/// A relay-auth signature as the signer returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayAuthSignature {
    /// Address of the relay-auth key.
    pub address: Address,
    /// `r ‖ s ‖ v`, v either 0/1 or 27/28.
    pub signature: [u8; 65],
}

/// Why a relay-auth signature could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The signer could not be reached or refused.
    #[error("relay-auth signer unavailable: {0}")]
    Unavailable(String),
    /// The signer answered with a signature that does not recover to its address.
    #[error("relay-auth signature does not recover to {expected} (recovered {recovered:?})")]
    BadSignature {
        /// Address the signer named.
        expected: Address,
        /// What the signature recovers to, if anything.
        recovered: Option<Address>,
    },
}

/// Produces relay-auth signatures with the relay identity key.
///
/// # Security
/// The contract is narrow on purpose: given the 32-byte keccak256 of a request body, the
/// implementation returns an EIP-191 personal_sign over the **66-character lowercase
/// `0x`-hex string** of that hash (never over the 32 raw bytes, relays.md §2.3). The signer's
/// policy for this key allows nothing else, so the submitter cannot use it to sign transactions.
pub trait RelayAuthSigner: Send + Sync {
    /// Signs `body_hash` as described above.
    fn sign_body_hash(
        &self,
        body_hash: B256,
    ) -> BoxFuture<'_, Result<RelayAuthSignature, AuthError>>;
}

/// The EIP-191 text that is signed for a body hash: `"0x"` + 64 lowercase hex digits.
pub fn signed_text(body_hash: B256) -> String {
    format!("0x{}", hex::encode(body_hash.as_slice()))
}

/// The digest the relay-auth key signs for `body` (keccak256 of the EIP-191 message).
pub fn signing_digest(body: &[u8]) -> B256 {
    eip191_hash_message(signed_text(keccak256(body)).as_bytes())
}

/// Builds the `X-Flashbots-Signature` value for the exact `body` bytes that will be sent.
///
/// # Security
/// The signer's answer is checked: v is normalised to 27/28 and the signature must recover to
/// the address the signer named, so a broken or confused signer never makes us send a header
/// a relay would treat as an identity change (Quasar drops bundles with an invalid header).
pub async fn flashbots_signature(
    signer: &dyn RelayAuthSigner,
    body: &[u8],
) -> Result<String, AuthError> {
    let hash = keccak256(body);
    let answer = signer.sign_body_hash(hash).await?;
    header_from_signature(hash, &answer)
}

/// Checks a signer's answer for `body_hash` and formats the header value.
pub fn header_from_signature(
    body_hash: B256,
    answer: &RelayAuthSignature,
) -> Result<String, AuthError> {
    let mut sig = answer.signature;
    if sig[64] < 27 {
        sig[64] += 27;
    }
    let bad = |recovered| AuthError::BadSignature {
        expected: answer.address,
        recovered,
    };
    if sig[64] != 27 && sig[64] != 28 {
        return Err(bad(None));
    }
    let parsed = Signature::from_raw(&sig).map_err(|_| bad(None))?;
    let digest = eip191_hash_message(signed_text(body_hash).as_bytes());
    let recovered = parsed.recover_address_from_prehash(&digest).ok();
    if recovered != Some(answer.address) {
        return Err(bad(recovered));
    }
    Ok(format!(
        "{}:0x{}",
        answer.address.to_checksum(None),
        hex::encode(sig)
    ))
}

/// Verifies a header value against a body the way flashbots/go-utils `Verify()` does; returns
/// the recovered address. Used by tests and available to operators' tools.
pub fn verify_flashbots_signature(header: &str, body: &[u8]) -> Option<Address> {
    let (addr, sig_hex) = header.split_once(':')?;
    let sig_hex = sig_hex.strip_prefix("0x")?;
    let mut sig: [u8; 65] = hex::decode(sig_hex).ok()?.try_into().ok()?;
    if sig[64] >= 27 {
        sig[64] -= 27;
    }
    let claimed: Address = addr.parse().ok()?;
    let parsed = Signature::from_raw(&sig).ok()?;
    let recovered = parsed
        .recover_address_from_prehash(&signing_digest(body))
        .ok()?;
    (recovered == claimed).then_some(recovered)
}

/// relays.md §2.4 vector 3 body (exact bytes).
#[cfg(test)]
pub(crate) const VECTOR3_BODY: &str = r#"{"jsonrpc":"2.0","id":1,"method":"eth_sendBundle","params":[{"txs":["0x02f86b0180843b9aca00852ecc889a0082520894c87037874aed04e51c29f582394217a0a2b89d808080c080a0a463985c616dd8ee17d7ef9112af4e6e06a27b071525b42182fe7b0b5c8b4925a00af5ca177ffef2ff28449292505d41be578bebb77110dfc09361d2fb56998260"],"blockNumber":"0x1"}]}"#;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;

    /// Test-only signer over an in-memory key, implementing the trait's contract.
    struct LocalKey(PrivateKeySigner);

    impl RelayAuthSigner for LocalKey {
        fn sign_body_hash(
            &self,
            body_hash: B256,
        ) -> BoxFuture<'_, Result<RelayAuthSignature, AuthError>> {
            let sig = self
                .0
                .sign_message_sync(signed_text(body_hash).as_bytes())
                .map_err(|e| AuthError::Unavailable(e.to_string()));
            let address = self.0.address();
            Box::pin(async move {
                Ok(RelayAuthSignature {
                    address,
                    signature: sig?.as_bytes(),
                })
            })
        }
    }

    /// Signer that implements the common mistake: personal_sign over the 32 raw bytes.
    struct RawBytesKey(PrivateKeySigner);

    impl RelayAuthSigner for RawBytesKey {
        fn sign_body_hash(
            &self,
            body_hash: B256,
        ) -> BoxFuture<'_, Result<RelayAuthSignature, AuthError>> {
            let sig = self.0.sign_message_sync(body_hash.as_slice()).unwrap();
            let address = self.0.address();
            Box::pin(async move {
                Ok(RelayAuthSignature {
                    address,
                    signature: sig.as_bytes(),
                })
            })
        }
    }

    const KEY1: &str = "0xfad9c8855b740a0b7ed4c221dbad0f33a83a49cad6b3fe8d5817ac83d38b6a19";
    const KEY2: &str = "0x0000000000000000000000000000000000000000000000000000000000123456";
    const BODY3: &str = VECTOR3_BODY;
    fn key(k: &str) -> PrivateKeySigner {
        k.parse().unwrap()
    }

    async fn header(k: &str, body: &str) -> String {
        flashbots_signature(&LocalKey(key(k)), body.as_bytes())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn vector_1_go_utils_hello() {
        assert_eq!(
            keccak256(b"Hello").to_string(),
            "0x06b3dfaec148fb1bb2b066f10ec285e7c9bf402ab32aa78a5d38e34566810cd2"
        );
        assert_eq!(
            header(KEY1, "Hello").await,
            "0x96216849c49358B10257cb55b28eA603c874b05E:0x1446053488f02d460c012c84c4091cd5054d98c6cfca01b65f6c1a72773e80e60b8a4931aeee7ed18ce3adb45b2107e8c59e25556c1f871a8334e30e5bddbed21c"
        );
    }

    #[tokio::test]
    async fn vector_2_alloy_with_auth_v27_form() {
        let h = header(KEY2, "sign this message").await;
        assert_eq!(
            h,
            "0xd5F5175D014F28c85F7D67A111C2c9335D7CD771:0x983dc7c520db0d287faff3cd0aef81d5a7f4ffd3473440d3f705da16299724271f660b6fe367f455b205bc014eff3e20defd011f92000f94d39365ca0bc786721b"
        );
        // alloy's v=0 form verifies too (go-utils subtracts 27 only when v >= 27).
        let v0 = "0xd5F5175D014F28c85F7D67A111C2c9335D7CD771:0x983dc7c520db0d287faff3cd0aef81d5a7f4ffd3473440d3f705da16299724271f660b6fe367f455b205bc014eff3e20defd011f92000f94d39365ca0bc7867200";
        assert!(verify_flashbots_signature(v0, b"sign this message").is_some());
    }

    #[tokio::test]
    async fn vector_3_send_bundle_body() {
        assert_eq!(
            keccak256(BODY3.as_bytes()).to_string(),
            "0xa97d6caa3fbe5cfab877f035b48836cf99f4b19cfd3ca1b22ac145c58a1baf09"
        );
        let h = header(KEY1, BODY3).await;
        assert_eq!(
            h,
            "0x96216849c49358B10257cb55b28eA603c874b05E:0x7c34f318596cc9e3b4f713e89a01aca5df5fe61db3c6e397576e54884cd29f6f45cbf18b4be09eae551260d0aeb17947cbc84a182c863cdee492e4fe1992f2951c"
        );
        assert!(verify_flashbots_signature(&h, BODY3.as_bytes()).is_some());
        // One byte more (a trailing newline) and it no longer verifies.
        assert!(verify_flashbots_signature(&h, format!("{BODY3}\n").as_bytes()).is_none());
    }

    #[tokio::test]
    async fn wrong_32_byte_variant_is_never_produced() {
        let h = header(KEY1, BODY3).await;
        assert!(!h.contains("0xa924f4540dccca8c"), "{h}");
        // A signer that signs the 32 raw bytes is caught before any header is produced, and
        // what it signs is indeed the documented WRONG value.
        let wrong = RawBytesKey(key(KEY1))
            .sign_body_hash(keccak256(BODY3.as_bytes()))
            .await
            .unwrap();
        let wrong_hex = hex::encode(wrong.signature);
        assert!(wrong_hex.starts_with("a924f4540dccca8c"), "{wrong_hex}");
        assert!(wrong_hex.ends_with("451b"), "{wrong_hex}");
        let err = flashbots_signature(&RawBytesKey(key(KEY1)), BODY3.as_bytes()).await;
        assert!(matches!(err, Err(AuthError::BadSignature { .. })));
    }
}

//! Shared helpers for the policy's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use alloy::primitives::{Address, B256, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{Eip712Domain, SolStruct};
use castellan_policy::{
    APPROVE, Approval, BudgetGrant, ClientId, Fee, KeyName, KeyStatus, Request, RequestKind,
    SignedApproval, TxFacts,
};

pub const GWEI: u64 = 1_000_000_000;

pub fn ether(n: u64) -> U256 {
    U256::from(n) * U256::from(10u64).pow(U256::from(18))
}

pub fn gwei(n: u64) -> U256 {
    U256::from(n) * U256::from(GWEI)
}

/// A deterministic address `0x…00nn`.
pub fn addr(n: u8) -> Address {
    let mut b = [0u8; 20];
    b[19] = n;
    b[0] = 0x10;
    Address::from(b)
}

pub fn hexaddr(n: u8) -> String {
    format!("{:#x}", addr(n))
}

/// A cheap EIP-1559 transfer on chain 1: 21000 gas at 1 gwei max fee, 1 wei tip, no calldata.
pub fn tx(to: Address, value: U256) -> TxFacts {
    TxFacts::new(
        1,
        Some(to),
        value,
        21_000,
        Fee::Eip1559 {
            max_fee_per_gas: U256::from(GWEI),
            max_priority_fee_per_gas: U256::from(1),
        },
        &[],
    )
}

pub fn request(key: &str, client: &str, kind: RequestKind) -> Request {
    Request {
        key: KeyName::new(key),
        key_status: KeyStatus::Active,
        client: ClientId::new(client),
        digest: B256::repeat_byte(0x42),
        kind,
    }
}

pub fn tx_request(key: &str, client: &str, t: TxFacts) -> Request {
    request(key, client, RequestKind::Transaction(t))
}

pub fn approve(
    signer: &PrivateKeySigner,
    digest: B256,
    expiry: u64,
    domain: &Eip712Domain,
) -> SignedApproval {
    let approval = Approval {
        request: digest,
        decision: APPROVE.to_string(),
        expiry,
    };
    let hash = approval.eip712_signing_hash(domain);
    let signature = signer.sign_hash_sync(&hash).unwrap();
    SignedApproval {
        approval,
        signature,
    }
}

pub fn sign_grant(
    signers: &[&PrivateKeySigner],
    grant: &BudgetGrant,
    domain: &Eip712Domain,
) -> Vec<alloy::primitives::Signature> {
    let hash = grant.eip712_signing_hash(domain);
    signers
        .iter()
        .map(|s| s.sign_hash_sync(&hash).unwrap())
        .collect()
}

/// A fixed signer from a small integer (deterministic test keys).
pub fn signer(n: u8) -> PrivateKeySigner {
    let mut k = [0u8; 32];
    k[31] = n;
    k[0] = 0x01;
    PrivateKeySigner::from_bytes(&B256::from(k)).unwrap()
}

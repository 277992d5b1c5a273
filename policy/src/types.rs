//! The policy's own request types. The signer maps its wire types onto these; nothing here
//! knows about JSON, RLP or HTTP.

use std::fmt;
use std::sync::Arc;

use alloy::primitives::{Address, B256, Selector, U256};

/// A key name such as `searcher-hot` (all versions of a key share the name and its policy).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyName(Arc<str>);

/// A client identity: the SAN (URI or DNS) or CN of the client certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(Arc<str>);

macro_rules! name_type {
    ($t:ident) => {
        impl $t {
            /// Wraps a name.
            pub fn new(name: impl AsRef<str>) -> Self {
                Self(Arc::from(name.as_ref()))
            }
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                Self::new(s)
            }
        }
    };
}
name_type!(KeyName);
name_type!(ClientId);

/// The lifecycle status of the key version that would sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    /// The active version: the full policy of the key applies.
    Active,
    /// A version being rotated out: it may sign only what the key's `retiring` rules allow.
    Retiring {
        /// The address of the version that replaces it (the default sweep destination).
        successor: Address,
    },
    /// Retired, revoked or destroyed: signs nothing.
    Retired,
}

/// The fee fields of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fee {
    /// Legacy and EIP-2930 transactions: one gas price, checked against the `max_fee_per_gas` cap
    /// (the priority-fee cap does not apply: a legacy price has no separate tip field).
    GasPrice(U256),
    /// EIP-1559 (and later) transactions.
    Eip1559 {
        /// `maxFeePerGas`.
        max_fee_per_gas: U256,
        /// `maxPriorityFeePerGas`.
        max_priority_fee_per_gas: U256,
    },
}

impl Fee {
    /// The highest price per gas the transaction can pay.
    pub fn max_price(&self) -> U256 {
        match *self {
            Fee::GasPrice(p) => p,
            Fee::Eip1559 {
                max_fee_per_gas, ..
            } => max_fee_per_gas,
        }
    }
}

/// What the policy needs to know about one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxFacts {
    /// The chain id the transaction is signed for.
    pub chain_id: u64,
    /// The destination; `None` creates a contract.
    pub to: Option<Address>,
    /// Value in wei.
    pub value: U256,
    /// Gas limit.
    pub gas_limit: u64,
    /// Fee fields.
    pub fee: Fee,
    /// Calldata length in bytes.
    pub input_len: usize,
    /// The first four bytes of the calldata, if it has at least four.
    pub selector: Option<Selector>,
}

impl TxFacts {
    /// Facts for a transaction with the given calldata (the selector and length are taken from it).
    pub fn new(
        chain_id: u64,
        to: Option<Address>,
        value: U256,
        gas_limit: u64,
        fee: Fee,
        input: &[u8],
    ) -> Self {
        let selector = input
            .get(..4)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(Selector::from);
        Self {
            chain_id,
            to,
            value,
            gas_limit,
            fee,
            input_len: input.len(),
            selector,
        }
    }

    /// Worst-case cost: `value + gas_limit × max price per gas`; `None` if it overflows 256 bits.
    pub fn worst_case_cost(&self) -> Option<U256> {
        U256::from(self.gas_limit)
            .checked_mul(self.fee.max_price())?
            .checked_add(self.value)
    }
}

/// The EIP-712 domain of a typed-data request (fields absent from the domain are `None`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypedDataFacts {
    /// `name`.
    pub name: Option<String>,
    /// `version`.
    pub version: Option<String>,
    /// `chainId`.
    pub chain_id: Option<u64>,
    /// `verifyingContract`.
    pub verifying_contract: Option<Address>,
}

/// What is to be signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// One transaction.
    Transaction(TxFacts),
    /// A bundle, evaluated as a whole: all of its transactions are allowed or none is.
    Bundle(Vec<TxFacts>),
    /// An EIP-191 `personal_sign` message (the raw message bytes, before the prefix).
    PersonalMessage(Vec<u8>),
    /// EIP-712 typed data, described by its domain.
    TypedData(TypedDataFacts),
    /// A relay-auth payload (`X-Flashbots-Signature`): an EIP-191 message that is `0x` followed
    /// by 64 lowercase hex digits.
    RelayAuth(Vec<u8>),
}

/// One signing request as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The key name the client asked for.
    pub key: KeyName,
    /// The status of the version that would sign.
    pub key_status: KeyStatus,
    /// The authenticated client identity.
    pub client: ClientId,
    /// The request digest approvals refer to (computed by the signer over the request).
    pub digest: B256,
    /// What is to be signed.
    pub kind: RequestKind,
}

/// True for exactly the payloads relay-auth keys sign: `0x` + 64 lowercase hex digits (66 bytes).
pub fn is_relay_auth_payload(msg: &[u8]) -> bool {
    msg.len() == 66
        && msg.starts_with(b"0x")
        && msg[2..]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_auth_payload_shape() {
        let good = format!("0x{}", "ab".repeat(32));
        assert!(is_relay_auth_payload(good.as_bytes()));
        assert!(!is_relay_auth_payload(
            format!("0x{}", "AB".repeat(32)).as_bytes()
        ));
        assert!(!is_relay_auth_payload(
            format!("0x{}", "ab".repeat(31)).as_bytes()
        ));
        assert!(!is_relay_auth_payload(
            format!("0x{}a", "ab".repeat(32)).as_bytes()
        ));
        assert!(!is_relay_auth_payload(
            format!("1x{}", "ab".repeat(32)).as_bytes()
        ));
        assert!(!is_relay_auth_payload(
            format!("0x{}g", "a".repeat(63)).as_bytes()
        ));
    }

    #[test]
    fn worst_case_cost_checked() {
        let t = TxFacts::new(
            1,
            None,
            U256::from(5),
            21_000,
            Fee::GasPrice(U256::from(2)),
            &[1, 2, 3],
        );
        assert_eq!(t.worst_case_cost(), Some(U256::from(42_005)));
        assert_eq!(t.selector, None);
        let t = TxFacts::new(1, None, U256::MAX, 1, Fee::GasPrice(U256::from(1)), &[]);
        assert_eq!(t.worst_case_cost(), None);
    }
}

//! A typed mTLS client of the signer's API, and [`RemoteSigner`]: alloy's `Signer` and
//! `TxSigner` on top of it, so an alloy provider can use Castellan as its wallet.
//!
//! # Security
//! The client presents its own certificate and trusts only the configured CA for the server. Every
//! signature the signer returns is checked here too: [`RemoteSigner`] recovers it over the digest
//! it computed itself and refuses one that does not come from the key's address, so a compromised
//! network path cannot make the wallet send something other than what it asked to sign.

use std::time::Duration;

use alloy::consensus::SignableTransaction;
use alloy::dyn_abi::TypedData;
use alloy::primitives::{Address, B256, ChainId, Signature, eip191_hash_message};
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::signer::{
    CheckedAddress, KeyView, PendingResponse, SignMessageRequest, SignTransactionRequest,
    SignTypedDataRequest, SignatureResponse, SignedTransactionResponse, UnsignedTx,
};
use crate::submitter::{ErrorBody, Quantity, Wei};
use crate::tls::{ClientTlsConfig, TlsError};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server could not be reached or the connection failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The server answered with an error body.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable error code.
        code: String,
        /// The server's reason.
        message: String,
    },
    /// The answer could not be decoded.
    #[error("cannot decode the answer: {0}")]
    Decode(String),
    /// The request waits for approvals (202); poll its status.
    #[error("request {} waits for {} approvals of set {}", .0.request_id, .0.threshold, .0.approver_set)]
    Pending(Box<PendingResponse>),
    /// The signature the server returned does not recover to the key's address.
    #[error("the signer returned a signature that does not recover to {expected}")]
    BadSignature {
        /// The key's address.
        expected: Address,
    },
}

/// A client of one signer.
#[derive(Clone, Debug)]
pub struct SignerClient {
    base: String,
    http: reqwest::Client,
}

impl SignerClient {
    /// A client of the signer at `base` (e.g. `https://signer.internal:8443`).
    pub fn new(base: impl Into<String>, tls: &ClientTlsConfig) -> Result<Self, ClientError> {
        Self::with_builder(base, tls, reqwest::Client::builder())
    }

    /// Like [`SignerClient::new`], starting from a reqwest builder (timeouts, name overrides).
    pub fn with_builder(
        base: impl Into<String>,
        tls: &ClientTlsConfig,
        builder: reqwest::ClientBuilder,
    ) -> Result<Self, ClientError> {
        let config = tls.build()?;
        let http = builder
            .tls_backend_preconfigured(config)
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(transport)?;
        Ok(Self {
            base: base.into().trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// Signs a transaction with the key `key`.
    pub async fn sign_transaction(
        &self,
        key: &str,
        tx: UnsignedTx,
    ) -> Result<SignedTransactionResponse, ClientError> {
        self.post(
            &format!("/v1/keys/{key}/sign/transaction"),
            &SignTransactionRequest { tx },
        )
        .await
    }

    /// Signs an EIP-191 personal message.
    pub async fn sign_message(
        &self,
        key: &str,
        message: &[u8],
    ) -> Result<SignatureResponse, ClientError> {
        let req = SignMessageRequest {
            message: Some(message.to_vec().into()),
            text: None,
        };
        self.post(&format!("/v1/keys/{key}/sign/message"), &req)
            .await
    }

    /// Signs EIP-712 typed data.
    pub async fn sign_typed_data(
        &self,
        key: &str,
        data: &TypedData,
    ) -> Result<SignatureResponse, ClientError> {
        let typed_data =
            serde_json::to_value(data).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.post(
            &format!("/v1/keys/{key}/sign/typed-data"),
            &SignTypedDataRequest { typed_data },
        )
        .await
    }

    /// Every key this identity may see.
    pub async fn keys(&self) -> Result<Vec<KeyView>, ClientError> {
        self.get("/v1/keys").await
    }

    /// One key.
    pub async fn key(&self, name: &str) -> Result<KeyView, ClientError> {
        self.get(&format!("/v1/keys/{name}")).await
    }

    /// POSTs JSON and decodes the answer (202 becomes [`ClientError::Pending`]).
    pub async fn post<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(transport)?;
        decode(resp).await
    }

    /// GETs and decodes the answer.
    pub async fn get<Resp: DeserializeOwned>(&self, path: &str) -> Result<Resp, ClientError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(transport)?;
        decode(resp).await
    }
}

/// An error and its causes, joined by `": "`. reqwest's own message ("error sending request for
/// url …") does not tell a refused connection from a failed handshake or a connection closed
/// mid-call; its causes do.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn transport(e: reqwest::Error) -> ClientError {
    ClientError::Transport(error_chain(&e))
}

async fn decode<Resp: DeserializeOwned>(resp: reqwest::Response) -> Result<Resp, ClientError> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(transport)?;
    if status == StatusCode::ACCEPTED {
        let pending: PendingResponse =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))?;
        return Err(ClientError::Pending(Box::new(pending)));
    }
    if !status.is_success() {
        return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => ClientError::Api {
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: "http_error".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            },
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

/// One Castellan key as an alloy signer: use it in `EthereumWallet::from(…)`.
///
/// Bare-hash signing is not offered (`sign_hash` is unsupported): Castellan signs only payloads it
/// can judge against its policy.
#[derive(Clone, Debug)]
pub struct RemoteSigner {
    client: SignerClient,
    key: String,
    address: Address,
    chain_id: Option<ChainId>,
}

impl RemoteSigner {
    /// A signer for `key`, whose active version's address is read from the signer.
    pub async fn connect(
        client: SignerClient,
        key: &str,
        chain_id: Option<ChainId>,
    ) -> Result<Self, ClientError> {
        let view = client.key(key).await?;
        let active = view
            .versions
            .iter()
            .find(|v| v.status == "active")
            .ok_or_else(|| ClientError::Api {
                status: 404,
                code: "no_active_version".into(),
                message: format!("key {key} has no active version"),
            })?;
        Ok(Self {
            client,
            key: key.to_owned(),
            address: active.address,
            chain_id,
        })
    }

    fn check(&self, sig: &Signature, digest: &B256) -> Result<(), ClientError> {
        match sig.recover_address_from_prehash(digest) {
            Ok(a) if a == self.address => Ok(()),
            _ => Err(ClientError::BadSignature {
                expected: self.address,
            }),
        }
    }
}

fn signer_error(e: ClientError) -> alloy::signers::Error {
    alloy::signers::Error::other(e)
}

fn parse_sig(bytes: &[u8]) -> Result<Signature, alloy::signers::Error> {
    Signature::try_from(bytes).map_err(alloy::signers::Error::SignatureError)
}

/// The wire form of an alloy transaction being signed.
pub fn unsigned_tx(tx: &dyn SignableTransaction<Signature>) -> UnsignedTx {
    let ty = tx.ty();
    let eip1559 = ty >= 2;
    UnsignedTx {
        tx_type: Some(Quantity(u64::from(ty))),
        chain_id: Quantity(tx.chain_id().unwrap_or_default()),
        nonce: Quantity(tx.nonce()),
        to: tx.to().map(CheckedAddress),
        value: Some(Wei(tx.value())),
        input: Some(tx.input().clone()),
        gas: Quantity(tx.gas_limit()),
        max_fee_per_gas: eip1559.then(|| Wei(alloy::primitives::U256::from(tx.max_fee_per_gas()))),
        max_priority_fee_per_gas: if eip1559 {
            tx.max_priority_fee_per_gas()
                .map(|p| Wei(alloy::primitives::U256::from(p)))
        } else {
            None
        },
        gas_price: if eip1559 {
            None
        } else {
            tx.gas_price()
                .map(|p| Wei(alloy::primitives::U256::from(p)))
        },
        access_list: if ty == 0 {
            None
        } else {
            tx.access_list().cloned()
        },
    }
}

#[async_trait::async_trait]
impl alloy::network::TxSigner<Signature> for RemoteSigner {
    fn address(&self) -> Address {
        self.address
    }

    async fn sign_transaction(
        &self,
        tx: &mut dyn SignableTransaction<Signature>,
    ) -> alloy::signers::Result<Signature> {
        if let (Some(ours), Some(theirs)) = (self.chain_id, tx.chain_id())
            && ours != theirs
        {
            return Err(alloy::signers::Error::TransactionChainIdMismatch {
                signer: ours,
                tx: theirs,
            });
        }
        if tx.chain_id().is_none()
            && let Some(id) = self.chain_id
        {
            tx.set_chain_id_checked(id);
        }
        let wire = unsigned_tx(tx);
        let resp = self
            .client
            .sign_transaction(&self.key, wire)
            .await
            .map_err(signer_error)?;
        let sig = parse_sig(&resp.signature)?;
        self.check(&sig, &tx.signature_hash())
            .map_err(signer_error)?;
        Ok(sig)
    }
}

#[async_trait::async_trait]
impl alloy::signers::Signer<Signature> for RemoteSigner {
    async fn sign_hash(&self, _hash: &B256) -> alloy::signers::Result<Signature> {
        Err(alloy::signers::Error::UnsupportedOperation(
            alloy::signers::UnsupportedSignerOperation::SignHash,
        ))
    }

    async fn sign_message(&self, message: &[u8]) -> alloy::signers::Result<Signature> {
        let resp = self
            .client
            .sign_message(&self.key, message)
            .await
            .map_err(signer_error)?;
        let sig = parse_sig(&resp.signature)?;
        self.check(&sig, &eip191_hash_message(message))
            .map_err(signer_error)?;
        Ok(sig)
    }

    async fn sign_dynamic_typed_data(
        &self,
        payload: &TypedData,
    ) -> alloy::signers::Result<Signature> {
        let digest = payload.eip712_signing_hash()?;
        let resp = self
            .client
            .sign_typed_data(&self.key, payload)
            .await
            .map_err(signer_error)?;
        let sig = parse_sig(&resp.signature)?;
        self.check(&sig, &digest).map_err(signer_error)?;
        Ok(sig)
    }

    fn address(&self) -> Address {
        self.address
    }

    fn chain_id(&self) -> Option<ChainId> {
        self.chain_id
    }

    fn set_chain_id(&mut self, chain_id: Option<ChainId>) {
        self.chain_id = chain_id;
    }
}

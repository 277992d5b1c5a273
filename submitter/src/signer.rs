//! The signer as seen from the submitter, over the signer's mTLS API (`castellan_api::client`):
//! relay-auth signatures (`POST /v1/relay-auth`) and outcome reports (`POST /v1/outcomes`).

use std::time::Duration;

use alloy::primitives::B256;
use castellan_api::client::SignerClient;
use castellan_api::signer::{RelayAuthRequest, RelayAuthResponse};
use castellan_api::submitter::BundleOutcome;
use castellan_api::tls::ClientTlsConfig;
use serde::Deserialize;

use crate::Error;
use crate::auth::{AuthError, BoxFuture, RelayAuthSignature, RelayAuthSigner};
use crate::engine::OutcomeSink;

/// `[signer]` in `submitter.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerConfig {
    /// Base URL of the signer's API, e.g. `https://signer.internal:8443`.
    pub url: String,
    /// This submitter's client certificate and the CA of the signer's server certificate.
    pub tls: ClientTlsConfig,
}

/// Builds the mTLS client of the signer.
pub fn client(config: &SignerConfig) -> Result<SignerClient, Error> {
    crate::relay::install_crypto_provider();
    SignerClient::new(config.url.clone(), &config.tls).map_err(|e| Error::Http(e.to_string()))
}

/// Relay-auth signatures made by the signer's relay-auth key.
///
/// # Security
/// The signer's answer is not trusted blindly: [`crate::auth::flashbots_signature`] checks that
/// it recovers to the address the signer named before any header is sent.
#[derive(Clone, Debug)]
pub struct SignerRelayAuth {
    client: SignerClient,
}

impl SignerRelayAuth {
    /// Over an mTLS client of the signer.
    pub fn new(client: SignerClient) -> Self {
        Self { client }
    }
}

impl RelayAuthSigner for SignerRelayAuth {
    fn sign_body_hash(
        &self,
        body_hash: B256,
    ) -> BoxFuture<'_, Result<RelayAuthSignature, AuthError>> {
        Box::pin(async move {
            let answer: RelayAuthResponse = self
                .client
                .post("/v1/relay-auth", &RelayAuthRequest { body_hash })
                .await
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
            let signature: [u8; 65] = answer
                .signature
                .as_ref()
                .try_into()
                .map_err(|_| AuthError::Unavailable("the signature is not 65 bytes".into()))?;
            Ok(RelayAuthSignature {
                address: answer.address,
                signature,
            })
        })
    }
}

/// Outcome reports to the signer (its breaker counts failed outcomes per key).
#[derive(Clone, Debug)]
pub struct SignerOutcomes {
    client: SignerClient,
}

impl SignerOutcomes {
    /// Over an mTLS client of the signer.
    pub fn new(client: SignerClient) -> Self {
        Self { client }
    }
}

/// Attempts at delivering one outcome, and the pause before each retry.
const OUTCOME_RETRIES: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(5),
];

impl OutcomeSink for SignerOutcomes {
    fn report(&self, outcome: BundleOutcome) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for pause in std::iter::once(Duration::ZERO).chain(OUTCOME_RETRIES) {
                tokio::time::sleep(pause).await;
                let sent: Result<serde_json::Value, _> =
                    self.client.post("/v1/outcomes", &outcome).await;
                match sent {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(bundle = %outcome.bundle_id, error = %e, "outcome report failed")
                    }
                }
            }
            tracing::error!(bundle = %outcome.bundle_id, outcome = ?outcome.outcome, "outcome not delivered to the signer");
        })
    }
}

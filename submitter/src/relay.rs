//! Relay adapters. One [`Relay`] per configured endpoint owns its field mapping (Flashbots
//! family, bloXroute, plain node RPC), its auth header, its response parser, its timeout, its
//! token bucket and its health. Each request body is serialized once; those exact bytes are
//! signed (Flashbots family) and sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy::primitives::{B256, Bytes, keccak256};
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use castellan_api::submitter::{BreakerState, RelayHealth, SimulationReport};

use crate::Error;
use crate::auth::{FLASHBOTS_SIGNATURE_HEADER, RelayAuthSigner, flashbots_signature};
use crate::bundle::ValidBundle;
use crate::config::{CancelStyle, HealthConfig, RelayKind, RelaySpec, ReplacementOrdering};
use crate::health::{Health, Skip};
use crate::metrics::{LatencyLabels, Metrics, RelayLabels};
use crate::wire::{
    self, BlxrPrivateTx, BlxrSimulateBundle, BlxrSubmitBundle, CallBundleParams,
    CancelBundleParams, HexU64, RpcAnswer, SendBundleParams,
};

/// Longest back-off honoured from a `Retry-After` header.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Back-off after a 429 without `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What became of one request to a relay.
#[derive(Clone, Debug, PartialEq)]
pub enum SendResult {
    /// The relay accepted it.
    Accepted {
        /// Hash it returned, if any.
        hash: Option<String>,
        /// Response body (truncated).
        response: String,
        /// Round-trip time.
        latency: Duration,
    },
    /// The relay answered with a JSON-RPC error (it is up; the request was refused).
    Rejected {
        /// Error code.
        code: Option<i64>,
        /// Error message.
        message: String,
        /// Round-trip time.
        latency: Duration,
    },
    /// HTTP 429.
    Throttled {
        /// `Retry-After`, when given.
        retry_after: Option<Duration>,
        /// Round-trip time.
        latency: Duration,
    },
    /// Timeout, transport error, 5xx, unparseable answer.
    Failed {
        /// What went wrong.
        reason: String,
        /// Round-trip time, when there was an answer.
        latency: Option<Duration>,
        /// Whether a retry may help (5xx, connection reset) before the target block passes.
        transient: bool,
    },
    /// Not sent.
    Skipped(Skip),
}

impl SendResult {
    /// Stable label for metrics and status.
    pub fn label(&self) -> &'static str {
        match self {
            SendResult::Accepted { .. } => "accepted",
            SendResult::Rejected { .. } => "rejected",
            SendResult::Throttled { .. } => "throttled",
            SendResult::Failed { .. } => "failed",
            SendResult::Skipped(s) => s.label(),
        }
    }

    /// Latency, when the request went out and came back.
    pub fn latency(&self) -> Option<Duration> {
        match self {
            SendResult::Accepted { latency, .. }
            | SendResult::Rejected { latency, .. }
            | SendResult::Throttled { latency, .. } => Some(*latency),
            SendResult::Failed { latency, .. } => *latency,
            SendResult::Skipped(_) => None,
        }
    }
}

/// One relay endpoint.
pub struct Relay {
    spec: RelaySpec,
    client: reqwest::Client,
    health: Mutex<Health>,
    auth: Option<Arc<dyn RelayAuthSigner>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Installs rustls' ring provider as the process default once (reqwest is built with
/// `rustls-no-provider`; aws-lc is kept out of the build).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first (by the lead's TLS module, say): fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Relay {
    /// Builds the adapter and its keep-alive HTTP client.
    ///
    /// A relay that signs needs `auth`; building one without it is a configuration error.
    pub fn new(
        spec: RelaySpec,
        health: HealthConfig,
        auth: Option<Arc<dyn RelayAuthSigner>>,
        metrics: Metrics,
    ) -> Result<Self, Error> {
        install_crypto_provider();
        if spec.sign && auth.is_none() {
            return Err(Error::Config(format!(
                "relay {:?} signs requests but no relay-auth signer is configured",
                spec.name
            )));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(spec.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(28))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Http(e.to_string()))?;
        let name = spec.name.clone();
        let relay = Self {
            health: Mutex::new(Health::new(
                health,
                spec.rate_per_second,
                spec.burst,
                Instant::now(),
            )),
            spec,
            client,
            auth,
            metrics,
        };
        relay
            .metrics
            .breaker
            .get_or_create(&RelayLabels { relay: name })
            .set(0);
        Ok(relay)
    }

    /// The relay's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The relay's settings.
    pub fn spec(&self) -> &RelaySpec {
        &self.spec
    }

    /// Whether it can cancel.
    pub fn can_cancel(&self) -> bool {
        self.spec.cancel != CancelStyle::None
    }

    /// Health view.
    pub fn health_view(&self) -> RelayHealth {
        let now = Instant::now();
        self.lock_health().view(&self.spec.name, now)
    }

    /// Whether it is available for weighted selection, and its rank.
    pub fn rank(&self) -> Option<(f64, f64)> {
        let h = self.lock_health();
        h.is_available(Instant::now()).then(|| h.score())
    }

    /// Sends `bundle` for `target` (`eth_sendBundle`, `blxr_submit_bundle`, or each tx with
    /// `eth_sendRawTransaction` for an rpc relay).
    pub async fn send_bundle(
        &self,
        bundle: &ValidBundle,
        target: u64,
        signatures: Option<&SignatureCache>,
    ) -> SendResult {
        match self.spec.kind {
            RelayKind::Rpc => self.send_raw_txs(&bundle.txs).await,
            RelayKind::Bloxroute => {
                let params = self.blxr_bundle(bundle, target, false);
                self.call("blxr_submit_bundle", params).await
            }
            RelayKind::Flashbots | RelayKind::Builder | RelayKind::Eden => {
                let params = self.fb_bundle(bundle, target, &bundle.txs);
                self.call_with("eth_sendBundle", [params], self.spec.timeout, signatures)
                    .await
                    .0
            }
        }
    }

    /// Simulates `bundle` at `target` on latest state; `None` if this relay does not simulate.
    pub async fn simulate(
        &self,
        bundle: &ValidBundle,
        target: u64,
    ) -> Option<Result<SimulationReport, SendResult>> {
        if !self.spec.simulate {
            return None;
        }
        let result = match self.spec.kind {
            RelayKind::Rpc => return None,
            RelayKind::Bloxroute => {
                let params = BlxrSimulateBundle {
                    transaction: bundle.txs.iter().map(wire::hex_no_prefix).collect(),
                    block_number: HexU64(target),
                    state_block_number: "latest",
                    timestamp: None,
                };
                self.call_with("blxr_simulate_bundle", params, self.spec.sim_timeout, None)
                    .await
            }
            RelayKind::Flashbots | RelayKind::Builder | RelayKind::Eden => {
                let params = CallBundleParams {
                    txs: &bundle.txs,
                    block_number: HexU64(target),
                    state_block_number: "latest",
                    timestamp: None,
                };
                self.call_with("eth_callBundle", [params], self.spec.sim_timeout, None)
                    .await
            }
        };
        Some(match result {
            (SendResult::Accepted { .. }, Some(value)) => match wire::parse_simulation(&value) {
                Some(parsed) => {
                    let ok = parsed.results.iter().all(|r| {
                        (r.error.is_none() && r.revert.is_none())
                            || bundle.reverting.contains(&r.tx_hash)
                    });
                    Ok(SimulationReport {
                        relay: self.spec.name.clone(),
                        ok,
                        results: parsed.results,
                        error: None,
                    })
                }
                None => Err(SendResult::Failed {
                    reason: "unparseable simulation result".into(),
                    latency: None,
                    transient: false,
                }),
            },
            // A whole-call error (`err: nonce too low: …`) is a simulation verdict.
            (SendResult::Rejected { code, message, .. }, _) => Ok(SimulationReport {
                relay: self.spec.name.clone(),
                ok: false,
                results: Vec::new(),
                error: Some(match code {
                    Some(c) => format!("{c}: {message}"),
                    None => message,
                }),
            }),
            (other, _) => Err(other),
        })
    }

    /// Cancels `bundle` (`eth_cancelBundle`, or an empty resend with its uuid for `target`);
    /// `None` if this relay cannot cancel.
    pub async fn cancel(&self, bundle: &ValidBundle, target: u64) -> Option<SendResult> {
        match (self.spec.cancel, self.spec.kind) {
            (CancelStyle::None, _) | (_, RelayKind::Rpc) => None,
            (CancelStyle::EthCancelBundle, _) => {
                let params = CancelBundleParams {
                    replacement_uuid: bundle.replacement_uuid,
                };
                Some(self.call("eth_cancelBundle", [params]).await)
            }
            (CancelStyle::EmptyTxs, RelayKind::Bloxroute) => {
                let params = self.blxr_bundle(bundle, target, true);
                Some(self.call("blxr_submit_bundle", params).await)
            }
            (CancelStyle::EmptyTxs, _) => {
                let params = self.fb_bundle(bundle, target, &[]);
                Some(self.call("eth_sendBundle", [params]).await)
            }
        }
    }

    /// Sends one signed transaction privately (`eth_sendPrivateRawTransaction`,
    /// `blxr_private_tx`, or `eth_sendRawTransaction` for an rpc relay).
    pub async fn send_private_raw_transaction(&self, raw: &Bytes) -> SendResult {
        match self.spec.kind {
            RelayKind::Rpc => self.call("eth_sendRawTransaction", [raw]).await,
            RelayKind::Bloxroute => {
                let params = BlxrPrivateTx {
                    transaction: wire::hex_no_prefix(raw),
                    mev_builders: self.mev_builders(),
                };
                self.call("blxr_private_tx", params).await
            }
            RelayKind::Flashbots | RelayKind::Builder | RelayKind::Eden => {
                self.call("eth_sendPrivateRawTransaction", [raw]).await
            }
        }
    }

    /// Records a result in the relay's health and metrics (called by `call` and by the
    /// engine's skip paths).
    fn record(&self, method: &str, result: &SendResult) {
        let now = Instant::now();
        let (state, failures) = {
            let mut h = self.lock_health();
            match result {
                SendResult::Accepted { latency, .. } | SendResult::Rejected { latency, .. } => {
                    h.record_success(*latency)
                }
                SendResult::Throttled {
                    retry_after,
                    latency,
                } => {
                    let wait = retry_after
                        .unwrap_or(DEFAULT_RETRY_AFTER)
                        .min(MAX_RETRY_AFTER);
                    h.record_throttled(*latency, now + wait, now);
                }
                SendResult::Failed { latency, .. } => h.record_failure(*latency, now),
                SendResult::Skipped(_) => {}
            }
            let view = h.view(&self.spec.name, now);
            (view.breaker, view.consecutive_failures)
        };
        let labels = RelayLabels {
            relay: self.spec.name.clone(),
        };
        self.metrics
            .breaker
            .get_or_create(&labels)
            .set(match state {
                BreakerState::Closed => 0,
                BreakerState::Open => 1,
                BreakerState::HalfOpen => 2,
            });
        self.metrics
            .consecutive_failures
            .get_or_create(&labels)
            .set(i64::from(failures));
        self.metrics
            .request(&self.spec.name, method, result.label());
        if let Some(l) = result.latency() {
            self.metrics
                .latency
                .get_or_create(&LatencyLabels {
                    relay: self.spec.name.clone(),
                    method: method.to_owned(),
                })
                .observe(l.as_secs_f64());
        }
    }

    async fn call<P: serde::Serialize>(&self, method: &str, params: P) -> SendResult {
        self.call_with(method, params, self.spec.timeout, None)
            .await
            .0
    }

    /// Admits, serializes once, signs those bytes if needed, posts, parses, records.
    async fn call_with<P: serde::Serialize>(
        &self,
        method: &str,
        params: P,
        timeout: Duration,
        signatures: Option<&SignatureCache>,
    ) -> (SendResult, Option<Value>) {
        let admitted = self.lock_health().admit(Instant::now());
        if let Err(skip) = admitted {
            let result = SendResult::Skipped(skip);
            self.record(method, &result);
            return (result, None);
        }
        // One request per HTTP POST: the id only has to be echoed. A constant id makes the
        // bodies of relays with the same options identical, so one signature serves them all.
        let id = match self.spec.kind {
            RelayKind::Bloxroute => json!("1"),
            _ => json!(1),
        };
        let (result, value) = match wire::encode(id, method, params) {
            Ok(body) => self.post(body, timeout, signatures).await,
            Err(e) => (
                SendResult::Failed {
                    reason: format!("encode: {e}"),
                    latency: None,
                    transient: false,
                },
                None,
            ),
        };
        self.record(method, &result);
        (result, value)
    }

    async fn post(
        &self,
        body: Vec<u8>,
        timeout: Duration,
        signatures: Option<&SignatureCache>,
    ) -> (SendResult, Option<Value>) {
        let mut request = self
            .client
            .post(self.spec.url.clone())
            .timeout(timeout)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.spec.sign {
            let Some(auth) = &self.auth else {
                return (failed("no relay-auth signer", None, false), None);
            };
            let header = match signatures {
                Some(cache) => cache.header(auth.as_ref(), &body).await,
                None => flashbots_signature(auth.as_ref(), &body)
                    .await
                    .map_err(|e| e.to_string()),
            };
            match header {
                Ok(header) => request = request.header(FLASHBOTS_SIGNATURE_HEADER, header),
                Err(e) => return (failed(&format!("relay auth: {e}"), None, true), None),
            }
        }
        if let Some(secret) = &self.spec.auth_header {
            match HeaderValue::from_str(secret.expose_secret()) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    request = request.header(reqwest::header::AUTHORIZATION, v);
                }
                Err(_) => {
                    return (
                        failed("authorization value is not a valid header", None, false),
                        None,
                    );
                }
            }
        }
        let started = Instant::now();
        let response = match request.body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                let reason = if e.is_timeout() {
                    "timeout".to_owned()
                } else if e.is_connect() {
                    "connect error".to_owned()
                } else {
                    format!("transport: {e}")
                };
                // A timeout already used the time: retrying it would risk crossing the block.
                return (failed(&reason, None, !e.is_timeout()), None);
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                let reason = if e.is_timeout() {
                    "timeout".to_owned()
                } else {
                    format!("body: {e}")
                };
                return (failed(&reason, Some(started.elapsed()), false), None);
            }
        };
        classify_answer(
            status.as_u16(),
            retry_after.as_deref(),
            &bytes,
            started.elapsed(),
        )
    }

    async fn send_raw_txs(&self, txs: &[Bytes]) -> SendResult {
        let mut last = None;
        for raw in txs {
            let result = self.call("eth_sendRawTransaction", [raw]).await;
            match &result {
                SendResult::Accepted { .. } => last = Some(result),
                // A resend for the next block finds the tx already in the pool: not an error.
                SendResult::Rejected {
                    message, latency, ..
                } if message.contains("already known") || message.contains("already imported") => {
                    last = Some(SendResult::Accepted {
                        hash: None,
                        response: message.clone(),
                        latency: *latency,
                    });
                }
                _ => return result,
            }
        }
        last.unwrap_or(SendResult::Skipped(Skip::RateLimited))
    }

    fn fb_bundle<'a>(
        &'a self,
        bundle: &'a ValidBundle,
        target: u64,
        txs: &'a [Bytes],
    ) -> SendBundleParams<'a> {
        let ordering = self.spec.replacement_ordering.map(|_| unix_micros());
        SendBundleParams {
            txs,
            block_number: HexU64(target),
            min_timestamp: bundle.min_timestamp,
            max_timestamp: bundle.max_timestamp,
            reverting_tx_hashes: if txs.is_empty() {
                &[]
            } else {
                &bundle.reverting
            },
            replacement_uuid: Some(bundle.replacement_uuid),
            replacement_nonce: ordering.filter(|_| {
                self.spec.replacement_ordering == Some(ReplacementOrdering::ReplacementNonce)
            }),
            replacement_seq_number: ordering.filter(|_| {
                self.spec.replacement_ordering == Some(ReplacementOrdering::ReplacementSeqNumber)
            }),
            builders: &self.spec.builders,
        }
    }

    fn blxr_bundle(&self, bundle: &ValidBundle, target: u64, cancel: bool) -> BlxrSubmitBundle {
        BlxrSubmitBundle {
            transaction: if cancel {
                Vec::new()
            } else {
                bundle.txs.iter().map(wire::hex_no_prefix).collect()
            },
            block_number: HexU64(target),
            min_timestamp: bundle.min_timestamp,
            max_timestamp: bundle.max_timestamp,
            reverting_hashes: if cancel {
                Vec::new()
            } else {
                bundle.reverting.clone()
            },
            uuid: Some(bundle.replacement_uuid),
            mev_builders: self.mev_builders(),
        }
    }

    fn mev_builders(&self) -> serde_json::Map<String, Value> {
        self.spec
            .mev_builders
            .iter()
            .map(|b| (b.clone(), json!("")))
            .collect()
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        // A poisoned lock only means another task panicked mid-update of plain counters;
        // the numbers are still usable.
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Signatures made during one fan-out round, by body hash: relays whose bodies are byte-identical
/// share one relay-auth signature instead of asking the signer once each.
#[derive(Default)]
pub struct SignatureCache {
    cells: Mutex<HashMap<B256, Arc<tokio::sync::OnceCell<String>>>>,
}

impl SignatureCache {
    /// The `X-Flashbots-Signature` value for `body`, signed at most once per distinct body.
    pub async fn header(
        &self,
        signer: &dyn RelayAuthSigner,
        body: &[u8],
    ) -> Result<String, String> {
        let hash = keccak256(body);
        let cell = {
            let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
            cells.entry(hash).or_default().clone()
        };
        // Failures are not cached: a retry asks the signer again.
        cell.get_or_try_init(|| async {
            flashbots_signature(signer, body)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .cloned()
    }
}

/// What a relay's HTTP answer means: its status, `Retry-After` header (when present and text) and
/// body, classified into a [`SendResult`] and the JSON-RPC `result` value (only when accepted).
///
/// Pure (no I/O): every relay answer goes through it, and the fuzz target `relay_response` and
/// `submitter/tests/prop_relay.rs` feed it hostile answers. 429 (or a JSON-RPC `Rate limited`
/// error) is `Throttled`, 5xx a transient `Failed`, a JSON-RPC `result` `Accepted`, an `error`
/// `Rejected`, anything else a non-transient `Failed`.
pub fn classify_answer(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    latency: Duration,
) -> (SendResult, Option<Value>) {
    let retry_after = retry_after
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    if status == 429 {
        return (
            SendResult::Throttled {
                retry_after,
                latency,
            },
            None,
        );
    }
    if (500..600).contains(&status) {
        return (
            SendResult::Failed {
                reason: format!("HTTP {status}: {}", wire::snippet(body)),
                latency: Some(latency),
                transient: true,
            },
            None,
        );
    }
    match wire::parse_answer(body) {
        RpcAnswer::Result { hash, value } => (
            SendResult::Accepted {
                hash,
                response: wire::snippet(body),
                latency,
            },
            Some(value),
        ),
        // FlowProxy reports its rate limit as a JSON-RPC error too.
        RpcAnswer::Error { message, .. } if message == "Rate limited" => (
            SendResult::Throttled {
                retry_after,
                latency,
            },
            None,
        ),
        RpcAnswer::Error { code, message } => (
            SendResult::Rejected {
                code,
                message: format!("{}{message}", status_prefix(status)),
                latency,
            },
            None,
        ),
        RpcAnswer::Garbage(text) => (
            SendResult::Failed {
                reason: format!("unparseable answer (HTTP {status}): {text}"),
                latency: Some(latency),
                transient: false,
            },
            None,
        ),
    }
}

fn failed(reason: &str, latency: Option<Duration>, transient: bool) -> SendResult {
    SendResult::Failed {
        reason: reason.to_owned(),
        latency,
        transient,
    }
}

fn status_prefix(status: u16) -> String {
    if (200..300).contains(&status) {
        String::new()
    } else {
        format!("HTTP {status}: ")
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

//! Ethereum JSON-RPC at `/rpc`, so that existing wallets and tools use the signer as a remote
//! wallet over mTLS (as Web3Signer and Clef do).
//!
//! - Signing methods (`eth_accounts`, `eth_chainId`, `eth_signTransaction`, `eth_sign`,
//!   `personal_sign`, `eth_signTypedData_v4`, `eth_sendTransaction`) go through the same pipeline
//!   as the `/v1` routes: identity, policy, durable decision, HSM, audit.
//! - A fixed list of read-only methods is forwarded to the configured upstream node; anything
//!   else is refused (`-32601`). Nothing unsigned is ever forwarded, and the signer does not relay
//!   other people's raw transactions (`eth_sendRawTransaction` is refused).
//! - Answers from the node (nonce, gas, fees used to fill a transaction) are untrusted: the filled
//!   transaction is judged by the policy like any other.

use std::sync::Arc;

use alloy::consensus::TypedTransaction;
use alloy::primitives::{Address, Bytes};
use alloy::rpc::types::TransactionRequest;
use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use castellan_api::serve::Peer;
use castellan_api::submitter::Role;
use serde_json::{Value, json};

use super::routes::{ApiJson, Job, authenticate, eth_error, request_id, run};
use super::{ApiError, Caller, Signer};
use crate::backend::KeyBackend;
use crate::store::Store;

/// Read-only methods forwarded to the upstream node.
pub const FORWARDED: &[&str] = &[
    "eth_blockNumber",
    "eth_call",
    "eth_estimateGas",
    "eth_feeHistory",
    "eth_gasPrice",
    "eth_getBalance",
    "eth_getBlockByHash",
    "eth_getBlockByNumber",
    "eth_getCode",
    "eth_getLogs",
    "eth_getStorageAt",
    "eth_getTransactionByHash",
    "eth_getTransactionCount",
    "eth_getTransactionReceipt",
    "eth_maxPriorityFeePerGas",
    "eth_syncing",
    "net_version",
    "web3_clientVersion",
];

/// Largest batch accepted.
const MAX_BATCH: usize = 64;

/// The trusted upstream node for read-only methods and for filling transactions.
#[derive(Clone, Debug)]
pub struct Upstream {
    url: String,
    http: reqwest::Client,
}

impl Upstream {
    /// An upstream at `url` with a per-call timeout.
    pub fn new(url: impl Into<String>, timeout: std::time::Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            url: url.into(),
            http,
        })
    }

    /// Calls `method` and returns the result, or the node's error object.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let body = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
        let resp = self
            .http
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| RpcError::new(-32002, format!("upstream node unreachable: {}", why(e))))?;
        let v: Value = resp.json().await.map_err(|e| {
            RpcError::new(
                -32002,
                format!("upstream node answered garbage: {}", why(e)),
            )
        })?;
        if let Some(err) = v.get("error") {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(-32000);
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error")
                .to_owned();
            return Err(RpcError {
                code,
                message,
                data: err.get("data").cloned(),
            });
        }
        v.get("result")
            .cloned()
            .ok_or_else(|| RpcError::new(-32002, "upstream node answered without a result"))
    }
}

/// What went wrong with a call to the upstream node, for the caller: reqwest's error without
/// the node's URL (it may carry an API key, as hosted nodes' URLs do) and with its causes ("error
/// sending request" alone does not tell a refused connection from one closed mid-call).
fn why(e: reqwest::Error) -> String {
    castellan_api::client::error_chain(&e.without_url())
}

/// A JSON-RPC error object.
#[derive(Debug, Clone)]
pub struct RpcError {
    code: i64,
    message: String,
    data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    fn to_json(&self) -> Value {
        let mut e = json!({ "code": self.code, "message": self.message });
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        e
    }
}

impl From<ApiError> for RpcError {
    /// EIP-1474 codes by class; the stable Castellan code travels in `data.code`.
    fn from(e: ApiError) -> Self {
        let code = match e.status.as_u16() {
            _ if e.code == "overloaded" => LIMIT_EXCEEDED,
            400 | 413 | 415 => -32602,
            401 | 403 | 409 | 422 => -32003,
            404 => -32001,
            429 => -32005,
            503 => -32002,
            _ => -32603,
        };
        Self {
            code,
            message: e.message.clone(),
            data: Some(json!({ "code": e.code, "details": e.details })),
        }
    }
}

/// EIP-1474 "limit exceeded": the code of an overload refusal (`data.code` `overloaded`).
pub const LIMIT_EXCEEDED: i64 = -32005;

/// The id of a refused request is looked for only in bodies up to this size (see [`peek_id`]).
pub const ID_PEEK_MAX: usize = 16 * 1024;

/// The JSON-RPC error object of an overload refusal: code [`LIMIT_EXCEEDED`], message
/// `overloaded: <reason>`, and in `data` the stable code and the refusal's details (limits,
/// `retryAfter` in seconds).
pub fn overload_error(e: &ApiError) -> Value {
    let retry_after = e
        .headers
        .iter()
        .find(|(n, _)| n == axum::http::header::RETRY_AFTER)
        .and_then(|(_, v)| v.parse::<u64>().ok());
    json!({
        "code": LIMIT_EXCEEDED,
        "message": format!("{}: {}", e.code, e.message),
        "data": { "code": e.code, "details": e.details, "retryAfter": retry_after },
    })
}

/// The ids a refusal answers: one request's, or each of a batch's.
#[derive(Debug, PartialEq)]
pub enum PeekedIds {
    /// One request (or a body that is neither a request nor a batch: id null).
    Single(Value),
    /// A batch: each request's id, in order (null where it has none or an invalid one).
    Batch(Vec<Value>),
}

/// The ids of the JSON-RPC request or batch in `body` (see [`peek_id`]); a batch that does not
/// parse as an array of objects is answered as one request with a null id, as JSON-RPC 2.0 asks
/// for an invalid batch.
pub fn peek_ids(body: &[u8]) -> PeekedIds {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Value,
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[') {
        return PeekedIds::Single(peek_id(body));
    }
    match serde_json::from_slice::<Vec<IdOnly>>(body) {
        Ok(items) if !items.is_empty() => PeekedIds::Batch(
            items
                .into_iter()
                .map(|i| match i.id {
                    id @ (Value::String(_) | Value::Number(_)) => id,
                    _ => Value::Null,
                })
                .collect(),
        ),
        _ => PeekedIds::Single(Value::Null),
    }
}

/// The `id` of a single JSON-RPC request in `body` when it is a valid id (string, number or
/// null), else null: for a batch, a body that is not JSON, or an id of another type. The rest of
/// the request is skipped without being built (no allocation but the id's).
pub fn peek_id(body: &[u8]) -> Value {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Value,
    }
    match serde_json::from_slice::<IdOnly>(body) {
        Ok(IdOnly {
            id: id @ (Value::String(_) | Value::Number(_)),
        }) => id,
        _ => Value::Null,
    }
}

/// `POST /rpc`: one JSON-RPC request or a batch.
pub(crate) async fn rpc<B: KeyBackend, S: Store>(
    State(s): State<Arc<Signer<B, S>>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    let rid = match request_id(&headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let caller = match authenticate(&s, peer, &rid, Role::Strategy).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let body = match body {
        Ok(ApiJson(v)) => v,
        Err(e) => {
            return axum::Json(json!({
                "jsonrpc": "2.0", "id": null,
                "error": { "code": -32700, "message": e.message }
            }))
            .into_response();
        }
    };
    match body {
        Value::Array(items) if items.is_empty() || items.len() > MAX_BATCH => axum::Json(json!({
            "jsonrpc": "2.0", "id": null,
            "error": { "code": -32600, "message": format!("a batch holds 1 to {MAX_BATCH} requests") }
        }))
        .into_response(),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                out.push(one(&s, &caller, &format!("{rid}-{i}"), item).await);
            }
            axum::Json(Value::Array(out)).into_response()
        }
        item => axum::Json(one(&s, &caller, &rid, item).await).into_response(),
    }
}

async fn one<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    caller: &Caller,
    rid: &str,
    item: Value,
) -> Value {
    let id = item.get("id").cloned().unwrap_or(Value::Null);
    let result = match (
        item.get("method").and_then(Value::as_str),
        item.get("jsonrpc").and_then(Value::as_str),
    ) {
        (Some(method), Some("2.0")) => {
            let params = item.get("params").cloned().unwrap_or(json!([]));
            dispatch(s, caller, rid, method, params).await
        }
        _ => Err(RpcError::new(
            -32600,
            "invalid request: jsonrpc must be \"2.0\" and method a string",
        )),
    };
    match result {
        Ok(v) => json!({ "jsonrpc": "2.0", "id": id, "result": v }),
        Err(e) => json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }),
    }
}

async fn dispatch<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    caller: &Caller,
    rid: &str,
    method: &str,
    params: Value,
) -> Result<Value, RpcError> {
    match method {
        "eth_chainId" => Ok(json!(format!("{:#x}", s.chain.chain_id()))),
        "eth_accounts" => Ok(json!(accounts(s, caller))),
        "eth_signTransaction" => {
            let tx = param_tx(&params)?;
            let (name, typed) = prepare_tx(s, caller, tx).await?;
            let body = sign_ok(
                run(
                    s,
                    caller,
                    &name,
                    rid,
                    Job::Transaction(Box::new(typed)),
                    Vec::new(),
                )
                .await,
            )?;
            Ok(body.get("raw").cloned().unwrap_or(Value::Null))
        }
        "eth_sendTransaction" => {
            let tx = param_tx(&params)?;
            let (name, typed) = prepare_tx(s, caller, tx).await?;
            let body = sign_ok(
                run(
                    s,
                    caller,
                    &name,
                    rid,
                    Job::Transaction(Box::new(typed)),
                    Vec::new(),
                )
                .await,
            )?;
            let raw: Bytes =
                serde_json::from_value(body.get("raw").cloned().unwrap_or(Value::Null))
                    .map_err(|e| RpcError::new(-32603, e.to_string()))?;
            let hash = body.get("hash").cloned().unwrap_or(Value::Null);
            s.forward_signed_transaction(&name, rid, raw)
                .await
                .map_err(RpcError::from)?;
            Ok(hash)
        }
        "eth_sign" => {
            // eth_sign(address, data): EIP-191 over the data bytes, as geth does.
            let (addr, data) = two(&params)?;
            let name = key_for(s, caller, &parse_addr(&addr)?)?;
            let bytes = parse_bytes(&data)?;
            signature_of(run(s, caller, &name, rid, Job::Message(bytes), Vec::new()).await)
        }
        "personal_sign" => {
            // personal_sign(data, address).
            let (data, addr) = two(&params)?;
            let name = key_for(s, caller, &parse_addr(&addr)?)?;
            let bytes = parse_bytes(&data)?;
            signature_of(run(s, caller, &name, rid, Job::Message(bytes), Vec::new()).await)
        }
        "eth_signTypedData_v4" | "eth_signTypedData" => {
            let (addr, data) = two(&params)?;
            let name = key_for(s, caller, &parse_addr(&addr)?)?;
            let text = match data {
                Value::String(t) => t,
                other => other.to_string(),
            };
            let typed =
                crate::eth::parse_typed_data(&text).map_err(|e| RpcError::from(eth_error(e)))?;
            s.chain
                .check_typed_data(&typed)
                .map_err(|e| RpcError::from(eth_error(e)))?;
            signature_of(
                run(
                    s,
                    caller,
                    &name,
                    rid,
                    Job::TypedData(Box::new(typed)),
                    Vec::new(),
                )
                .await,
            )
        }
        m if FORWARDED.contains(&m) => match &s.upstream {
            Some(u) => u.call(m, params).await,
            None => Err(RpcError::new(
                -32601,
                format!("{m} needs an upstream node, and none is configured"),
            )),
        },
        m => Err(RpcError::new(
            -32601,
            format!("method {m} is not offered by the signer"),
        )),
    }
}

fn sign_ok(r: Result<super::routes::Signed, ApiError>) -> Result<Value, RpcError> {
    match r {
        Ok((StatusCode::OK, body)) => Ok(body),
        Ok((_, body)) => Err(RpcError {
            code: -32003,
            message: format!(
                "the request waits for approvals (request id {})",
                body.get("requestId").and_then(Value::as_str).unwrap_or("?")
            ),
            data: Some(json!({ "code": "approvals_required", "details": body })),
        }),
        Err(e) => Err(e.into()),
    }
}

fn signature_of(r: Result<super::routes::Signed, ApiError>) -> Result<Value, RpcError> {
    let body = sign_ok(r)?;
    Ok(body.get("signature").cloned().unwrap_or(Value::Null))
}

/// Addresses of the active keys this caller may use.
fn accounts<B: KeyBackend, S: Store>(s: &Signer<B, S>, caller: &Caller) -> Vec<Address> {
    let keys = match s.keys.read() {
        Ok(k) => k,
        Err(p) => p.into_inner(),
    };
    let mut out: Vec<(String, Address)> = keys
        .iter()
        .filter(|(name, _)| caller.grants.may_use(name))
        .flat_map(|(name, versions)| {
            versions
                .iter()
                .filter(|v| matches!(v.record.status, crate::store::KeyStatus::Active))
                .map(move |v| (name.clone(), v.record.address))
        })
        .collect();
    out.sort();
    out.into_iter().map(|(_, a)| a).collect()
}

/// The key name whose active version has `address`, if the caller may use it.
fn key_for<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    caller: &Caller,
    address: &Address,
) -> Result<String, RpcError> {
    let keys = match s.keys.read() {
        Ok(k) => k,
        Err(p) => p.into_inner(),
    };
    keys.iter()
        .find(|(name, versions)| {
            caller.grants.may_use(name)
                && versions.iter().any(|v| {
                    matches!(v.record.status, crate::store::KeyStatus::Active)
                        && v.record.address == *address
                })
        })
        .map(|(name, _)| name.clone())
        .ok_or_else(|| {
            RpcError::new(
                -32003,
                format!("{address} is not an active key this identity may use"),
            )
        })
}

fn param_tx(params: &Value) -> Result<TransactionRequest, RpcError> {
    let first = params
        .get(0)
        .cloned()
        .ok_or_else(|| RpcError::new(-32602, "expected [transaction]"))?;
    serde_json::from_value(first).map_err(|e| RpcError::new(-32602, format!("transaction: {e}")))
}

/// Fills what the wallet left out from the upstream node, then builds the typed transaction.
async fn prepare_tx<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    caller: &Caller,
    mut tx: TransactionRequest,
) -> Result<(String, TypedTransaction), RpcError> {
    let from = tx
        .from
        .ok_or_else(|| RpcError::new(-32602, "transaction.from is required"))?;
    let name = key_for(s, caller, &from)?;
    if tx.chain_id.is_none() {
        tx.chain_id = Some(s.chain.chain_id());
    }
    let needs_node = tx.nonce.is_none()
        || tx.gas.is_none()
        || (tx.gas_price.is_none() && tx.max_fee_per_gas.is_none());
    if needs_node {
        let Some(up) = &s.upstream else {
            return Err(RpcError::new(
                -32602,
                "nonce, gas and fees are required when no upstream node is configured",
            ));
        };
        if tx.nonce.is_none() {
            let n = up
                .call("eth_getTransactionCount", json!([from, "pending"]))
                .await?;
            tx.nonce = Some(quantity_u64(&n)?);
        }
        if tx.gas.is_none() {
            let mut probe =
                serde_json::to_value(&tx).map_err(|e| RpcError::new(-32603, e.to_string()))?;
            if let Some(o) = probe.as_object_mut() {
                o.remove("nonce");
            }
            let g = up.call("eth_estimateGas", json!([probe])).await?;
            tx.gas = Some(quantity_u64(&g)?);
        }
        if tx.gas_price.is_none() && tx.max_fee_per_gas.is_none() {
            let block = up
                .call("eth_getBlockByNumber", json!(["latest", false]))
                .await?;
            let base = block
                .get("baseFeePerGas")
                .map(quantity_u128)
                .transpose()?
                .unwrap_or(0);
            let tip = match tx.max_priority_fee_per_gas {
                Some(t) => t,
                None => quantity_u128(&up.call("eth_maxPriorityFeePerGas", json!([])).await?)?,
            };
            tx.max_priority_fee_per_gas = Some(tip);
            tx.max_fee_per_gas = Some(base.saturating_mul(2).saturating_add(tip));
        }
    }
    let typed = tx
        .build_consensus_tx()
        .map_err(|e| RpcError::new(-32602, format!("incomplete transaction: {}", e.error)))?;
    s.chain
        .check_transaction(&typed)
        .map_err(|e| RpcError::from(eth_error(e)))?;
    Ok((name, typed))
}

fn quantity_u64(v: &Value) -> Result<u64, RpcError> {
    let s = v
        .as_str()
        .ok_or_else(|| RpcError::new(-32002, "upstream node answered a non-quantity"))?;
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| RpcError::new(-32002, format!("upstream node answered {s:?}")))
}

fn quantity_u128(v: &Value) -> Result<u128, RpcError> {
    let s = v
        .as_str()
        .ok_or_else(|| RpcError::new(-32002, "upstream node answered a non-quantity"))?;
    u128::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| RpcError::new(-32002, format!("upstream node answered {s:?}")))
}

fn two(params: &Value) -> Result<(Value, Value), RpcError> {
    match params.as_array().map(Vec::as_slice) {
        Some([a, b, ..]) => Ok((a.clone(), b.clone())),
        _ => Err(RpcError::new(-32602, "expected two parameters")),
    }
}

fn parse_addr(v: &Value) -> Result<Address, RpcError> {
    let s = v
        .as_str()
        .ok_or_else(|| RpcError::new(-32602, "address must be a string"))?;
    castellan_api::signer::parse_address(s).map_err(|e| RpcError::new(-32602, e))
}

fn parse_bytes(v: &Value) -> Result<Vec<u8>, RpcError> {
    let s = v
        .as_str()
        .ok_or_else(|| RpcError::new(-32602, "data must be a 0x-hex string"))?;
    let hex = s
        .strip_prefix("0x")
        .ok_or_else(|| RpcError::new(-32602, "data must be a 0x-hex string"))?;
    alloy::hex::decode(hex).map_err(|e| RpcError::new(-32602, format!("data: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_refusal_answers_each_id_of_a_batch_and_null_for_an_invalid_one() {
        assert_eq!(
            peek_ids(br#" [{"jsonrpc":"2.0","id":7,"method":"eth_chainId"},{"id":"a"},{"x":1},{"id":{}}]"#),
            PeekedIds::Batch(vec![json!(7), json!("a"), Value::Null, Value::Null])
        );
        assert_eq!(
            peek_ids(br#"{"jsonrpc":"2.0","id":"x","method":"eth_chainId"}"#),
            PeekedIds::Single(json!("x"))
        );
        // Invalid batches (empty, not objects, not JSON) are answered as one request.
        for body in [&b"[]"[..], b"[1,2]", b"[{\"id\":1}", b"nonsense"] {
            assert_eq!(peek_ids(body), PeekedIds::Single(Value::Null), "{body:?}");
        }
    }

    #[test]
    fn the_id_of_a_refused_request() {
        assert_eq!(peek_id(br#"{"jsonrpc":"2.0","id":7,"method":"personal_sign","params":["0x01",{"a":[1,2]}]}"#), json!(7));
        assert_eq!(
            peek_id(br#"{"method":"eth_sign","id":"abc"}"#),
            json!("abc")
        );
        assert_eq!(peek_id(br#"{"method":"eth_sign"}"#), Value::Null);
        assert_eq!(peek_id(br#"{"id":{"x":1}}"#), Value::Null);
        assert_eq!(peek_id(br#"[{"id":1}]"#), Value::Null);
        assert_eq!(peek_id(b"not json"), Value::Null);
        assert_eq!(peek_id(br#"{"id":1,"id":2}"#), Value::Null);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_reported_without_its_url() {
        // As main does (reqwest is built without a TLS provider of its own).
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A port nothing listens on: bound, then closed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let up = Upstream::new(
            format!("http://{addr}/v3/secret-api-key"),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        let e = up.call("eth_blockNumber", json!([])).await.unwrap_err();
        assert_eq!(e.code, -32002);
        assert!(
            e.message
                .starts_with("upstream node unreachable: error sending request"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("secret-api-key"), "{}", e.message);
        assert!(!e.message.contains(&addr.to_string()), "{}", e.message);
        // The cause is told.
        assert!(e.message.len() > "upstream node unreachable: error sending request".len());
    }

    #[test]
    fn an_overload_refusal_is_limit_exceeded() {
        let e = ApiError::unavailable("overloaded", "the signer is saturated", 1)
            .with_details(json!({ "maxInFlight": 4 }));
        let v = overload_error(&e);
        assert_eq!(v["code"], LIMIT_EXCEEDED);
        assert_eq!(v["message"], "overloaded: the signer is saturated");
        assert_eq!(v["data"]["code"], "overloaded");
        assert_eq!(v["data"]["details"]["maxInFlight"], 4);
        assert_eq!(v["data"]["retryAfter"], 1);
        assert_eq!(RpcError::from(e).code, LIMIT_EXCEEDED);
    }
}

//! Request bodies and tolerant response parsers for every relay format (relays.md §1, §3, §5,
//! §7). Our own serde types where alloy's put the wrong JSON on the wire (§8.3): `eth_callBundle`
//! `timestamp` must be a JSON number, and simulation results must parse reverts, `"0x"`
//! addresses and the per-tx `error` field.

use alloy::primitives::{B256, Bytes, U256};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use castellan_api::submitter::{Quantity, SimulatedTx, Wei};

/// A JSON-RPC 2.0 request envelope; field order is `jsonrpc, id, method, params`, as in the
/// relays.md §2.4 vector.
#[derive(Serialize)]
pub struct Envelope<'a, P: Serialize> {
    /// Always `"2.0"`.
    pub jsonrpc: &'static str,
    /// Request id (a number for the Flashbots family, a string for bloXroute).
    pub id: Value,
    /// Method name.
    pub method: &'a str,
    /// Parameters (a one-element array, or an object for bloXroute).
    pub params: P,
}

/// Serializes a request once; these exact bytes are signed and sent.
pub fn encode<P: Serialize>(
    id: Value,
    method: &str,
    params: P,
) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Envelope {
        jsonrpc: "2.0",
        id,
        method,
        params,
    })
}

/// A block number on the wire: a `0x`-hex string.
#[derive(Clone, Copy, Debug)]
pub struct HexU64(pub u64);

impl Serialize for HexU64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

/// `eth_sendBundle` params object (Flashbots relay, BuilderNet, Titan, rsync, Quasar, Eden…).
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct SendBundleParams<'a> {
    /// Signed raw transactions (`0x`-hex); empty with a uuid cancels at some builders.
    pub txs: &'a [Bytes],
    /// The single target block.
    pub block_number: HexU64,
    /// Unix seconds, a JSON number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_timestamp: Option<u64>,
    /// Unix seconds, a JSON number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_timestamp: Option<u64>,
    /// Transactions allowed to revert.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub reverting_tx_hashes: &'a [B256],
    /// Replacement uuid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replacement_uuid: Option<Uuid>,
    /// BuilderNet replacement ordering (a JSON number).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replacement_nonce: Option<u64>,
    /// Titan replacement ordering (a JSON number).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replacement_seq_number: Option<u64>,
    /// Flashbots relay multiplexing.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub builders: &'a [String],
}

/// `eth_callBundle` params object (mev-geth `CallBundleArgs`: numbers as numbers).
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct CallBundleParams<'a> {
    /// Signed raw transactions.
    pub txs: &'a [Bytes],
    /// Block number used in the EVM.
    pub block_number: HexU64,
    /// State to simulate on: `"latest"`.
    pub state_block_number: &'static str,
    /// Block timestamp, a JSON number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
}

/// `eth_cancelBundle` params object.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct CancelBundleParams {
    /// The uuid the bundle was sent with.
    pub replacement_uuid: Uuid,
}

/// bloXroute `blxr_submit_bundle` params (object, snake_case, raw txs without `0x`).
#[derive(Serialize, Debug)]
pub struct BlxrSubmitBundle {
    /// Raw txs, hex without `0x`; empty with `uuid` cancels.
    pub transaction: Vec<String>,
    /// Target block, hex.
    pub block_number: HexU64,
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_timestamp: Option<u64>,
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_timestamp: Option<u64>,
    /// Allowed reverts (`0x`-hashes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reverting_hashes: Vec<B256>,
    /// Replacement uuid (36 chars).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// Builders to route to, `{name: ""}`.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub mev_builders: serde_json::Map<String, Value>,
}

/// bloXroute `blxr_simulate_bundle` params.
#[derive(Serialize, Debug)]
pub struct BlxrSimulateBundle {
    /// Raw txs, hex without `0x`.
    pub transaction: Vec<String>,
    /// Block number used in the EVM.
    pub block_number: HexU64,
    /// `"latest"`.
    pub state_block_number: &'static str,
    /// Block timestamp.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
}

/// bloXroute `blxr_private_tx` params.
#[derive(Serialize, Debug)]
pub struct BlxrPrivateTx {
    /// Raw tx, hex without `0x`.
    pub transaction: String,
    /// Builders to route to.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub mev_builders: serde_json::Map<String, Value>,
}

/// Raw tx hex without `0x` (bloXroute).
pub fn hex_no_prefix(tx: &Bytes) -> String {
    hex::encode(tx.as_ref())
}

/// What a relay's answer means, parsed tolerantly (relays.md §7 "Response" shapes).
#[derive(Clone, Debug, PartialEq)]
pub enum RpcAnswer {
    /// A `result`: `{"bundleHash"}`, `{"bundleHash","smart"}`, a string, `null`, `200`, `true`…
    Result {
        /// The bundle or tx hash, when the result carried one.
        hash: Option<String>,
        /// The result value.
        value: Value,
    },
    /// A JSON-RPC `error` object (or a non-JSON-RPC `{"error":"…"}` body).
    Error {
        /// The code, when there is one.
        code: Option<i64>,
        /// The message.
        message: String,
    },
    /// Not JSON, or JSON without `result`/`error`.
    Garbage(String),
}

/// Parses a relay's response body.
pub fn parse_answer(body: &[u8]) -> RpcAnswer {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return RpcAnswer::Garbage(snippet(body)),
    };
    let Some(obj) = v.as_object() else {
        return RpcAnswer::Garbage(snippet(body));
    };
    if let Some(err) = obj.get("error").filter(|e| !e.is_null()) {
        return match err {
            Value::Object(e) => RpcAnswer::Error {
                code: e.get("code").and_then(Value::as_i64),
                message: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            },
            Value::String(s) => RpcAnswer::Error {
                code: None,
                message: s.clone(),
            },
            other => RpcAnswer::Error {
                code: None,
                message: other.to_string(),
            },
        };
    }
    match obj.get("result") {
        Some(result) => {
            let hash = match result {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o
                    .get("bundleHash")
                    .or_else(|| o.get("txHash"))
                    .or_else(|| o.get("tx_hash"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                _ => None,
            };
            RpcAnswer::Result {
                hash,
                value: result.clone(),
            }
        }
        None => RpcAnswer::Garbage(snippet(body)),
    }
}

/// A simulation's result, parsed leniently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedSimulation {
    /// Per-transaction results in order.
    pub results: Vec<SimulatedTx>,
}

/// Parses an `eth_callBundle` / `blxr_simulate_bundle` result object.
pub fn parse_simulation(result: &Value) -> Option<ParsedSimulation> {
    let items = result.get("results")?.as_array()?;
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        let tx_hash = item
            .get("txHash")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<B256>().ok())?;
        let text = |k: &str| {
            item.get(k)
                .filter(|v| !v.is_null())
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .filter(|s| !s.is_empty())
        };
        results.push(SimulatedTx {
            tx_hash,
            gas_used: item.get("gasUsed").and_then(lenient_u64).map(Quantity),
            coinbase_payment: item.get("coinbaseDiff").and_then(lenient_u256).map(Wei),
            error: text("error"),
            revert: text("revert"),
        });
    }
    Some(ParsedSimulation { results })
}

/// A number given as a JSON number, a decimal string or a `0x`-hex string.
pub fn lenient_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<Quantity>().ok().map(|q| q.0),
        _ => None,
    }
}

/// A wei amount given as a JSON number, a decimal string or a `0x`-hex string.
pub fn lenient_u256(v: &Value) -> Option<U256> {
    match v {
        Value::Number(n) => n.as_u64().map(U256::from),
        Value::String(s) => s.parse::<Wei>().ok().map(|w| w.0),
        _ => None,
    }
}

/// At most 256 bytes of a body, lossily as text (for status and logs).
pub fn snippet(body: &[u8]) -> String {
    let end = body.len().min(256);
    String::from_utf8_lossy(&body[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    const RAW: &str = "0x02f86b0180843b9aca00852ecc889a0082520894c87037874aed04e51c29f582394217a0a2b89d808080c080a0a463985c616dd8ee17d7ef9112af4e6e06a27b071525b42182fe7b0b5c8b4925a00af5ca177ffef2ff28449292505d41be578bebb77110dfc09361d2fb56998260";

    #[test]
    fn send_bundle_body_matches_vector_3_bytes() {
        let txs = vec![RAW.parse::<Bytes>().unwrap()];
        let body = encode(
            json!(1),
            "eth_sendBundle",
            [SendBundleParams {
                txs: &txs,
                block_number: HexU64(1),
                min_timestamp: None,
                max_timestamp: None,
                reverting_tx_hashes: &[],
                replacement_uuid: None,
                replacement_nonce: None,
                replacement_seq_number: None,
                builders: &[],
            }],
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            crate::auth::VECTOR3_BODY
        );
    }

    #[test]
    fn timestamps_are_numbers_and_block_is_hex() {
        let txs = vec![RAW.parse::<Bytes>().unwrap()];
        let body = encode(
            json!(7),
            "eth_callBundle",
            [CallBundleParams {
                txs: &txs,
                block_number: HexU64(0x1361bd3),
                state_block_number: "latest",
                timestamp: Some(1615920932),
            }],
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["params"][0]["timestamp"], json!(1615920932));
        assert_eq!(v["params"][0]["blockNumber"], json!("0x1361bd3"));
    }

    #[test]
    fn bloxroute_shape() {
        let tx: Bytes = RAW.parse().unwrap();
        let mut builders = serde_json::Map::new();
        builders.insert("all".into(), json!(""));
        let body = encode(
            json!("1"),
            "blxr_submit_bundle",
            BlxrSubmitBundle {
                transaction: vec![hex_no_prefix(&tx)],
                block_number: HexU64(0x1361bd3),
                min_timestamp: None,
                max_timestamp: Some(5),
                reverting_hashes: vec![],
                uuid: None,
                mev_builders: builders,
            },
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v["params"].is_object());
        assert_eq!(v["id"], json!("1"));
        assert_eq!(v["params"]["transaction"][0], json!(&RAW[2..]));
        assert_eq!(v["params"]["block_number"], json!("0x1361bd3"));
        assert_eq!(v["params"]["max_timestamp"], json!(5));
        assert_eq!(v["params"]["mev_builders"], json!({"all": ""}));
    }

    #[test]
    fn tolerant_answers() {
        let hash = "0x2228f5d8954ce31dc1601a8ba264dbd401bf1428388ce88238932815c5d6f23f";
        for body in [
            json!({"jsonrpc":"2.0","id":1,"result":{"bundleHash":hash,"smart":"true"}}),
            json!({"jsonrpc":"2.0","id":1,"result":{"bundleHash":hash,"receivedTimestampMs":1718030000123.456}}),
            json!({"jsonrpc":"2.0","id":1,"result":hash}),
        ] {
            let a = parse_answer(body.to_string().as_bytes());
            assert!(
                matches!(a, RpcAnswer::Result { hash: Some(ref h), .. } if h == hash),
                "{a:?}"
            );
        }
        for body in [
            json!({"jsonrpc":"2.0","id":1,"result":null}),
            json!({"result":200,"error":null,"id":1}),
            json!({"jsonrpc":"2.0","id":1,"result":true}),
        ] {
            let a = parse_answer(body.to_string().as_bytes());
            assert!(matches!(a, RpcAnswer::Result { hash: None, .. }), "{a:?}");
        }
        let e = parse_answer(
            br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"Rate limited"}}"#,
        );
        assert_eq!(
            e,
            RpcAnswer::Error {
                code: Some(-32603),
                message: "Rate limited".into()
            }
        );
        let e = parse_answer(br#"{"error":"error in signature check 0x12"}"#);
        assert!(matches!(e, RpcAnswer::Error { code: None, .. }));
        assert!(matches!(parse_answer(b"<html>oops"), RpcAnswer::Garbage(_)));
        assert!(matches!(parse_answer(b"[1,2]"), RpcAnswer::Garbage(_)));
        assert!(matches!(
            parse_answer(br#"{"jsonrpc":"2.0"}"#),
            RpcAnswer::Garbage(_)
        ));
    }

    #[test]
    fn simulation_with_reverts_and_creations_parses() {
        let result = json!({
            "bundleGasPrice":"476190476193","bundleHash":"0x73b1e258","coinbaseDiff":"20000000000126000",
            "results":[
              {"coinbaseDiff":"10000000000063000","ethSentToCoinbase":"10000000000000000",
               "fromAddress":"0x02A727155aeF8609c9f7F2179b2a1f560B39F5A0","gasFees":"63000","gasPrice":"476190476193",
               "gasUsed":21000,"toAddress":"0x","txHash":"0x669b4704a7d993a946cdd6e2f95233f308ce0c4649d2e04944e8299efcaa098a","value":"0x"},
              {"gasUsed":"0x5208","toAddress":"0x73625f59CAdc5009Cb458B751b3E7b6b48C06f2C",
               "txHash":"0x669b4704a7d993a946cdd6e2f95233f308ce0c4649d2e04944e8299efcaa098b",
               "error":"execution reverted","revert":"\u{0}\u{0}\u{0}"}
            ],
            "stateBlockNumber":5221585,"totalGasUsed":42000});
        let sim = parse_simulation(&result).unwrap();
        assert_eq!(sim.results.len(), 2);
        assert_eq!(sim.results[0].gas_used, Some(Quantity(21000)));
        assert_eq!(
            sim.results[0].coinbase_payment,
            Some(Wei(U256::from(10000000000063000u64)))
        );
        assert_eq!(sim.results[0].error, None);
        assert_eq!(sim.results[1].gas_used, Some(Quantity(21000)));
        assert_eq!(sim.results[1].error.as_deref(), Some("execution reverted"));
        assert_eq!(sim.results[1].revert.as_deref(), Some("\u{0}\u{0}\u{0}"));
    }
}

//! The submitter's signer adapters over real mTLS (the api crate's server and client): relay-auth
//! signatures reproduce relays.md §2.4 vector 3, a signer answering with the wrong (32-byte
//! personal_sign) variant is refused, and outcomes are delivered.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::primitives::{Bytes, keccak256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Json, Router};
use castellan_api::devpki::{DevCa, LeafSpec};
use castellan_api::serve::{Peer, ServeOptions, serve_mtls};
use castellan_api::signer::{RelayAuthRequest, RelayAuthResponse};
use castellan_api::submitter::{BundleOutcome, BundleState, OutcomeKind};
use castellan_api::tls::{ClientTlsConfig, ReloadableServerConfig, ServerTlsConfig};
use castellan_submitter::OutcomeSink;
use castellan_submitter::auth::{AuthError, flashbots_signature, signed_text};
use castellan_submitter::signer::{SignerConfig, SignerOutcomes, SignerRelayAuth, client};

const KEY1: &str = "0xfad9c8855b740a0b7ed4c221dbad0f33a83a49cad6b3fe8d5817ac83d38b6a19";
const BODY3: &str = r#"{"jsonrpc":"2.0","id":1,"method":"eth_sendBundle","params":[{"txs":["0x02f86b0180843b9aca00852ecc889a0082520894c87037874aed04e51c29f582394217a0a2b89d808080c080a0a463985c616dd8ee17d7ef9112af4e6e06a27b071525b42182fe7b0b5c8b4925a00af5ca177ffef2ff28449292505d41be578bebb77110dfc09361d2fb56998260"],"blockNumber":"0x1"}]}"#;
const HEADER3: &str = "0x96216849c49358B10257cb55b28eA603c874b05E:0x7c34f318596cc9e3b4f713e89a01aca5df5fe61db3c6e397576e54884cd29f6f45cbf18b4be09eae551260d0aeb17947cbc84a182c863cdee492e4fe1992f2951c";

#[derive(Clone)]
struct StandInSigner {
    key: PrivateKeySigner,
    wrong_variant: bool,
    outcomes: Arc<Mutex<Vec<(String, BundleOutcome)>>>,
}

async fn relay_auth(
    State(s): State<StandInSigner>,
    Json(req): Json<RelayAuthRequest>,
) -> Json<RelayAuthResponse> {
    let sig = if s.wrong_variant {
        s.key.sign_message_sync(req.body_hash.as_slice()).unwrap()
    } else {
        s.key
            .sign_message_sync(signed_text(req.body_hash).as_bytes())
            .unwrap()
    };
    Json(RelayAuthResponse {
        address: s.key.address(),
        signature: Bytes::from(sig.as_bytes().to_vec()),
    })
}

async fn outcome(
    State(s): State<StandInSigner>,
    Extension(peer): Extension<Peer>,
    Json(o): Json<BundleOutcome>,
) -> Json<serde_json::Value> {
    s.outcomes
        .lock()
        .unwrap()
        .push((peer.identity.as_str().to_owned(), o));
    Json(serde_json::json!({}))
}

async fn start(wrong_variant: bool) -> (SignerConfig, StandInSigner, tempfile::TempDir) {
    castellan_submitter::relay::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut ca = DevCa::new("Castellan test CA").unwrap();
    ca.write(dir.path(), "ca").unwrap();
    ca.issue(&LeafSpec::server_localhost())
        .unwrap()
        .write(dir.path(), "server")
        .unwrap();
    ca.issue(&LeafSpec::client_uri("spiffe://castellan/submitter"))
        .unwrap()
        .write(dir.path(), "submitter")
        .unwrap();
    let tls = Arc::new(
        ReloadableServerConfig::new(ServerTlsConfig {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.pem"),
            crl: vec![],
            crl_enforce_next_update: false,
        })
        .unwrap(),
    );
    let state = StandInSigner {
        key: KEY1.parse().unwrap(),
        wrong_variant,
        outcomes: Arc::default(),
    };
    let app = Router::new()
        .route("/v1/relay-auth", post(relay_auth))
        .route("/v1/outcomes", post(outcome))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_mtls(
        listener,
        tls,
        app,
        ServeOptions::default(),
        std::future::pending(),
    ));
    let config = SignerConfig {
        url: format!("https://localhost:{}", addr.port()),
        tls: ClientTlsConfig {
            server_ca: dir.path().join("ca.pem"),
            cert: dir.path().join("submitter.pem"),
            key: dir.path().join("submitter.key"),
        },
    };
    (config, state, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_auth_through_the_signer_reproduces_vector_3() {
    let (config, _state, _dir) = start(false).await;
    let auth = SignerRelayAuth::new(client(&config).unwrap());
    let header = flashbots_signature(&auth, BODY3.as_bytes()).await.unwrap();
    assert_eq!(header, HEADER3);
    assert_eq!(
        castellan_tests::relays::verify_go_utils(&header, BODY3.as_bytes()).map(|a| a.to_string()),
        Some("0x96216849c49358B10257cb55b28eA603c874b05E".to_owned())
    );
    assert_eq!(
        keccak256(BODY3).to_string(),
        "0xa97d6caa3fbe5cfab877f035b48836cf99f4b19cfd3ca1b22ac145c58a1baf09"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_answering_the_wrong_variant_is_refused() {
    let (config, _state, _dir) = start(true).await;
    let auth = SignerRelayAuth::new(client(&config).unwrap());
    let err = flashbots_signature(&auth, BODY3.as_bytes())
        .await
        .unwrap_err();
    assert!(matches!(err, AuthError::BadSignature { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_delivered_over_mtls() {
    let (config, state, _dir) = start(false).await;
    let sink = SignerOutcomes::new(client(&config).unwrap());
    let outcome = BundleOutcome {
        bundle_id: uuid::Uuid::new_v4(),
        key_name: "searcher-hot".into(),
        outcome: OutcomeKind::NotIncluded,
        state: BundleState::Expired,
        reason: Some("expired".into()),
        included_block: None,
        gas_used: None,
        effective_gas_price: None,
    };
    tokio::time::timeout(Duration::from_secs(10), sink.report(outcome.clone()))
        .await
        .unwrap();
    let got = state.outcomes.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![("spiffe://castellan/submitter".to_owned(), outcome)]
    );
}

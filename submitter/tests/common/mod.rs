//! Shared harness of the submitter's end-to-end tests: anvil with automine off (the test mines),
//! stand-in relays, and an engine built from a real `submitter.toml` text.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use castellan_api::submitter::{
    BundleOutcome, BundleState, BundleStatus, CallerIdentity, Quantity, RelaySelection, Role,
    SubmitBundleRequest,
};
use castellan_submitter::auth::{AuthError, BoxFuture, RelayAuthSignature, RelayAuthSigner};
use castellan_submitter::config::Config;
use castellan_submitter::store::Store;
use castellan_submitter::{Engine, OutcomeSink};
use castellan_tests::anvil::Anvil;
use castellan_tests::relays::{Behavior, Flavor, StandInRelay, sign_body_hash};
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

/// The relay-auth key of the tests (any key; not a funded account).
pub const AUTH_KEY: &str = "0xfad9c8855b740a0b7ed4c221dbad0f33a83a49cad6b3fe8d5817ac83d38b6a19";
/// bloXroute `Authorization` value of the tests.
pub const BLXR_AUTH: &str = "dGVzdC1hY2NvdW50OnRlc3Qtc2VjcmV0";

/// Test relay-auth signer over an in-memory key (test code only).
pub struct TestAuth(pub PrivateKeySigner);

impl RelayAuthSigner for TestAuth {
    fn sign_body_hash(
        &self,
        body_hash: B256,
    ) -> BoxFuture<'_, Result<RelayAuthSignature, AuthError>> {
        let signature = sign_body_hash(&self.0, body_hash);
        let address = self.0.address();
        Box::pin(async move { Ok(RelayAuthSignature { address, signature }) })
    }
}

/// Collects outcomes.
#[derive(Default, Clone)]
pub struct Outcomes(pub Arc<Mutex<Vec<BundleOutcome>>>);

impl OutcomeSink for Outcomes {
    fn report(&self, outcome: BundleOutcome) -> BoxFuture<'_, ()> {
        self.0.lock().unwrap().push(outcome);
        Box::pin(async {})
    }
}

impl Outcomes {
    pub async fn wait_for(&self, id: Uuid, timeout: Duration) -> BundleOutcome {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(o) = self.0.lock().unwrap().iter().find(|o| o.bundle_id == id) {
                return o.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no outcome for {id} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One stand-in and how the submitter is configured for it.
pub struct RelaySetup {
    pub name: &'static str,
    pub flavor: Flavor,
    pub behavior: Behavior,
    /// TOML lines after name/url (kind, sign, cancel, timeout_ms…).
    pub toml: &'static str,
}

pub fn flashbots(name: &'static str) -> RelaySetup {
    RelaySetup {
        name,
        flavor: Flavor::Flashbots {
            require_signature: true,
        },
        behavior: Behavior::Normal,
        toml: "kind = \"flashbots\"",
    }
}

pub fn builder(name: &'static str, behavior: Behavior, toml: &'static str) -> RelaySetup {
    RelaySetup {
        name,
        flavor: Flavor::Flashbots {
            require_signature: false,
        },
        behavior,
        toml,
    }
}

pub fn bloxroute(name: &'static str) -> RelaySetup {
    RelaySetup {
        name,
        flavor: Flavor::Bloxroute {
            auth: BLXR_AUTH.into(),
        },
        behavior: Behavior::Normal,
        toml: "kind = \"bloxroute\"",
    }
}

pub struct Harness {
    pub anvil: Anvil,
    pub engine: Engine,
    pub relays: Vec<(&'static str, StandInRelay)>,
    pub outcomes: Outcomes,
    pub dir: tempfile::TempDir,
    pub config: Config,
    tracker: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.tracker.abort();
    }
}

impl Harness {
    /// anvil (automine off, one block mined), stand-ins, engine with head tracking at 25 ms.
    pub async fn start(setups: Vec<RelaySetup>, health: &str) -> Self {
        castellan_submitter::relay::install_crypto_provider();
        let anvil = Anvil::start().await;
        let () = anvil
            .provider()
            .raw_request("evm_setAutomine".into(), (false,))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut relays = Vec::new();
        let mut relay_toml = String::new();
        for s in setups {
            let relay =
                StandInRelay::start(s.flavor.clone(), s.behavior, Some(anvil.provider().clone()))
                    .await;
            if matches!(s.flavor, Flavor::Bloxroute { .. }) {
                let path = dir.path().join(format!("{}.auth", s.name));
                std::fs::write(&path, format!("{BLXR_AUTH}\n")).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                relay_toml.push_str(&format!(
                    "[[relay]]\nname = \"{}\"\nurl = \"{}\"\n{}\nauth_header_file = \"{}\"\n\n",
                    s.name,
                    relay.url(),
                    s.toml,
                    path.display()
                ));
            } else {
                relay_toml.push_str(&format!(
                    "[[relay]]\nname = \"{}\"\nurl = \"{}\"\n{}\n\n",
                    s.name,
                    relay.url(),
                    s.toml
                ));
            }
            relays.push((s.name, relay));
        }
        // The engine runs in-process: [tls] is required by the file format but never opened here
        // (the real-socket mTLS tests are in binary.rs).
        let text = format!(
            "[api]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n[tls]\ncert = \"/unused/server.pem\"\nkey = \"/unused/server.key\"\nclient_ca = \"/unused/ca.pem\"\n\n\
             [chain]\nchain_id = 31337\nnode_url = \"{}\"\npoll_interval_ms = 25\nconfirmations = 1\n\n\
             [store]\npath = \"{}\"\n\n[health]\n{health}\n\n{relay_toml}",
            anvil.url(),
            dir.path().join("submitter.db").display()
        );
        let config = Config::parse(&text).unwrap();
        let outcomes = Outcomes::default();
        let (engine, tracker, _) = Self::engine(&config, &outcomes).await;
        let h = Self {
            anvil,
            engine,
            relays,
            outcomes,
            dir,
            config,
            tracker,
        };
        h.mine().await;
        h
    }

    async fn engine(
        config: &Config,
        outcomes: &Outcomes,
    ) -> (Engine, tokio::task::JoinHandle<()>, Duration) {
        let store = Store::open(&config.store.path).unwrap();
        let auth: Arc<dyn RelayAuthSigner> = Arc::new(TestAuth(AUTH_KEY.parse().unwrap()));
        let engine = castellan_submitter::build_engine(
            config,
            Some(auth),
            store,
            Arc::new(outcomes.clone()),
        )
        .unwrap();
        let t = Instant::now();
        engine.restore().await.unwrap();
        let restored_in = t.elapsed();
        let tracker = engine.spawn_head_tracker(Duration::from_millis(25));
        (engine, tracker, restored_in)
    }

    /// Simulates a restart: stops head tracking and builds a new engine over the same store.
    /// Returns how long [`Engine::restore`] took.
    pub async fn restart(&mut self) -> Duration {
        self.tracker.abort();
        let (engine, tracker, restored_in) = Self::engine(&self.config, &self.outcomes).await;
        self.engine = engine;
        self.tracker = tracker;
        let head = self.block_number().await;
        self.wait_head(head).await;
        restored_in
    }

    pub fn relay(&self, name: &str) -> &StandInRelay {
        &self.relays.iter().find(|(n, _)| *n == name).unwrap().1
    }

    pub async fn block_number(&self) -> u64 {
        self.anvil.provider().get_block_number().await.unwrap()
    }

    /// Mines one block and waits until the engine has seen it.
    pub async fn mine(&self) -> u64 {
        let _: Value = self
            .anvil
            .provider()
            .raw_request("evm_mine".into(), ())
            .await
            .unwrap();
        let n = self.block_number().await;
        self.wait_head(n).await;
        n
    }

    pub async fn wait_head(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.engine.head() != n || !self.engine.ready() {
            assert!(Instant::now() < deadline, "engine did not see head {n}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn wait_status(
        &self,
        id: Uuid,
        what: &str,
        pred: impl Fn(&BundleStatus) -> bool,
    ) -> BundleStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self
                .engine
                .lookup(id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("bundle {id} unknown"));
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "bundle {id} never became {what}: {s:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn request(
        &self,
        txs: Vec<Bytes>,
        target: u64,
        last: u64,
        key: &str,
    ) -> SubmitBundleRequest {
        SubmitBundleRequest {
            bundle_id: Uuid::new_v4(),
            key_name: key.into(),
            txs,
            target_block: Quantity(target),
            last_block: Some(Quantity(last)),
            min_timestamp: None,
            max_timestamp: None,
            reverting_tx_hashes: vec![],
            replacement_uuid: None,
            relays: RelaySelection::All,
            simulate: false,
        }
    }

    /// Calls the in-process router as `identity` with `roles`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        roles: Option<&[Role]>,
    ) -> (StatusCode, Value) {
        let router = castellan_submitter::api::router(self.engine.clone(), 1 << 20);
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(roles) = roles {
            builder = builder.extension(CallerIdentity {
                id: "spiffe://castellan/test".into(),
                roles: roles.to_vec(),
            });
        }
        let request = builder
            .body(body.map_or_else(Body::empty, Body::from))
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value)
    }
}

pub fn recipient() -> Address {
    Address::repeat_byte(0x42)
}

pub fn included(s: &BundleStatus) -> bool {
    s.state == BundleState::Included
}

//! The real `submitter` binary: serves the API (plain HTTP on loopback until mTLS lands),
//! persists an accepted bundle before acknowledging it, and after `kill -9` and a restart
//! still knows it and resumes sending it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::providers::Provider;
use castellan_api::submitter::{BundleStatus, Quantity, RelaySelection, SubmitBundleRequest};
use castellan_tests::anvil::Anvil;
use castellan_tests::relays::{Behavior, Flavor, StandInRelay, signed_transfer};
use serde_json::Value;

struct Daemon {
    child: Child,
    log: std::path::PathBuf,
}

impl Daemon {
    fn start(config: &std::path::Path, log: std::path::PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_submitter"))
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as issue 8's crash test does.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_ready(client: &reqwest::Client, base: &str, daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "submitter not ready:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_bundle_survives_kill_9_and_resumes() {
    castellan_submitter::relay::install_crypto_provider();
    let anvil = Anvil::start().await;
    let () = anvil
        .provider()
        .raw_request("evm_setAutomine".into(), (false,))
        .await
        .unwrap();
    let _: Value = anvil
        .provider()
        .raw_request("evm_mine".into(), ())
        .await
        .unwrap();
    let relay = StandInRelay::start(
        Flavor::Flashbots {
            require_signature: false,
        },
        Behavior::Normal,
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let api_port = free_port();
    let config = dir.path().join("submitter.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:{api_port}\"\nmetrics_listen = \"127.0.0.1:{}\"\n\
             [chain]\nchain_id = 31337\nnode_url = \"{}\"\npoll_interval_ms = 25\nconfirmations = 1\n\
             [store]\npath = \"{}\"\n\
             [[relay]]\nname = \"titan\"\nkind = \"builder\"\nurl = \"{}\"\nsign = false\n",
            free_port(),
            anvil.url(),
            dir.path().join("submitter.db").display(),
            relay.url()
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{api_port}");
    let client = reqwest::Client::new();
    let mut daemon = Daemon::start(&config, dir.path().join("run1.log"));
    wait_ready(&client, &base, &daemon).await;

    let head = anvil.provider().get_block_number().await.unwrap();
    let request = SubmitBundleRequest {
        bundle_id: uuid::Uuid::new_v4(),
        key_name: "searcher-hot".into(),
        txs: vec![signed_transfer(
            1,
            0,
            alloy::primitives::Address::repeat_byte(0x42),
        )],
        target_block: Quantity(head + 1),
        last_block: Some(Quantity(head + 30)),
        min_timestamp: None,
        max_timestamp: None,
        reverting_tx_hashes: vec![],
        replacement_uuid: None,
        relays: RelaySelection::All,
        simulate: false,
    };
    let id = request.bundle_id.to_string();
    let response = client
        .post(format!("{base}/v1/bundles"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", daemon.output());
    assert!(response.headers().contains_key("x-request-id"));
    relay
        .wait_for("bundle", Duration::from_secs(5), |r| {
            r.bundle
                .as_ref()
                .is_some_and(|b| b.uuid.as_deref() == Some(id.as_str()))
        })
        .await;

    // kill -9 right after the acknowledgement, then start again on the same store.
    daemon.kill9();
    let daemon = Daemon::start(&config, dir.path().join("run2.log"));
    wait_ready(&client, &base, &daemon).await;
    let status: BundleStatus = client
        .get(format!("{base}/v1/bundles/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status.state, castellan_api::submitter::BundleState::Pending);
    let again = client
        .post(format!("{base}/v1/bundles"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        200,
        "a retry after the restart is not a new bundle"
    );
    let _: Value = anvil
        .provider()
        .raw_request("evm_mine".into(), ())
        .await
        .unwrap();
    relay
        .wait_for("resubmission after restart", Duration::from_secs(10), |r| {
            r.bundle.as_ref().is_some_and(|b| b.block == head + 2)
        })
        .await;
    let metrics = reqwest::get(format!("http://{}/metrics", daemon_metrics(&config)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("castellan_submitter_relay_requests_total{relay=\"titan\",method=\"eth_sendBundle\",result=\"accepted\"}"), "{metrics}");
}

fn daemon_metrics(config: &std::path::Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("metrics_listen"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_owned()
}

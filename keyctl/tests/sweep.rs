//! `keyctl rotate --sweep` with the real binaries, anvil and a stand-in Flashbots builder: the old
//! address's whole balance (less max fee × gas) goes to the new address, signed by the RETIRING
//! version through the signer (policy, audit), handed by keyctl to the real submitter as a bundle,
//! sent by the submitter to the builder, which includes it in anvil; the submitter reports the
//! bundle included. A request naming the retiring version that is not a sweep to the successor is
//! refused with a stable code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use castellan_api::client::{ClientError, SignerClient};
use castellan_api::signer::UnsignedTx;
use castellan_api::tls::ClientTlsConfig;
use castellan_tests::anvil::Anvil;
use castellan_tests::relays::{Behavior, Flavor, StandInRelay};
use common::*;
use serde_json::{Value, json};

fn addr(s: &str) -> Address {
    s.parse().unwrap()
}

/// Adds a `[sweep]` section: the anvil node (read only), the strategy identity as the sweeping
/// client of the signer, and, for the submitter, the one dev identity with role `signer` there
/// (the signer's client certificate; a deployment gives keyctl its own).
fn configure_sweep(a: &Appliance, rpc_url: &str) {
    let tls = a.dir.join("tls");
    let block = |stem: &str| {
        format!(
            "{{ server_ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
            tls.join("ca.pem").display(),
            tls.join(format!("{stem}.pem")).display(),
            tls.join(format!("{stem}.key")).display(),
        )
    };
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&a.config)
        .unwrap();
    writeln!(
        f,
        "\n[sweep]\nrpc_url = \"{rpc_url}\"\nconfirm_timeout_secs = 30\nblocks = 10\n\
         tls = {}\nsubmitter_tls = {}",
        block("strategy-alpha"),
        block("signer-client"),
    )
    .unwrap();
}

/// anvil, a stand-in Flashbots builder, an appliance pointed at both, the real signer and the real
/// submitter.
struct Stack {
    rt: tokio::runtime::Runtime,
    anvil: Anvil,
    relay: StandInRelay,
    a: Appliance,
    signer: RunningSigner,
    submitter: RunningProcess,
}

impl Stack {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let anvil = rt.block_on(Anvil::start());
        let relay = rt.block_on(StandInRelay::start(
            Flavor::Flashbots {
                require_signature: true,
            },
            Behavior::Normal,
            None,
        ));
        let a = Appliance::with_args(&[
            "--node-url",
            anvil.url().as_str(),
            "--builder-url",
            &relay.url(),
        ]);
        configure_sweep(&a, anvil.url().as_str());
        let signer = RunningSigner::start(&a);
        let submitter = RunningProcess::start(
            &a,
            &sibling_bin("submitter"),
            &a.dir.join("submitter.toml"),
            "submitter listening on",
        );
        Self {
            rt,
            anvil,
            relay,
            a,
            signer,
            submitter,
        }
    }

    fn logs(&self) -> String {
        format!(
            "signer:\n{}\nsubmitter:\n{}",
            self.signer.log_text(),
            self.submitter.log_text()
        )
    }

    /// Runs keyctl while acting as the builder: whatever bundle the submitter sends for the next
    /// block is sent to anvil (which mines it at once). Bounded: 60 s.
    fn run_building(&self, args: &[&str]) -> Output {
        let mut child = keyctl()
            .arg("--config")
            .arg(&self.a.config)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().unwrap().is_some() {
                return child.wait_with_output().unwrap();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "keyctl {args:?} did not finish: {}\n{}",
                    dump(&out),
                    self.logs()
                );
            }
            let head = self
                .rt
                .block_on(self.anvil.provider().get_block_number())
                .unwrap();
            self.rt
                .block_on(self.relay.build_block(self.anvil.provider(), head + 1));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The submitter's view of a bundle (as the admin).
    fn bundle(&self, id: &str) -> Value {
        let tls = self.a.dir.join("tls");
        let sub = SignerClient::new(
            format!("https://localhost:{}", self.a.port + 1),
            &ClientTlsConfig {
                server_ca: tls.join("ca.pem"),
                cert: tls.join("admin.pem"),
                key: tls.join("admin.key"),
            },
        )
        .unwrap();
        self.rt
            .block_on(sub.get(&format!("/v1/bundles/{id}")))
            .unwrap()
    }
}

/// The audit chain, exported by keyctl.
fn audit_records(a: &Appliance) -> Vec<Value> {
    let export = a.dir.join(format!("audit-{}.jsonl", now_secs()));
    a.ok(&["audit", "export", "--out", export.to_str().unwrap()]);
    std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect()
}

/// The sweep went signer → submitter → builder → anvil: the submitter knows its bundle as included
/// in the block keyctl printed, the builder got exactly the signed transaction, and the audit chain
/// holds the sweep's decision (naming the retiring version) and signature.
fn assert_sent_through_the_submitter(st: &Stack, sweep: &Value, rid: &str) {
    let bundle_id = sweep["bundleId"].as_str().unwrap();
    let block = sweep["block"].as_u64().unwrap_or_else(|| panic!("{sweep}"));
    // keyctl returns on the submitter's report or the node's receipt, whichever comes first:
    // the submitter's head tracking catches up within a bounded wait.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut b = st.bundle(bundle_id);
    while b["state"] == "pending" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        b = st.bundle(bundle_id);
    }
    assert_eq!(b["state"], "included", "{b}\n{}", st.logs());
    assert_eq!(b["keyName"], "searcher-hot", "{b}");
    let included = u64::from_str_radix(
        b["includedBlock"]
            .as_str()
            .unwrap()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert_eq!(included, block, "{b} vs {sweep}");
    let hash = sweep["txHash"].as_str().unwrap().to_lowercase();
    assert_eq!(
        b["txHashes"][0].as_str().unwrap().to_lowercase(),
        hash,
        "{b}"
    );
    assert!(
        st.relay
            .bundles_for(block)
            .iter()
            .any(|x| x.uuid.as_deref() == Some(bundle_id)),
        "the builder never got the sweep bundle for block {block}"
    );
    assert!(
        st.relay.violations().is_empty(),
        "{:?}",
        st.relay.violations()
    );
    // The node has the receipt in that block.
    let receipt = st.rt.block_on(st.anvil.receipt(hash.parse().unwrap()));
    assert_eq!(receipt.block_number, Some(block));
    assert!(receipt.status());

    let records = audit_records(&st.a);
    let decision = records
        .iter()
        .find(|r| r["kind"] == "decision" && r["request_id"] == rid)
        .unwrap_or_else(|| panic!("no decision record for the sweep {rid}"));
    assert!(
        decision["payload"].to_string().contains("searcher-hot@1"),
        "{decision}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "signature" && r["request_id"] == rid),
        "no signature record for the sweep {rid}"
    );
    st.a.ok(&["audit", "verify"]);
}

fn tx(nonce: u64, to: &str, value: &str, input: Option<&str>) -> UnsignedTx {
    let mut v = json!({
        "chainId": "0x7a69", "nonce": nonce.to_string(), "to": to,
        "value": value, "gas": "60000",
        "maxFeePerGas": "0x77359400", "maxPriorityFeePerGas": "1"
    });
    if let Some(i) = input {
        v["input"] = json!(i);
    }
    serde_json::from_value(v).unwrap()
}

fn sign_as(
    a: &Appliance,
    key: &str,
    t: UnsignedTx,
) -> Result<castellan_api::signer::SignedTransactionResponse, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(a.client("strategy-alpha").sign_transaction(key, t))
}

fn refused_with(
    r: Result<castellan_api::signer::SignedTransactionResponse, ClientError>,
) -> String {
    match r {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn rotate_sweep_goes_through_the_submitter_to_the_new_address_and_the_retiring_version_only_sweeps()
{
    let st = Stack::start();
    let (rt, anvil, a) = (&st.rt, &st.anvil, &st.a);

    let old = addr(&a.address("searcher-hot", 1));
    let funded = U256::from(500_000_000_000_000_000u128); // 0.5 ETH: below the approval tier
    rt.block_on(anvil.set_balance(old, funded));

    let (out, took) = timed(|| {
        st.run_building(&[
            "--json",
            "rotate",
            "searcher-hot",
            "--grace",
            "1h",
            "--sweep",
        ])
    });
    assert!(out.status.success(), "{}\n{}", dump(&out), st.logs());
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("keyctl rotate --sweep (debug build, SoftHSM, submitter, anvil) took {took:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let new = addr(&a.address("searcher-hot", 2));
    assert_ne!(old, new);
    assert_eq!(r["signer"]["reload"], "reloaded", "{r}");
    let sweep = &r["sweep"];
    assert_eq!(sweep["swept"], true, "{r}");
    assert_eq!(sweep["included"], true, "{r}");
    assert_eq!(sweep["keyVersion"], "searcher-hot@1", "{r}");
    assert_eq!(addr(sweep["from"].as_str().unwrap()), old);
    assert_eq!(addr(sweep["to"].as_str().unwrap()), new);
    let value: U256 = sweep["value"].as_str().unwrap().parse().unwrap();

    // The new address received exactly the swept value; the old one kept at most the fee.
    let new_balance = rt.block_on(anvil.balance(new));
    let old_balance = rt.block_on(anvil.balance(old));
    assert_eq!(new_balance, value);
    assert!(value > U256::ZERO && value < funded);
    assert!(
        old_balance < funded - value,
        "the fee was not paid from the old address"
    );
    assert!(
        old_balance <= U256::from(21_000u64) * U256::from(10_000_000_000u64),
        "the sweep left {old_balance} wei behind"
    );
    assert_eq!(a.status("searcher-hot", 1), "retiring");
    let rid = sweep["requestId"].as_str().unwrap();
    assert_sent_through_the_submitter(&st, sweep, rid);

    // A request naming the retiring version that is not a sweep to the successor: refused, with
    // the policy's stable code — to another address, to the successor with calldata.
    let other = "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed";
    assert_eq!(
        refused_with(sign_as(a, "searcher-hot@1", tx(1, other, "1000", None))),
        "key_retiring"
    );
    assert_eq!(
        refused_with(sign_as(
            a,
            "searcher-hot@1",
            tx(1, &new.to_checksum(None), "1000", Some("0xa9059cbb"))
        )),
        "key_retiring"
    );
    // The same transfer naming the key (its active version) signs with the new version.
    let s = sign_as(a, "searcher-hot", tx(0, other, "1000", None)).unwrap();
    assert_eq!(s.key_version, "searcher-hot@2");
    // Naming a version that does not exist is refused too.
    assert_eq!(
        refused_with(sign_as(a, "searcher-hot@7", tx(1, other, "1000", None))),
        "key_not_signable"
    );

    // A sweep of a version that is not retiring is refused by keyctl, in one line.
    let (code, line) = a.fails(&["sweep", "searcher-hot@2"]);
    assert_eq!(code, 1);
    assert!(line.contains("not retiring"), "{line}");
    // Nothing left to sweep: said so, nothing sent.
    let again = a.json(&["sweep", "searcher-hot@1"]);
    assert_eq!(again["swept"], false, "{again}");

    // After the grace period the old version signs nothing, not even a sweep.
    let later = (now_secs() + 3601).to_string();
    a.json(&["rotate", "--due", "--now", &later]);
    assert_eq!(a.status("searcher-hot", 1), "retired");
    a.ok(&["keys", "show", "searcher-hot"]);
    let rt2 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reload: Result<Value, _> =
        rt2.block_on(a.client("admin").post("/v1/admin/keys/reload", &json!({})));
    reload.unwrap();
    assert_eq!(
        refused_with(sign_as(
            a,
            "searcher-hot@1",
            tx(1, &new.to_checksum(None), "1000", None)
        )),
        "key_not_signable"
    );

    a.ok(&["audit", "verify"]);
}

#[test]
fn a_sweep_above_the_approval_tier_waits_for_approvals_then_keyctl_sends_it_through_the_submitter()
{
    let st = Stack::start();
    let (rt, anvil, a) = (&st.rt, &st.anvil, &st.a);
    let old = addr(&a.address("searcher-hot", 1));
    // 3 ETH: above the dev policy's 1 ether tier (2 of 3 approvers), below its 5 ether cap.
    let funded = U256::from(3_000_000_000_000_000_000u128);
    rt.block_on(anvil.set_balance(old, funded));

    // The rotation happens; the sweep waits for approvals, and keyctl says how to finish it.
    let (code, line) = a.fails(&["rotate", "searcher-hot", "--grace", "1h", "--sweep"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("waits for 2 approvals"), "{line}");
    let id = line
        .split("--request ")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .unwrap_or_else(|| panic!("no request id in {line}"))
        .to_owned();
    assert_eq!(a.status("searcher-hot", 1), "retiring");
    assert_eq!(a.status("searcher-hot", 2), "active");
    // Sending before it is signed: refused, nothing sent.
    let (code, line) = a.fails(&["sweep", "searcher-hot@1", "--request", &id]);
    assert_eq!(code, 1);
    assert!(line.contains("not signed"), "{line}");

    a.json(&["approve", &id, "--as", "approver-1"]);
    let done = a.json(&["approve", &id, "--as", "approver-2"]);
    assert_eq!(done["state"], "signed", "{done}\n{}", st.logs());
    // Signed by the retiring version it named, not by the active one.
    assert_eq!(done["result"]["keyVersion"], "searcher-hot@1", "{done}");

    let out = st.run_building(&["--json", "sweep", "searcher-hot@1", "--request", &id]);
    assert!(out.status.success(), "{}\n{}", dump(&out), st.logs());
    let sent: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sent["swept"], true, "{sent}");
    assert_eq!(sent["included"], true, "{sent}");
    let value: U256 = sent["value"].as_str().unwrap().parse().unwrap();
    let new = addr(&a.address("searcher-hot", 2));
    assert_eq!(rt.block_on(anvil.balance(new)), value);
    assert!(value > U256::from(2_900_000_000_000_000_000u128), "{sent}");
    assert_sent_through_the_submitter(&st, &sent, &id);
}

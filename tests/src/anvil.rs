//! A local anvil node for tests: a real Ethereum node that checks and mines what Castellan signs.
//!
//! [`Anvil::start`] runs the binary named by `CASTELLAN_ANVIL` (exported by
//! `source scripts/tools.sh`, which `scripts/test` does) on 127.0.0.1 and a free port, waits until
//! it answers `eth_chainId`, and kills it when the handle is dropped. Without `CASTELLAN_ANVIL` the
//! test fails with a message saying how to run it: tests never skip silently.
//!
//! Harness code fails the test that called it, so it panics with a message (and anvil's stderr)
//! instead of returning errors.
#![allow(clippy::panic, clippy::expect_used)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionReceipt;
use alloy::transports::http::reqwest::Url;

/// The chain id anvil uses unless told otherwise.
pub const ANVIL_CHAIN_ID: u64 = 31337;

/// How long anvil may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sent transaction may take to be mined (anvil automines, so this is generous).
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting anvil: a free port found by binding port 0 may be taken before anvil
/// binds it.
const START_ATTEMPTS: usize = 3;

/// A running anvil node, killed on drop.
pub struct Anvil {
    child: Child,
    stderr: File,
    url: Url,
    provider: DynProvider,
}

impl Anvil {
    /// Starts anvil on 127.0.0.1 and a free port and waits until it answers `eth_chainId`.
    ///
    /// Panics if `CASTELLAN_ANVIL` is unset (run the tests with `scripts/test`) or anvil does not
    /// come up.
    pub async fn start() -> Self {
        // reqwest is built without a default TLS provider (no aws-lc); alloy's HTTP client needs
        // one installed even for plain-HTTP URLs. Installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let binary = std::env::var_os("CASTELLAN_ANVIL").unwrap_or_else(|| {
            panic!(
                "CASTELLAN_ANVIL is not set: run the tests with scripts/test \
                 (or `source scripts/tools.sh` first)"
            )
        });
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let stderr = tempfile::tempfile().expect("temporary file for anvil's stderr");
            let child = Command::new(&binary)
                .args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--silent",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr.try_clone().expect("clone the stderr file handle"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run anvil at {binary:?}: {e}"));
            let url: Url = format!("http://127.0.0.1:{port}")
                .parse()
                .expect("a valid URL");
            let provider = ProviderBuilder::new().connect_http(url.clone()).erased();
            let mut anvil = Self {
                child,
                stderr,
                url,
                provider,
            };
            match anvil.wait_ready().await {
                Ok(()) => return anvil,
                // Dropping `anvil` kills the process before the next attempt.
                Err(failure) => last_failure = failure,
            }
        }
        panic!("anvil did not start after {START_ATTEMPTS} attempts: {last_failure}")
    }

    /// The node's HTTP JSON-RPC URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// An alloy provider connected to the node.
    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// The node's chain id, as it answers `eth_chainId`.
    pub async fn chain_id(&self) -> u64 {
        self.provider
            .get_chain_id()
            .await
            .unwrap_or_else(|e| panic!("eth_chainId failed: {e}{}", self.stderr_tail()))
    }

    /// Sets `address`'s balance (`anvil_setBalance`).
    pub async fn set_balance(&self, address: Address, wei: U256) {
        let () = self
            .provider
            .raw_request("anvil_setBalance".into(), (address, wei))
            .await
            .unwrap_or_else(|e| panic!("anvil_setBalance failed: {e}{}", self.stderr_tail()));
    }

    /// `address`'s balance (`eth_getBalance` at the latest block).
    pub async fn balance(&self, address: Address) -> U256 {
        self.provider
            .get_balance(address)
            .await
            .unwrap_or_else(|e| panic!("eth_getBalance failed: {e}{}", self.stderr_tail()))
    }

    /// Sends a signed transaction (`eth_sendRawTransaction`) and returns the hash the node reports.
    pub async fn send_raw(&self, raw: &[u8]) -> B256 {
        match self.provider.send_raw_transaction(raw).await {
            Ok(pending) => *pending.tx_hash(),
            Err(e) => panic!("eth_sendRawTransaction refused the transaction: {e}"),
        }
    }

    /// Waits until the transaction `hash` is mined and returns its receipt.
    pub async fn receipt(&self, hash: B256) -> TransactionReceipt {
        let deadline = Instant::now() + RECEIPT_TIMEOUT;
        loop {
            match self.provider.get_transaction_receipt(hash).await {
                Ok(Some(receipt)) => return receipt,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(None) => panic!("transaction {hash} not mined within {RECEIPT_TIMEOUT:?}"),
                Err(e) => panic!(
                    "eth_getTransactionReceipt failed: {e}{}",
                    self.stderr_tail()
                ),
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("anvil exited with {status}{}", self.stderr_tail()));
            }
            let last_error = match self.provider.get_chain_id().await {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "anvil did not answer eth_chainId within {START_TIMEOUT:?}: \
                     {last_error}{}",
                    self.stderr_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Anvil's stderr so far, for failure messages.
    fn stderr_tail(&self) -> String {
        let mut file = match self.stderr.try_clone() {
            Ok(file) => file,
            Err(_) => return String::new(),
        };
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_err() || file.read_to_string(&mut text).is_err() {
            return String::new();
        }
        if text.trim().is_empty() {
            String::new()
        } else {
            format!("\n--- anvil stderr ---\n{text}")
        }
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        // Best effort: the process may already have exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

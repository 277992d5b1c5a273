//! `castellan-standin-builder`: a TEST-ONLY stand-in for a block builder, used by
//! `scripts/quickstart` and its test. NOT part of the Castellan appliance.
//!
//! It speaks the Flashbots bundle format through the relay stand-in of
//! [`castellan_tests::relays`] (`eth_sendBundle`, `eth_callBundle`, `eth_cancelBundle`, with the
//! `X-Flashbots-Signature` header verified as flashbots/go-utils does and requests without a
//! valid one refused), and it produces the blocks of an anvil node started with `--no-mining`:
//! every `--block-time-ms` it sends the transactions of each non-cancelled bundle received for
//! the next block to anvil's pool and mines that block (`evm_mine`), so a bundle lands in exactly
//! the block it targeted. Transactions sent to anvil directly (the submitter's `rpc` relay) are
//! mined by the same tick.
//!
//! What a real builder does and this one does not: no auction or ordering by value, no atomicity
//! (a bundle whose first transaction fails is skipped, one whose later transaction fails is
//! partly included), no persistence across restarts.
//!
//! Prints `standin-builder listening on <url>` once it serves, then one line per block with
//! bundles in it.

use std::collections::BTreeSet;
use std::time::Duration;

use alloy::providers::{Provider, ProviderBuilder};
use castellan_tests::relays::{Behavior, Flavor, StandInRelay};
use clap::Parser;

/// Stand-in Flashbots-format builder producing anvil's blocks (development and tests only).
#[derive(Debug, Parser)]
#[command(name = "castellan-standin-builder", version)]
struct Args {
    /// anvil's JSON-RPC URL (anvil started with `--no-mining`).
    #[arg(long)]
    node_url: String,
    /// Time between blocks, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    block_time_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    anyhow::ensure!(
        args.block_time_ms >= 50,
        "--block-time-ms must be at least 50"
    );
    let url: reqwest::Url = args
        .node_url
        .parse()
        .map_err(|e| anyhow::anyhow!("--node-url {:?}: {e}", args.node_url))?;
    let node = ProviderBuilder::new().connect_http(url).erased();
    let chain = node
        .get_chain_id()
        .await
        .map_err(|e| anyhow::anyhow!("the node at {} does not answer: {e}", args.node_url))?;
    let relay = StandInRelay::start(
        Flavor::Flashbots {
            require_signature: true,
        },
        Behavior::Normal,
        Some(node.clone()),
    )
    .await;
    println!("standin-builder listening on {}", relay.url());
    println!(
        "standin-builder producing blocks of chain {chain} at {} every {} ms",
        args.node_url, args.block_time_ms
    );

    let mut tick = tokio::time::interval(Duration::from_millis(args.block_time_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let head = match node.get_block_number().await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("standin-builder: the node does not answer: {e}");
                continue;
            }
        };
        let next = head + 1;
        let cancelled = relay.cancelled();
        let mut seen = BTreeSet::new();
        let mut included = Vec::new();
        for r in relay.received() {
            let Some(bundle) = r.bundle else { continue };
            if bundle.block != next
                || bundle.txs.is_empty()
                || bundle.uuid.as_ref().is_some_and(|u| cancelled.contains(u))
                || !seen.insert(bundle.txs.clone())
            {
                continue;
            }
            let mut sent = 0;
            for tx in &bundle.txs {
                match node.send_raw_transaction(tx).await {
                    Ok(_) => sent += 1,
                    Err(e) => {
                        eprintln!(
                            "standin-builder: block {next}: a bundle transaction is not includable: {e}"
                        );
                        break;
                    }
                }
            }
            if sent > 0 {
                included.push(format!(
                    "{sent} tx(s) signed for the relay by {}",
                    r.signer.map_or("?".to_owned(), |a| a.to_string())
                ));
            }
        }
        if let Err(e) = node
            .raw_request::<_, serde_json::Value>("evm_mine".into(), ())
            .await
        {
            eprintln!("standin-builder: evm_mine failed: {e}");
            continue;
        }
        for line in included {
            println!("standin-builder: block {next}: bundle of {line}");
        }
        let violations = relay.violations();
        if violations.len() > reported {
            for v in violations.iter().skip(reported) {
                eprintln!("standin-builder: refused: {v}");
            }
            reported = violations.len();
        }
    }
    Ok(())
}

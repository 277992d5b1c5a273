//! Castellan submitter: relay adapters, fan-out, resubmission, inclusion tracking.
//!
//! The submitter receives signed bundles from the signer ([`api::router`]), validates them
//! ([`bundle`]), optionally simulates them, and sends them to the selected relays
//! ([`relay`]) for every block of their range ([`engine`]) until they are included, expire, are
//! cancelled, or one of their nonces is consumed elsewhere. It holds no keys: the
//! `X-Flashbots-Signature` comes from the signer through a [`auth::RelayAuthSigner`].
//!
//! Persistence: accepted bundles are in SQLite ([`store`]) before they are acknowledged.

pub mod api;
pub mod auth;
pub mod bundle;
pub mod config;
pub mod engine;
pub mod error;
pub mod health;
pub mod metrics;
pub mod node;
pub mod relay;
pub mod signer;
pub mod store;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

pub use engine::{Engine, EngineConfig, LogOutcomes, OutcomeSink};
pub use error::{ApiError, Error};

/// Builds an engine from a configuration: relays, node client, store (not yet restored).
pub fn build_engine(
    config: &config::Config,
    auth: Option<Arc<dyn auth::RelayAuthSigner>>,
    store: store::Store,
    sink: Arc<dyn OutcomeSink>,
) -> Result<Engine, Error> {
    let metrics = metrics::Metrics::new();
    let mut relays = Vec::new();
    for spec in config.relay_specs()? {
        relays.push(Arc::new(relay::Relay::new(
            spec,
            config.health,
            auth.clone(),
            metrics.clone(),
        )?));
    }
    let node = node::Node::new(
        &config.chain.node_url,
        Duration::from_millis(config.chain.node_timeout_ms),
    )?;
    Ok(Engine::new(
        EngineConfig {
            chain_id: config.chain.chain_id,
            confirmations: config.chain.confirmations,
            max_block_range: config.chain.max_block_range,
        },
        relays,
        node,
        store,
        sink,
        metrics,
    ))
}

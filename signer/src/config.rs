//! `signer.toml`: the signer's configuration, parsed once at start into typed values.
//!
//! Unknown fields are refused everywhere; no secret is ever written in this file (PINs come from
//! their own 0600 files or the environment). `deploy/signer.toml` is a commented example.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use castellan_api::submitter::Role;
use castellan_api::tls::{ClientTlsConfig, Identity, ServerTlsConfig};
use serde::{Deserialize, Deserializer};

use crate::backend::ledger::LedgerConfig;
use crate::backend::pkcs11::Pkcs11Config;
use crate::backend::yubihsm::YubiHsmConfig;

/// The whole configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerConfig {
    /// The one chain this signer signs for (the chain-id guard).
    pub chain_id: u64,
    /// The mTLS API listener.
    pub listen: SocketAddr,
    /// TLS of the API listener.
    pub tls: ServerTlsConfig,
    /// Who may call, with which roles and keys.
    #[serde(default, rename = "identities")]
    pub identity_list: Vec<IdentityConfig>,
    /// The key backend (where keys are generated and used).
    pub backend: BackendConfig,
    /// The store.
    pub store: StoreConfig,
    /// The policy file.
    pub policy: PolicyFileConfig,
    /// The audit chain.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The submitter, if bundles are to be forwarded.
    #[serde(default)]
    pub submitter: Option<SubmitterClientConfig>,
    /// A trusted upstream node for the read-only JSON-RPC methods.
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    /// The Prometheus metrics listener (plain HTTP, bind it to a private address).
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Process hardening.
    #[serde(default)]
    pub hardening: HardeningConfig,
    /// Thread scheduling.
    #[serde(default)]
    pub scheduling: SchedulingConfig,
}

/// One caller identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The identity as read from the client certificate (SAN URI, SAN DNS or CN).
    pub identity: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// Key names it may use (strategy), or `"*"` for every key.
    #[serde(default)]
    pub keys: Vec<String>,
}

/// Where keys live. A tagged enum: the backend is configuration, not a build feature.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// A PKCS#11 token.
    Pkcs11(Pkcs11Config),
    /// A YubiHSM 2 over its native protocol (`type = "yubihsm"`).
    #[serde(rename = "yubihsm")]
    YubiHsm(YubiHsmConfig),
    /// A Ledger's Ethereum app over USB HID (`type = "ledger"`).
    Ledger(LedgerConfig),
}

/// The store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Path of the SQLite database.
    pub path: PathBuf,
}

/// The policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFileConfig {
    /// Path of the policy TOML.
    pub path: PathBuf,
}

/// The audit chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A checkpoint signed by the audit key every this many records (0: never).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Name of the key that signs checkpoints (its policy must allow nothing else).
    #[serde(default)]
    pub key: Option<String>,
    /// How often upkeep runs (pruning expired reservations, checkpointing when due).
    #[serde(default = "default_upkeep_interval", deserialize_with = "duration")]
    pub interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: default_checkpoint_every(),
            key: None,
            interval: default_upkeep_interval(),
        }
    }
}

/// How the signer reaches the submitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitterClientConfig {
    /// Base URL, e.g. `https://127.0.0.1:9545`.
    pub url: String,
    /// Client TLS (the signer's client certificate, role `signer` at the submitter).
    pub tls: ClientTlsConfig,
    /// Timeout of one call.
    #[serde(default = "default_submitter_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

/// The trusted upstream node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// JSON-RPC URL.
    pub url: String,
    /// Timeout of one forwarded call.
    #[serde(default = "default_upstream_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

/// The metrics listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the plain-HTTP Prometheus endpoint.
    pub listen: SocketAddr,
}

/// Request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted request body.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Signing requests admitted at once to the HSM stage.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Requests allowed to wait for admission; beyond it, 503 with `Retry-After`.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Longest wait for admission (`"250ms"`, `"1s"`); a request that waited this long is
    /// refused with 503.
    #[serde(
        default = "default_queue_wait",
        deserialize_with = "crate::backend::device_duration"
    )]
    pub queue_wait: Duration,
    /// How long a request waiting for approvals lives.
    #[serde(default = "default_pending_ttl", deserialize_with = "duration")]
    pub pending_ttl: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            max_in_flight: default_in_flight(),
            queue: default_queue(),
            queue_wait: default_queue_wait(),
            pending_ttl: default_pending_ttl(),
        }
    }
}

/// Process hardening.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardeningConfig {
    /// Start even when running as root (refused by default).
    #[serde(default)]
    pub allow_root: bool,
    /// Do not lock memory (`mlockall`), e.g. where `RLIMIT_MEMLOCK` cannot be raised.
    #[serde(default)]
    pub no_mlock: bool,
}

/// Thread scheduling (see [`crate::sched`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulingConfig {
    /// The key device's worker threads preempt the signer's other threads, never the other way
    /// round (`SCHED_BATCH` for every thread but the device's). No privilege needed.
    #[serde(default = "yes")]
    pub device_first: bool,
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self { device_first: true }
    }
}

fn yes() -> bool {
    true
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The TOML is malformed or has unknown or mistyped fields (the message names line and
    /// field).
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// The values contradict each other.
    #[error("{0}")]
    Invalid(String),
}

/// Roles and keys of one identity, resolved for lookups on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// Roles held.
    pub roles: HashSet<Role>,
    /// Keys usable (`None`: every key).
    pub keys: Option<BTreeSet<String>>,
}

impl Grants {
    /// Whether the identity holds `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether the identity may use the key `name`.
    pub fn may_use(&self, name: &str) -> bool {
        self.keys.as_ref().is_none_or(|k| k.contains(name))
    }
}

impl SignerConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: SignerConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            reason: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = BTreeSet::new();
        for id in &self.identity_list {
            if !seen.insert(id.identity.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "identity {:?} is listed twice",
                    id.identity
                )));
            }
            if id.roles.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "identity {:?} has no roles",
                    id.identity
                )));
            }
            if id.roles.contains(&Role::Signer) {
                return Err(ConfigError::Invalid(format!(
                    "identity {:?}: role `signer` is the submitter's view of this process, not a \
                     role at the signer",
                    id.identity
                )));
            }
        }
        if self.limits.max_in_flight == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_in_flight must be at least 1".into(),
            ));
        }
        match &self.backend {
            BackendConfig::Pkcs11(p) => p
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("backend: {e}")))?,
            BackendConfig::YubiHsm(y) => y
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("backend: {e}")))?,
            BackendConfig::Ledger(l) => l
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("backend: {e}")))?,
        }
        Ok(())
    }

    /// The identity table: identity → roles and keys.
    pub fn identities(&self) -> BTreeMap<Identity, Grants> {
        self.identity_list
            .iter()
            .map(|i| {
                let keys = if i.keys.iter().any(|k| k == "*") {
                    None
                } else {
                    Some(i.keys.iter().cloned().collect())
                };
                (
                    Identity::new(i.identity.clone()),
                    Grants {
                        roles: i.roles.iter().copied().collect(),
                        keys,
                    },
                )
            })
            .collect()
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    castellan_policy::parse_duration(&s)
        .map(Duration::from_secs)
        .map_err(serde::de::Error::custom)
}

fn default_checkpoint_every() -> u64 {
    1000
}
fn default_upkeep_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_submitter_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_in_flight() -> usize {
    64
}
fn default_queue() -> usize {
    256
}
fn default_queue_wait() -> Duration {
    Duration::from_millis(250)
}
fn default_pending_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MINIMAL: &str = r#"
chain_id = 31337
listen = "127.0.0.1:0"
[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
[[identities]]
identity = "spiffe://castellan/strategy/alpha"
roles = ["strategy"]
keys = ["searcher-hot"]
[[identities]]
identity = "ops"
roles = ["admin", "auditor"]
keys = ["*"]
[backend]
type = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "castellan"
pin_file = "pin"
[store]
path = "signer.db"
[policy]
path = "policy.toml"
[limits]
pending_ttl = "10m"
"#;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = SignerConfig::parse(MINIMAL, "t").unwrap();
        assert_eq!(c.chain_id, 31337);
        assert_eq!(c.limits.pending_ttl, Duration::from_secs(600));
        assert_eq!(c.audit.checkpoint_every, 1000);
        let ids = c.identities();
        let alpha = &ids[&Identity::new("spiffe://castellan/strategy/alpha")];
        assert!(alpha.has(Role::Strategy) && !alpha.has(Role::Admin));
        assert!(alpha.may_use("searcher-hot") && !alpha.may_use("treasury"));
        assert!(ids[&Identity::new("ops")].may_use("anything"));
    }

    #[test]
    fn the_deploy_example_parses() {
        let c = SignerConfig::parse(
            include_str!("../../deploy/signer.toml"),
            "deploy/signer.toml",
        )
        .unwrap();
        assert_eq!(c.chain_id, 1);
        assert_eq!(c.identities().len(), 4);
        assert!(c.submitter.is_some() && c.upstream.is_some() && c.metrics.is_some());
        assert!(c.scheduling.device_first);
    }

    #[test]
    fn the_device_comes_first_unless_configured_otherwise() {
        let c = SignerConfig::parse(MINIMAL, "t").unwrap();
        assert!(c.scheduling.device_first);
        let c = SignerConfig::parse(
            &format!("{MINIMAL}\n[scheduling]\ndevice_first = false\n"),
            "t",
        )
        .unwrap();
        assert!(!c.scheduling.device_first);
        let e = SignerConfig::parse(
            &format!("{MINIMAL}\n[scheduling]\ndevice_frist = true\n"),
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("device_frist"), "{e}");
    }

    #[test]
    fn unknown_fields_and_contradictions_are_refused() {
        let e = SignerConfig::parse(&MINIMAL.replace("chain_id", "chain_idd"), "t").unwrap_err();
        assert!(e.to_string().contains("chain_idd"), "{e}");
        let e = SignerConfig::parse(
            &MINIMAL.replace("\"ops\"", "\"spiffe://castellan/strategy/alpha\""),
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e = SignerConfig::parse(
            &MINIMAL.replace("[\"admin\", \"auditor\"]", "[\"root\"]"),
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("root"), "{e}");
        let e = SignerConfig::parse(&MINIMAL.replace("pin_file = \"pin\"", ""), "t").unwrap_err();
        assert!(e.to_string().contains("pin"), "{e}");
        let e =
            SignerConfig::parse(&MINIMAL.replace("\"10m\"", "\"10 parsecs\""), "t").unwrap_err();
        assert!(
            e.to_string().contains("pending_ttl") || e.to_string().contains("10 parsecs"),
            "{e}"
        );
    }
}

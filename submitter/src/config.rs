//! `submitter.toml`: parsed once into typed values (unknown fields rejected), then validated.
//! A commented example lives at `deploy/submitter.toml`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use castellan_api::submitter::Role;
use castellan_api::tls::{Identity, ServerTlsConfig};
use secrecy::SecretString;
use serde::Deserialize;

use crate::Error;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// API listener.
    pub api: ApiConfig,
    /// TLS of the API listener: TLS 1.3 with a required client certificate (there is no
    /// plain-HTTP mode).
    pub tls: ServerTlsConfig,
    /// Who may call the API, with which roles (`[[identities]]`); any other certificate identity
    /// is refused with 403 `unknown_identity`.
    #[serde(default, rename = "identities")]
    pub identity_list: Vec<IdentityConfig>,
    /// The chain and the node the submitter follows.
    pub chain: ChainConfig,
    /// Durable store of accepted bundles.
    pub store: StoreConfig,
    /// Relay health and breaker.
    #[serde(default)]
    pub health: HealthConfig,
    /// The signer (relay-auth signatures, outcome reports); without it, relays that sign are
    /// refused and outcomes go to the log.
    #[serde(default)]
    pub signer: Option<crate::signer::SignerConfig>,
    /// Relays and builders.
    #[serde(rename = "relay", default)]
    pub relays: Vec<RelayConfig>,
}

/// One `[[identities]]` table: a certificate identity and its roles.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The identity as read from the client certificate (SAN URI, SAN DNS or CN).
    pub identity: String,
    /// Its roles: `signer` (the signer process: submit, status, cancel, relay health), `admin`
    /// (an operator: status, cancel, cancel by key, relay health), `auditor` (relay health).
    pub roles: Vec<Role>,
}

/// API listener settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the mTLS API listener (port 0: any free port, printed at start).
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics listener: plain HTTP without authentication, so bind
    /// it to a private (loopback or management-network) address.
    pub metrics_listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

/// Chain settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// Chain id every bundle transaction must carry.
    pub chain_id: u64,
    /// JSON-RPC URL of the node used for head tracking, receipts and nonces.
    pub node_url: String,
    /// How often `eth_blockNumber` is polled, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Blocks on top of the inclusion block before an inclusion is final.
    #[serde(default = "default_confirmations")]
    pub confirmations: u64,
    /// Largest accepted `lastBlock - targetBlock`.
    #[serde(default = "default_max_range")]
    pub max_block_range: u64,
    /// Timeout of one node request, in milliseconds.
    #[serde(default = "default_node_timeout_ms")]
    pub node_timeout_ms: u64,
}

/// Store settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Path of the SQLite database (created if missing).
    pub path: PathBuf,
}

/// Health and breaker settings.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Consecutive failures that open a relay's breaker.
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    /// How long an open breaker stays open before one probe is let through, in milliseconds.
    #[serde(default = "default_cooldown_ms")]
    pub cooldown_ms: u64,
    /// Weight of the newest sample in the error-rate and latency averages (0 < alpha ≤ 1).
    #[serde(default = "default_alpha")]
    pub ewma_alpha: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            failure_threshold: default_threshold(),
            cooldown_ms: default_cooldown_ms(),
            ewma_alpha: default_alpha(),
        }
    }
}

impl HealthConfig {
    /// The cooldown as a duration.
    pub fn cooldown(&self) -> Duration {
        Duration::from_millis(self.cooldown_ms)
    }
}

/// Which wire format and defaults a relay uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayKind {
    /// The Flashbots relay (signature required; `eth_callBundle`, `eth_cancelBundle`).
    Flashbots,
    /// A builder speaking the Flashbots format (Titan, BuilderNet, rsync, Quasar, …).
    Builder,
    /// Eden's legacy bundle endpoint: Flashbots format, disabled unless enabled explicitly.
    Eden,
    /// bloXroute Cloud API (`blxr_*`, object params, `Authorization` header).
    Bloxroute,
    /// Plain `eth_sendRawTransaction` to a node: public mempool, opt-in only.
    Rpc,
}

/// How a relay cancels a bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelStyle {
    /// `eth_cancelBundle {replacementUuid}`.
    EthCancelBundle,
    /// Resend with the same uuid and no transactions.
    EmptyTxs,
    /// The relay cannot cancel.
    None,
}

/// Which field orders replacements of the same uuid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplacementOrdering {
    /// BuilderNet `replacementNonce`.
    ReplacementNonce,
    /// Titan `replacementSeqNumber`.
    ReplacementSeqNumber,
}

/// One `[[relay]]` table as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Unique name (used in relay selection, status and metrics).
    pub name: String,
    /// Wire format.
    pub kind: RelayKind,
    /// Endpoint URL.
    pub url: String,
    /// Whether the relay is used at all (default: true, except `eden`).
    pub enabled: Option<bool>,
    /// Whether the relay is in the "all"/"weighted" selections (default: true, except `eden`
    /// and `rpc`, which must be named in a request or set here explicitly).
    pub default: Option<bool>,
    /// Request timeout in milliseconds (default 2000; 4000 for simulations).
    pub timeout_ms: Option<u64>,
    /// Connect timeout in milliseconds (default 800).
    pub connect_timeout_ms: Option<u64>,
    /// Sustained requests per second (token bucket; default 20).
    pub rate_per_second: Option<f64>,
    /// Bucket size (default 40).
    pub burst: Option<u32>,
    /// Sign requests with `X-Flashbots-Signature` (flashbots: always; builder/eden default true).
    pub sign: Option<bool>,
    /// Cancel style (default per kind).
    pub cancel: Option<CancelStyle>,
    /// Whether this relay is used for simulation (flashbots default true).
    pub simulate: Option<bool>,
    /// Replacement-ordering field to send (builders).
    pub replacement_ordering: Option<ReplacementOrdering>,
    /// `builders` list for the Flashbots relay (relay-side multiplexing).
    #[serde(default)]
    pub builders: Vec<String>,
    /// bloXroute: file holding the `Authorization` value (mode 0600).
    pub auth_header_file: Option<PathBuf>,
    /// bloXroute: `mev_builders` names (default `["all"]`).
    #[serde(default)]
    pub mev_builders: Vec<String>,
}

/// A relay's validated settings.
#[derive(Clone)]
pub struct RelaySpec {
    /// Unique name.
    pub name: String,
    /// Wire format.
    pub kind: RelayKind,
    /// Endpoint URL.
    pub url: reqwest::Url,
    /// In the default selection.
    pub default: bool,
    /// Request timeout.
    pub timeout: Duration,
    /// Simulation timeout.
    pub sim_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Token-bucket rate.
    pub rate_per_second: f64,
    /// Token-bucket size.
    pub burst: u32,
    /// Sign with `X-Flashbots-Signature`.
    pub sign: bool,
    /// Cancel style.
    pub cancel: CancelStyle,
    /// Offers simulation.
    pub simulate: bool,
    /// Replacement-ordering field.
    pub replacement_ordering: Option<ReplacementOrdering>,
    /// Flashbots `builders`.
    pub builders: Vec<String>,
    /// bloXroute `Authorization` value.
    pub auth_header: Option<SecretString>,
    /// bloXroute `mev_builders`.
    pub mev_builders: Vec<String>,
}

impl std::fmt::Debug for RelaySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url.as_str())
            .field("default", &self.default)
            .field("sign", &self.sign)
            .field("cancel", &self.cancel)
            .field("simulate", &self.simulate)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let config: Config =
            toml::from_str(text).map_err(|e| Error::Config(format!("submitter.toml: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        let mut names = BTreeSet::new();
        for r in &self.relays {
            if !names.insert(r.name.as_str()) {
                return Err(Error::Config(format!("duplicate relay name {:?}", r.name)));
            }
        }
        if !(self.health.ewma_alpha > 0.0 && self.health.ewma_alpha <= 1.0) {
            return Err(Error::Config("health.ewma_alpha must be in (0, 1]".into()));
        }
        if self.health.failure_threshold == 0 {
            return Err(Error::Config("health.failure_threshold must be ≥ 1".into()));
        }
        if self.chain.poll_interval_ms == 0 {
            return Err(Error::Config("chain.poll_interval_ms must be ≥ 1".into()));
        }
        let mut seen = BTreeSet::new();
        for id in &self.identity_list {
            let err = |m: &str| Error::Config(format!("identity {:?}: {m}", id.identity));
            if id.identity.is_empty() {
                return Err(Error::Config("an identity must not be empty".into()));
            }
            if !seen.insert(id.identity.as_str()) {
                return Err(err("listed twice"));
            }
            if id.roles.is_empty() {
                return Err(err("has no roles"));
            }
            if let Some(r) = id
                .roles
                .iter()
                .find(|r| !matches!(r, Role::Signer | Role::Admin | Role::Auditor))
            {
                return Err(err(&format!(
                    "role {r:?} means nothing at the submitter (signer, admin, auditor)"
                )));
            }
        }
        Ok(())
    }

    /// The identity table: certificate identity → roles.
    pub fn identities(&self) -> BTreeMap<Identity, Vec<Role>> {
        self.identity_list
            .iter()
            .map(|i| (Identity::new(i.identity.clone()), i.roles.clone()))
            .collect()
    }

    /// Validated specs of the enabled relays (reads secret files).
    pub fn relay_specs(&self) -> Result<Vec<RelaySpec>, Error> {
        let mut out = Vec::new();
        for r in &self.relays {
            if let Some(spec) = r.to_spec()? {
                out.push(spec);
            }
        }
        Ok(out)
    }
}

impl RelayConfig {
    /// Validates this relay; `None` when it is disabled.
    pub fn to_spec(&self) -> Result<Option<RelaySpec>, Error> {
        let err = |m: &str| Error::Config(format!("relay {:?}: {m}", self.name));
        let kind = self.kind;
        let enabled = self.enabled.unwrap_or(kind != RelayKind::Eden);
        if !enabled {
            return Ok(None);
        }
        let url: reqwest::Url = self.url.parse().map_err(|_| err("invalid url"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(err("url must be http or https"));
        }
        let flashbots_family = matches!(
            kind,
            RelayKind::Flashbots | RelayKind::Builder | RelayKind::Eden
        );
        let sign = match (kind, self.sign) {
            (RelayKind::Flashbots, Some(false)) => {
                return Err(err("the Flashbots relay requires the signature"));
            }
            (RelayKind::Flashbots, _) => true,
            (RelayKind::Builder | RelayKind::Eden, s) => s.unwrap_or(true),
            (RelayKind::Bloxroute | RelayKind::Rpc, Some(true)) => {
                return Err(err("this kind does not use X-Flashbots-Signature"));
            }
            (RelayKind::Bloxroute | RelayKind::Rpc, _) => false,
        };
        let cancel = match (kind, self.cancel) {
            (RelayKind::Rpc, Some(c)) if c != CancelStyle::None => {
                return Err(err("rpc relays cannot cancel"));
            }
            (RelayKind::Rpc, _) => CancelStyle::None,
            (RelayKind::Bloxroute, Some(CancelStyle::EthCancelBundle)) => {
                return Err(err(
                    "bloXroute cancels by an empty resend (cancel = \"empty_txs\")",
                ));
            }
            (RelayKind::Bloxroute, c) => c.unwrap_or(CancelStyle::EmptyTxs),
            (_, c) => c.unwrap_or(CancelStyle::EthCancelBundle),
        };
        let simulate = match (kind, self.simulate) {
            (RelayKind::Rpc, Some(true)) => return Err(err("rpc relays cannot simulate")),
            (RelayKind::Flashbots, s) => s.unwrap_or(true),
            (_, s) => s.unwrap_or(false),
        };
        if !flashbots_family && self.replacement_ordering.is_some() {
            return Err(err(
                "replacement_ordering applies to Flashbots-format builders",
            ));
        }
        if kind != RelayKind::Flashbots && !self.builders.is_empty() {
            return Err(err("builders applies to the Flashbots relay"));
        }
        let auth_header = match (kind, &self.auth_header_file) {
            (RelayKind::Bloxroute, Some(path)) => Some(read_secret_file(path)?),
            (RelayKind::Bloxroute, None) => return Err(err("auth_header_file is required")),
            (_, Some(_)) => return Err(err("auth_header_file applies to bloXroute")),
            (_, None) => None,
        };
        if kind != RelayKind::Bloxroute && !self.mev_builders.is_empty() {
            return Err(err("mev_builders applies to bloXroute"));
        }
        let default = self
            .default
            .unwrap_or(!matches!(kind, RelayKind::Rpc | RelayKind::Eden));
        let rate = self.rate_per_second.unwrap_or(20.0);
        if rate.is_nan() || rate <= 0.0 {
            return Err(err("rate_per_second must be > 0"));
        }
        let timeout = Duration::from_millis(self.timeout_ms.unwrap_or(2000));
        Ok(Some(RelaySpec {
            name: self.name.clone(),
            kind,
            url,
            default,
            timeout,
            sim_timeout: Duration::from_millis(self.timeout_ms.map_or(4000, |t| t.max(1) * 2)),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms.unwrap_or(800)),
            rate_per_second: rate,
            burst: self.burst.unwrap_or(40).max(1),
            sign,
            cancel,
            simulate,
            replacement_ordering: self.replacement_ordering,
            builders: self.builders.clone(),
            auth_header,
            mev_builders: if self.mev_builders.is_empty() && kind == RelayKind::Bloxroute {
                vec!["all".to_owned()]
            } else {
                self.mev_builders.clone()
            },
        }))
    }
}

/// Reads a secret from a file that only its owner may read (mode 0600 or stricter).
///
/// # Security
/// The value becomes a `SecretString` at once; neither it nor its length is logged, and a file
/// readable by group or others is refused.
pub fn read_secret_file(path: &Path) -> Result<SecretString, Error> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Config(format!("cannot stat {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::Config(format!(
            "{} must not be readable by group or others (chmod 600)",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
    let value = text.trim_end_matches(['\n', '\r']).to_owned();
    if value.is_empty() || value.contains(['\n', '\r']) {
        return Err(Error::Config(format!(
            "{} must hold one non-empty line",
            path.display()
        )));
    }
    Ok(SecretString::from(value))
}

fn default_max_body() -> usize {
    1 << 20
}
fn default_poll_ms() -> u64 {
    250
}
fn default_confirmations() -> u64 {
    2
}
fn default_max_range() -> u64 {
    64
}
fn default_node_timeout_ms() -> u64 {
    2000
}
fn default_threshold() -> u32 {
    3
}
fn default_cooldown_ms() -> u64 {
    5000
}
fn default_alpha() -> f64 {
    0.2
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use secrecy::ExposeSecret;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn deploy_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/submitter.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        // The example names a bloXroute secret file that does not exist here: parse the
        // structure, and check the relays that need no secret.
        let config = Config::parse(&text).unwrap();
        assert!(config.relays.iter().any(|r| r.kind == RelayKind::Flashbots));
        let eden = config
            .relays
            .iter()
            .find(|r| r.kind == RelayKind::Eden)
            .unwrap();
        assert!(eden.to_spec().unwrap().is_none(), "eden is off by default");
        for r in config
            .relays
            .iter()
            .filter(|r| r.kind != RelayKind::Bloxroute)
        {
            let spec = r.to_spec().unwrap();
            if let Some(spec) = spec {
                assert_eq!(
                    spec.default,
                    r.kind != RelayKind::Rpc || r.default == Some(true)
                );
            }
        }
    }

    /// A minimal valid file; `api_extra` goes into `[api]`, `tail` after everything.
    fn minimal(api_extra: &str, tail: &str) -> String {
        format!(
            r#"
            [api]
            listen = "127.0.0.1:1"
            metrics_listen = "127.0.0.1:2"
            {api_extra}
            [tls]
            cert = "/etc/castellan/tls/submitter-server.pem"
            key = "/etc/castellan/tls/submitter-server.key"
            client_ca = "/etc/castellan/tls/ca.pem"
            [chain]
            chain_id = 1
            node_url = "http://127.0.0.1:8545"
            [store]
            path = "/tmp/x.db"
            {tail}
        "#
        )
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Config::parse(&minimal("surprise = 1", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("surprise"), "{err}");
        let err = Config::parse(&minimal(
            "",
            "[[identities]]\nidentity = \"a\"\nroles = [\"signer\"]\nkeys = [\"*\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("keys"), "{err}");
    }

    #[test]
    fn tls_is_required() {
        let text = minimal("", "").replace("[tls]", "[unused_tls]");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("tls"), "{err}");
    }

    #[test]
    fn identities_map_to_roles() {
        let config = Config::parse(&minimal(
            "",
            r#"
            [[identities]]
            identity = "spiffe://castellan/signer"
            roles = ["signer"]
            [[identities]]
            identity = "ops.castellan.internal"
            roles = ["admin", "auditor"]
            "#,
        ))
        .unwrap();
        let ids = config.identities();
        assert_eq!(
            ids[&Identity::new("spiffe://castellan/signer")],
            vec![Role::Signer]
        );
        assert_eq!(
            ids[&Identity::new("ops.castellan.internal")],
            vec![Role::Admin, Role::Auditor]
        );
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn bad_identity_tables_are_refused() {
        let one = |identity: &str, roles: &str| {
            format!("[[identities]]\nidentity = \"{identity}\"\nroles = [{roles}]\n")
        };
        let cases = [
            (
                one("a", "\"signer\"") + &one("a", "\"admin\""),
                "listed twice",
            ),
            (one("a", ""), "no roles"),
            (one("a", "\"strategy\""), "means nothing"),
            (one("a", "\"submitter\""), "means nothing"),
            (one("", "\"admin\""), "must not be empty"),
            (one("a", "\"root\""), "unknown variant"),
        ];
        for (tail, expected) in cases {
            let err = Config::parse(&minimal("", &tail)).unwrap_err().to_string();
            assert!(err.contains(expected), "{tail}: {err}");
        }
    }

    #[test]
    fn secret_file_must_be_0600_and_stays_out_of_debug() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth");
        std::fs::write(&path, "c2VjcmV0LXZhbHVl\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_secret_file(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret = read_secret_file(&path).unwrap();
        assert_eq!(secret.expose_secret(), "c2VjcmV0LXZhbHVl");
        let relay = RelayConfig {
            name: "bx".into(),
            kind: RelayKind::Bloxroute,
            url: "https://api.blxrbdn.com".into(),
            enabled: None,
            default: None,
            timeout_ms: None,
            connect_timeout_ms: None,
            rate_per_second: None,
            burst: None,
            sign: None,
            cancel: None,
            simulate: None,
            replacement_ordering: None,
            builders: vec![],
            auth_header_file: Some(path),
            mev_builders: vec![],
        };
        let spec = relay.to_spec().unwrap().unwrap();
        let debug = format!("{spec:?}");
        assert!(!debug.contains("c2VjcmV0"), "{debug}");
        assert_eq!(spec.cancel, CancelStyle::EmptyTxs);
        assert_eq!(spec.mev_builders, vec!["all".to_string()]);
    }

    #[test]
    fn rpc_is_never_a_silent_default() {
        let relay: RelayConfig = toml::from_str(
            r#"name = "node"
               kind = "rpc"
               url = "http://127.0.0.1:8545""#,
        )
        .unwrap();
        assert!(!relay.to_spec().unwrap().unwrap().default);
    }
}

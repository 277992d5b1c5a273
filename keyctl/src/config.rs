//! `keyctl.toml`: where the signer, the store and the key backend are.
//!
//! No secret is ever written here: the token PIN comes from its own 0600 file or the environment
//! (the backend's `pin_file` / `pin_env`), and TLS private keys are files of mode 0600.
//! `deploy/keyctl.toml` is a commented example; `keyctl dev init` writes a complete one.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use castellan_api::tls::ClientTlsConfig;
use castellan_signer::config::BackendConfig;
use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyctlConfig {
    /// Who this operator is, as written in the audit records of direct store changes.
    #[serde(default = "default_operator")]
    pub operator: String,
    /// The running signer's admin API.
    #[serde(default)]
    pub signer: Option<SignerApi>,
    /// The signer's store (direct access, also when the signer is down).
    pub store: StorePath,
    /// The key backend new versions are generated on.
    pub backend: BackendConfig,
    /// The policy file the signer runs (for the approval domain and `status`).
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// The submitter's API base URL: `status` reachability, `revoke` (cancel the key's bundles)
    /// and `rotate --sweep` / `sweep` (the sweep is sent as a bundle through it).
    #[serde(default)]
    pub submitter_url: Option<String>,
    /// Client TLS for the submitter's API (`keyctl revoke` cancels the key's live bundles; role
    /// `admin` there). Default: the `[signer]` certificate.
    #[serde(default)]
    pub submitter_tls: Option<ClientTlsConfig>,
    /// Development only: the SoftHSM configuration keyctl sets for itself (it re-executes itself
    /// with `SOFTHSM2_CONF` set, never changing its own environment).
    #[serde(default)]
    pub softhsm2_conf: Option<PathBuf>,
    /// Approvers that sign with a key on the backend's token, by name.
    #[serde(default, rename = "approvers")]
    pub approvers: Vec<ApproverConfig>,
    /// Default grace period of a rotated-out version (`"24h"`).
    #[serde(default)]
    pub rotate_grace: Option<String>,
    /// How long a revoked version's HSM object is kept before `keys destroy-due` (run by
    /// `rotate --due`) deletes it (`"7d"` by default); `keys cancel-destroy` undoes it meanwhile.
    #[serde(default)]
    pub destroy_wait: Option<String>,
    /// The Ledger (timeouts) for `keys register-ledger` and Ledger approvers, when `[backend]`
    /// is not a Ledger.
    #[serde(default)]
    pub ledger: Option<castellan_signer::backend::ledger::LedgerConfig>,
    /// `keyctl rotate --sweep` / `keyctl sweep`: the node and the identity that asks the signer
    /// for the sweep.
    #[serde(default)]
    pub sweep: Option<SweepConfig>,
}

/// How a retiring version's balance is swept to its successor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// Ethereum JSON-RPC node, only read: balance, nonce, fees and the current block (untrusted:
    /// the policy judges the transfer). The signed transfer goes to the submitter
    /// (`submitter_url`), never to this node.
    pub rpc_url: String,
    /// Client TLS of an identity with role `strategy` that may use the swept keys.
    pub tls: ClientTlsConfig,
    /// Client TLS for the submitter of an identity with role `signer` there (it submits the
    /// sweep bundle and reads its status). Default: `submitter_tls`, then the `[signer]`
    /// certificate.
    #[serde(default)]
    pub submitter_tls: Option<ClientTlsConfig>,
    /// Priority fee in wei (default 1 gwei); the max fee is twice the base fee plus this.
    #[serde(default)]
    pub priority_fee_wei: Option<u128>,
    /// How many blocks after the current one the sweep bundle targets (default 25).
    #[serde(default)]
    pub blocks: Option<u64>,
    /// Seconds to wait for the submitter to report the sweep included (default 60; 0: do not
    /// wait).
    #[serde(default)]
    pub confirm_timeout_secs: Option<u64>,
}

/// The signer's API, as an admin client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerApi {
    /// Base URL, e.g. `https://127.0.0.1:8443`.
    pub url: String,
    /// Client TLS with the admin certificate.
    pub tls: ClientTlsConfig,
    /// Seconds before a call is given up (default 5).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// The store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorePath {
    /// Path of the SQLite database.
    pub path: PathBuf,
}

/// One approver whose EIP-712 key lives on the token (`key_label`) or on a Ledger
/// (`ledger_path`): exactly one of the two.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    /// Name used on the command line (`keyctl approve --as <name>`).
    pub name: String,
    /// `CKA_LABEL` of the approver's key on the token.
    #[serde(default)]
    pub key_label: Option<String>,
    /// Derivation path of the approver's key on a Ledger (`"m/44'/60'/0'/0/0"`); the device
    /// shows the approval (EIP-712) before signing.
    #[serde(default)]
    pub ledger_path: Option<String>,
    /// The approver's client certificate (role `approver` at the signer).
    pub tls: ClientTlsConfig,
}

impl KeyctlConfig {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: Self = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                path.display(),
                e.to_string().trim_end().replace('\n', " ")
            )
        })?;
        if let BackendConfig::Pkcs11(p) = &config.backend {
            p.validate()
                .map_err(|e| anyhow::anyhow!("{}: backend: {e}", path.display()))?;
        }
        if let Some(g) = &config.rotate_grace {
            crate::parse_duration_ms(g)
                .with_context(|| format!("{}: rotate_grace", path.display()))?;
        }
        for a in &config.approvers {
            if a.key_label.is_some() == a.ledger_path.is_some() {
                bail!(
                    "{}: approver {:?} needs exactly one of key_label and ledger_path",
                    path.display(),
                    a.name
                );
            }
        }
        if let Some(w) = &config.destroy_wait {
            crate::parse_duration_ms(w)
                .with_context(|| format!("{}: destroy_wait", path.display()))?;
        }
        Ok(config)
    }

    /// The signer API settings, or a one-line error telling what is missing.
    pub fn signer_api(&self) -> anyhow::Result<&SignerApi> {
        match &self.signer {
            Some(s) => Ok(s),
            None => {
                bail!("keyctl.toml has no [signer] section: the signer's API is not configured")
            }
        }
    }

    /// An approver by name.
    pub fn approver(&self, name: &str) -> anyhow::Result<&ApproverConfig> {
        match self.approvers.iter().find(|a| a.name == name) {
            Some(a) => Ok(a),
            None => bail!("no approver named {name:?} in keyctl.toml"),
        }
    }
}

fn default_operator() -> String {
    "keyctl".into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_deploy_example_parses() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/keyctl.toml"
        ));
        let c = KeyctlConfig::load(path).unwrap();
        assert_eq!(c.operator, "spiffe://castellan/ops/oncall");
        assert!(c.signer_api().is_ok());
        assert_eq!(c.rotate_grace.as_deref(), Some("24h"));
        assert!(c.approver("alice").is_err());
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/keyctl.toml"
        ))
        .unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(&p, base.replace("operator =", "operatr =")).unwrap();
        assert!(format!("{:#}", KeyctlConfig::load(&p).unwrap_err()).contains("operatr"));
        std::fs::write(&p, base.replace("\"24h\"", "\"a day\"")).unwrap();
        assert!(format!("{:#}", KeyctlConfig::load(&p).unwrap_err()).contains("rotate_grace"));
        // Approvers: on the token or on a Ledger, exactly one.
        let tls = "tls = { server_ca = \"/ca.pem\", cert = \"/a.pem\", key = \"/a.key\" }";
        let ledger = format!(
            "{base}\n[[approvers]]\nname = \"carol\"\nledger_path = \"m/44'/60'/0'/0/0\"\n{tls}\n"
        );
        std::fs::write(&p, &ledger).unwrap();
        let c = KeyctlConfig::load(&p).unwrap();
        assert_eq!(
            c.approver("carol").unwrap().ledger_path.as_deref(),
            Some("m/44'/60'/0'/0/0")
        );
        std::fs::write(
            &p,
            ledger.replace("name = \"carol\"", "name = \"carol\"\nkey_label = \"bob\""),
        )
        .unwrap();
        assert!(format!("{:#}", KeyctlConfig::load(&p).unwrap_err()).contains("exactly one"));
    }
}

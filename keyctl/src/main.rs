//! `keyctl`: the Castellan operator CLI.
//!
//! Parse arguments, load `keyctl.toml`, run one command, print its result (human text, or one
//! JSON document with `--json`) and exit with a documented code. Errors are one line on stderr
//! (and a JSON error object on stdout with `--json`).

mod config;
mod dev;
mod grant;
mod hsm_log;
mod ledger;
mod ops;
mod policy_lint;
mod remote;
mod sweep;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use castellan_signer::audit::UnixMillis;
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::KeyctlConfig;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the command failed (unknown key, invalid input, store or HSM error, API refusal)
  2  usage error (unknown command or flag, malformed argument)
  3  a destructive command was not confirmed (answer 'yes' or pass --yes)
  4  the signer could not be reached and the command cannot be done without it
  5  audit verification failed (the message names the first bad record)
  6  status found a problem (frozen, HSM or store unhealthy, signer or submitter unreachable)";

/// Castellan operator CLI: keys, rotation, revocation, freeze, approvals, audit.
#[derive(Debug, Parser)]
#[command(name = "keyctl", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// keyctl.toml (signer URL and admin TLS, store path, key backend).
    #[arg(
        long,
        short,
        global = true,
        env = "KEYCTL_CONFIG",
        default_value = "keyctl.toml"
    )]
    config: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Do not ask for confirmation of destructive commands.
    #[arg(long, short = 'y', global = true)]
    yes: bool,
    /// Pretend the time is this (unix seconds). For tests and dry runs of schedules.
    #[arg(long, global = true, hide = true, env = "KEYCTL_NOW")]
    now: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Development appliance.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Provision an appliance: check the token login and create (or migrate) the store.
    Init {
        /// Initialise a SoftHSM token with this label first (development and CI only).
        #[arg(long)]
        softhsm_label: Option<String>,
    },
    /// Key generation and listing.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Generate the next version of a key, activate it, and let the old one retire.
    Rotate {
        /// The key to rotate (omit with --due).
        name: Option<String>,
        /// Rotate every key past its schedule, and retire versions whose grace period ended.
        #[arg(long, conflicts_with = "name")]
        due: bool,
        /// How long the old version stays `retiring` (e.g. "24h"; "0s" retires it at once).
        #[arg(long)]
        grace: Option<String>,
        /// Then move the old address's whole ETH balance (less the fee) to the new address:
        /// signed by the retiring version through the signer (policy, audit), handed to the
        /// submitter as a bundle, and waited for until included.
        #[arg(long, conflicts_with = "due")]
        sweep: bool,
    },
    /// Sweep a retiring version's ETH balance to its successor's address (again, after a
    /// failed `rotate --sweep`), or send an approved sweep request.
    Sweep {
        /// `name@N`, the retiring version.
        key: String,
        /// The id of a sweep request that waited for approvals and is now signed.
        #[arg(long)]
        request: Option<String>,
    },
    /// Revoke a key (every version) or one version (`name@N`), at once and for good.
    Revoke {
        /// `name` or `name@N`.
        key: String,
        /// Why (written in the audit chain).
        #[arg(long)]
        reason: String,
        /// Work on the store directly, without asking the signer.
        #[arg(long)]
        direct: bool,
        /// Delete the key objects on the HSM now instead of after the waiting period
        /// (`destroy_wait`). Needs a second confirmation: --confirm-destroy NAME, or typing
        /// the key's name.
        #[arg(long)]
        destroy: bool,
        /// The second confirmation of --destroy: the key's name.
        #[arg(long, value_name = "NAME", requires = "destroy")]
        confirm_destroy: Option<String>,
    },
    /// Stop all signing (global kill switch).
    Freeze {
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Ask to lift the freeze; approvers must approve the returned request.
    Unfreeze {
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Pause one key.
    Pause {
        /// The key.
        key: String,
        /// Why.
        #[arg(long)]
        reason: String,
        /// Seconds-style duration before it may resume ("15m"); none: until `resume`.
        #[arg(long)]
        cooldown: Option<String>,
    },
    /// Resume a paused key.
    Resume {
        /// The key.
        key: String,
    },
    /// Requests waiting for approvals.
    Pending,
    /// Approve a pending request with an approver's key.
    Approve(ApprovalArgs),
    /// Reject a pending request with an approver's key.
    Reject(ApprovalArgs),
    /// Budget grants: a client may spend up to a budget with a key to named destinations until
    /// a time, without waiting for approvals, once enough approvers signed.
    #[command(subcommand)]
    Grant(GrantCommand),
    /// Audit chain verification and export.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Freeze state, paused keys, due rotations, pending approvals, HSM/store/signer health.
    Status,
    /// The hardware security module itself.
    #[command(subcommand)]
    Hsm(HsmCommand),
    /// Policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Create a complete development appliance in DIR: SoftHSM token, dev CA and
    /// certificates, approver / relay-auth / trading keys, signer, submitter, policy and keyctl
    /// configuration.
    Init {
        /// The directory (created; must be empty if it exists).
        dir: PathBuf,
        /// The PKCS#11 module (SoftHSM).
        #[arg(long, env = "CASTELLAN_PKCS11_MODULE")]
        module: PathBuf,
        #[command(flatten)]
        opts: dev::DevOptions,
    },
    /// (internal) Generate and register the keys of a dev appliance; run by `dev init`.
    #[command(hide = true)]
    Provision {
        /// The directory.
        dir: PathBuf,
        #[command(flatten)]
        opts: dev::DevOptions,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate a new key on the backend and register it as active.
    Generate {
        /// Key name (`[a-z0-9][a-z0-9-]*`).
        name: String,
        /// Rotation period ("30d"); `rotate --due` rotates it when its age passes this.
        #[arg(long)]
        rotate_every: Option<String>,
    },
    /// Every key and its versions.
    List,
    /// One key: versions, addresses, status, age, next rotation.
    Show {
        /// Key name.
        name: String,
    },
    /// Register the address at a derivation path of a Ledger as a key (read from the device).
    RegisterLedger {
        /// Key name (`[a-z0-9][a-z0-9-]*`).
        name: String,
        /// BIP-32 derivation path, e.g. "m/44'/60'/0'/0/0".
        #[arg(long)]
        path: String,
        /// Rotation period ("30d").
        #[arg(long)]
        rotate_every: Option<String>,
    },
    /// Cancel the scheduled destruction of a key's versions (or one, `name@N`).
    CancelDestroy {
        /// `name` or `name@N`.
        key: String,
    },
    /// Delete the HSM objects whose destruction is due (also done by `rotate --due`).
    DestroyDue,
}

#[derive(Debug, clap::Args)]
struct ApprovalArgs {
    /// The pending request id.
    id: String,
    /// Which approver (a `[[approvers]]` name in keyctl.toml).
    #[arg(long = "as")]
    approver: String,
    /// How long the approval stays valid ("1h").
    #[arg(long, default_value = "1h")]
    ttl: String,
}

#[derive(Debug, Subcommand)]
enum GrantCommand {
    /// Write an unsigned grant file.
    New {
        /// The client identity (its certificate URI, e.g. spiffe://castellan/strategy/alpha).
        #[arg(long)]
        client: String,
        /// The key name.
        #[arg(long)]
        key: String,
        /// Budget of worst-case cost over the validity: "3" is 3 ether; "500 gwei" etc.
        #[arg(long)]
        budget: String,
        /// Allowed destination address (repeat, or comma-separated).
        #[arg(long, required = true)]
        to: Vec<String>,
        /// How long the grant counts from now ("24h").
        #[arg(long, default_value = "24h")]
        valid_for: String,
        /// Per-request value cap (default: the budget).
        #[arg(long)]
        max_value: Option<String>,
        /// Per-request worst-case cost cap (default: the budget).
        #[arg(long)]
        max_cost: Option<String>,
        /// Nonce (default: now in milliseconds).
        #[arg(long)]
        nonce: Option<u64>,
        /// The grant file to write (must not exist).
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Add an approver's EIP-712 signature (token key or Ledger) to a grant file.
    Sign {
        /// The grant file.
        file: PathBuf,
        /// Which approver (a `[[approvers]]` name in keyctl.toml).
        #[arg(long = "as")]
        approver: String,
    },
    /// Register a signed grant at the signer.
    Submit {
        /// The grant file.
        file: PathBuf,
        /// Submit with this approver's certificate instead of the admin's.
        #[arg(long = "as")]
        approver: Option<String>,
    },
    /// Every grant with spent and remaining budget.
    List,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain of the store, or of an export file.
    Verify {
        /// A JSON-lines export instead of the store.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Address of the audit key: checkpoint signatures must recover to it.
        #[arg(long)]
        audit_key: Option<String>,
    },
    /// Export records as JSON lines.
    Export {
        /// From this long ago ("24h") or this unix time (seconds).
        #[arg(long)]
        since: Option<String>,
        /// From this seq.
        #[arg(long, conflicts_with = "since")]
        from_seq: Option<u64>,
        /// Write here instead of stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum HsmCommand {
    /// Read the YubiHSM 2's own audit log (its last entries: command, session key, objects,
    /// result, tick). Fails on PKCS#11 and Ledger backends.
    Log {
        /// Acknowledge the log up to and including this entry (Set Log Index), so that with
        /// forced audit on the device keeps running logged commands. Archive the entries first;
        /// the entry must be in the log read in this run.
        #[arg(long, value_name = "ITEM")]
        ack: Option<u16>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Parse a policy file and lint it.
    Check {
        /// The policy TOML.
        file: PathBuf,
        /// Fail on lint warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// What differs between two policies (by their canonical forms).
    Diff {
        /// The current policy.
        a: PathBuf,
        /// The candidate.
        b: PathBuf,
    },
}

/// A failure with its exit code and one line for a person.
#[derive(Debug)]
pub struct Failure {
    /// The exit code (see [`EXIT_CODES`]).
    pub code: u8,
    /// One line.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Fails with a specific exit code.
pub fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Failure {
        code,
        message: message.into(),
    })
}

/// What a command prints: text for a person and the same as JSON.
pub struct Report {
    /// Human-readable lines.
    pub text: String,
    /// The JSON document.
    pub json: Value,
    /// Exit code on success paths that still report a problem (status).
    pub code: u8,
}

impl Report {
    /// A report with exit code 0.
    pub fn new(text: impl Into<String>, json: Value) -> Self {
        Self {
            text: text.into(),
            json,
            code: 0,
        }
    }
}

/// Options every command sees.
pub struct Globals {
    /// `--json`.
    pub json: bool,
    /// `--yes`.
    pub yes: bool,
    /// Now (injected with `--now` for tests).
    pub now: UnixMillis,
}

impl Globals {
    /// Asks for confirmation unless `--yes`; refuses when stdin is not a terminal.
    pub fn confirm(&self, what: &str) -> anyhow::Result<()> {
        if self.yes {
            return Ok(());
        }
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Err(fail(
                3,
                format!("{what}: not confirmed (stdin is not a terminal; pass --yes)"),
            ));
        }
        eprint!("{what}. Type 'yes' to continue: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        stdin
            .read_line(&mut line)
            .map_err(|e| fail(3, format!("{what}: not confirmed ({e})")))?;
        if line.trim() == "yes" {
            Ok(())
        } else {
            Err(fail(3, format!("{what}: not confirmed")))
        }
    }
}

impl Globals {
    /// The second confirmation of an irreversible command: `given` (a flag's value) or, on a
    /// terminal, the typed text must be exactly `name`. `--yes` does not count for it.
    pub fn confirm_name(&self, what: &str, name: &str, given: Option<&str>) -> anyhow::Result<()> {
        match given {
            Some(g) if g == name => return Ok(()),
            Some(g) => {
                return Err(fail(
                    3,
                    format!("{what}: not confirmed (--confirm-destroy names {g:?}, not {name:?})"),
                ));
            }
            None => {}
        }
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Err(fail(
                3,
                format!(
                    "{what}: not confirmed (irreversible: pass --confirm-destroy {name}; --yes \
                     does not count for it)"
                ),
            ));
        }
        eprint!("{what}. This cannot be undone. Type the key name ({name}) to continue: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        stdin
            .read_line(&mut line)
            .map_err(|e| fail(3, format!("{what}: not confirmed ({e})")))?;
        if line.trim() == name {
            Ok(())
        } else {
            Err(fail(3, format!("{what}: not confirmed")))
        }
    }
}

/// Parses "90s", "15m", "24h", "30d" into milliseconds.
pub fn parse_duration_ms(s: &str) -> anyhow::Result<u64> {
    let secs = castellan_policy::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("bad duration {s:?}: {e}"))?;
    secs.checked_mul(1000)
        .ok_or_else(|| anyhow::anyhow!("bad duration {s:?}: too long"))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other error: the first line of clap's message.
            let text = e.to_string();
            let message = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect::<Vec<_>>()
                .join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("keyctl: error: {message} (see keyctl --help)");
            return ExitCode::from(2);
        }
    };
    // reqwest is built without a default TLS provider (no aws-lc); use ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let json = cli.json;
    match run(cli) {
        Ok(report) => {
            if json && !report.json.is_null() {
                println!("{}", report.json);
            } else if !report.text.is_empty() {
                println!("{}", report.text.trim_end());
            }
            ExitCode::from(report.code)
        }
        Err(e) => {
            let (code, message) = match e.downcast_ref::<Failure>() {
                Some(f) => (f.code, f.message.clone()),
                None => (1, format!("{e:#}")),
            };
            let message = message.replace('\n', " ");
            if json {
                println!(
                    "{}",
                    json!({"error": {"exitCode": code, "message": message}})
                );
            }
            eprintln!("keyctl: error: {message}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Report> {
    let now = match cli.now {
        Some(s) => UnixMillis(s.saturating_mul(1000)),
        None => UnixMillis::now(),
    };
    let g = Globals {
        json: cli.json,
        yes: cli.yes,
        now,
    };
    // Commands that need no keyctl.toml.
    match &cli.command {
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "keyctl", &mut out);
            return Ok(Report::new(
                String::from_utf8_lossy(&out).into_owned(),
                json!({ "completions": String::from_utf8_lossy(&out) }),
            ));
        }
        Command::Dev(DevCommand::Init { dir, module, opts }) => {
            return dev::init(&g, dir, module, opts);
        }
        Command::Policy(PolicyCommand::Check { file, strict }) => {
            return policy_lint::check(file, *strict);
        }
        Command::Policy(PolicyCommand::Diff { a, b }) => return policy_lint::diff(a, b),
        Command::Grant(GrantCommand::New {
            client,
            key,
            budget,
            to,
            valid_for,
            max_value,
            max_cost,
            nonce,
            out,
        }) => {
            return grant::new_grant(
                &g,
                &grant::NewGrant {
                    client,
                    key,
                    budget,
                    max_value: max_value.as_deref(),
                    max_cost: max_cost.as_deref(),
                    to,
                    valid_for,
                    nonce: *nonce,
                    out,
                },
            );
        }
        Command::Audit(AuditCommand::Verify {
            file: Some(f),
            audit_key,
        }) => return ops::audit_verify_file(f, audit_key.as_deref()),
        _ => {}
    }
    let config = KeyctlConfig::load(&cli.config).map_err(|e| fail(1, format!("{e:#}")))?;
    if let Some(code) = reexec_with_softhsm(&config)? {
        // The child printed everything already.
        return Ok(Report {
            text: String::new(),
            json: Value::Null,
            code,
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(dispatch(cli.command, &config, &g))
}

async fn dispatch(command: Command, c: &KeyctlConfig, g: &Globals) -> anyhow::Result<Report> {
    match command {
        Command::Dev(DevCommand::Provision { dir, opts }) => {
            dev::provision(c, g, &dir, &opts).await
        }
        Command::Init { softhsm_label } => ops::init(c, g, softhsm_label.as_deref()).await,
        Command::Keys(KeysCommand::Generate { name, rotate_every }) => {
            ops::keys_generate(c, g, &name, rotate_every.as_deref()).await
        }
        Command::Keys(KeysCommand::List) => ops::keys_list(c, g, None).await,
        Command::Keys(KeysCommand::Show { name }) => ops::keys_list(c, g, Some(&name)).await,
        Command::Keys(KeysCommand::CancelDestroy { key }) => ops::cancel_destroy(c, g, &key).await,
        Command::Keys(KeysCommand::DestroyDue) => ops::destroy_due(c, g).await,
        Command::Keys(KeysCommand::RegisterLedger {
            name,
            path,
            rotate_every,
        }) => ledger::register_command(c, g, &name, &path, rotate_every.as_deref()).await,
        Command::Rotate {
            name,
            due,
            grace,
            sweep,
        } => match (name, due) {
            (Some(n), false) => ops::rotate(c, g, &n, grace.as_deref(), sweep).await,
            (None, true) => ops::rotate_due(c, g, grace.as_deref()).await,
            _ => Err(fail(2, "rotate needs a key name or --due")),
        },
        Command::Sweep { key, request } => {
            sweep::sweep_command(c, g, &key, request.as_deref()).await
        }
        Command::Revoke {
            key,
            reason,
            direct,
            destroy,
            confirm_destroy,
        } => {
            let destroy = destroy.then_some(confirm_destroy.as_deref());
            remote::revoke(c, g, &key, &reason, direct, destroy).await
        }
        Command::Freeze { reason } => remote::freeze(c, g, &reason).await,
        Command::Unfreeze { reason } => remote::unfreeze(c, g, &reason).await,
        Command::Pause {
            key,
            reason,
            cooldown,
        } => remote::pause(c, g, &key, &reason, cooldown.as_deref()).await,
        Command::Resume { key } => remote::resume(c, g, &key).await,
        Command::Pending => ops::pending(c, g),
        Command::Approve(a) => remote::approve(c, g, &a.id, &a.approver, &a.ttl, true).await,
        Command::Reject(a) => remote::approve(c, g, &a.id, &a.approver, &a.ttl, false).await,
        Command::Grant(GrantCommand::Sign { file, approver }) => {
            grant::sign(c, &file, &approver).await
        }
        Command::Grant(GrantCommand::Submit { file, approver }) => {
            grant::submit(c, &file, approver.as_deref()).await
        }
        Command::Grant(GrantCommand::List) => grant::list(c).await,
        Command::Audit(AuditCommand::Verify { audit_key, .. }) => {
            ops::audit_verify_store(c, audit_key.as_deref()).await
        }
        Command::Audit(AuditCommand::Export {
            since,
            from_seq,
            out,
        }) => ops::audit_export(c, g, since.as_deref(), from_seq, out.as_deref()).await,
        Command::Status => remote::status(c, g).await,
        Command::Hsm(HsmCommand::Log { ack }) => hsm_log::log(c, ack).await,
        Command::Completions { .. }
        | Command::Grant(GrantCommand::New { .. })
        | Command::Policy(_)
        | Command::Dev(DevCommand::Init { .. }) => Err(fail(2, "unreachable command dispatch")),
    }
}

/// SoftHSM reads `SOFTHSM2_CONF` from the process environment when the module loads. keyctl never
/// changes its own environment; when keyctl.toml names a SoftHSM configuration that is not the
/// one in the environment, it runs itself again with the variable set on the child only, and
/// returns the child's exit code.
fn reexec_with_softhsm(config: &KeyctlConfig) -> anyhow::Result<Option<u8>> {
    let Some(conf) = &config.softhsm2_conf else {
        return Ok(None);
    };
    if std::env::var_os("SOFTHSM2_CONF").as_deref() == Some(conf.as_os_str()) {
        return Ok(None);
    }
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", conf)
        .status()?;
    Ok(Some(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_cli_is_consistent_and_the_timer_command_parses() {
        Cli::command().debug_assert();
        let unit = include_str!("../../deploy/systemd/castellan-rotate.service");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        let args: Vec<&str> = exec.split_whitespace().collect();
        assert!(args[0].ends_with("/keyctl"));
        let cli = Cli::try_parse_from(args).unwrap();
        assert!(matches!(cli.command, Command::Rotate { due: true, .. }));
        assert!(
            include_str!("../../deploy/systemd/castellan-rotate.timer")
                .contains("Unit=castellan-rotate.service")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30d").unwrap(), 30 * 86_400_000);
        assert_eq!(parse_duration_ms("90s").unwrap(), 90_000);
        assert!(parse_duration_ms("3 parsecs").is_err());
    }
}

//! `keyctl hsm log`: the YubiHSM 2's own audit log, read through the backend configured in
//! keyctl.toml (`Get Log Entries`).
//!
//! The device keeps its last 62 entries (commands with their session key, objects, result and
//! tick, chained by a truncated SHA-256 digest) independently of Castellan's audit chain. By
//! default the command only reads them. When forced audit is on, the device stops executing
//! logged commands once its log is full of unacknowledged entries: archive the output, then
//! `keyctl hsm log --ack <ITEM>` acknowledges (`Set Log Index`) up to and including entry ITEM,
//! which must be in the log read in the same run (item numbers wrap at 65535, so a stale number
//! is refused rather than guessed). PKCS#11 tokens and Ledgers have no such log: the command
//! refuses them before opening anything.

use std::fmt::Write as _;

use castellan_signer::backend::yubihsm::{DeviceLog, YubiHsmBackend};
use castellan_signer::config::BackendConfig;
use serde_json::{Value, json};

use crate::config::KeyctlConfig;
use crate::{Report, fail};

/// `keyctl hsm log [--ack ITEM]`.
pub async fn log(c: &KeyctlConfig, ack: Option<u16>) -> anyhow::Result<Report> {
    let config = match &c.backend {
        BackendConfig::YubiHsm(y) => y.clone(),
        BackendConfig::Pkcs11(_) => return Err(no_device_log("pkcs11")),
        BackendConfig::Ledger(_) => return Err(no_device_log("ledger")),
    };
    // Connecting and authenticating block on the network: off the runtime.
    let backend = tokio::task::spawn_blocking(move || YubiHsmBackend::open(&config))
        .await
        .map_err(|e| fail(1, format!("opening the YubiHSM: {e}")))?
        .map_err(|e| fail(1, format!("opening the YubiHSM: {e}")))?;
    let log = backend.audit_log().await.map_err(|e| {
        fail(
            1,
            format!("reading the audit log of {}: {e}", backend.device()),
        )
    })?;
    let mut text = text(backend.device(), &log);
    let mut json = to_json(backend.device(), &log);
    if let Some(item) = ack {
        if !log.entries.iter().any(|e| e.item == item) {
            let range = match (log.entries.first(), log.entries.last()) {
                (Some(a), Some(b)) => format!(", #{} to #{}", a.item, b.item),
                _ => String::new(),
            };
            return Err(fail(
                1,
                format!(
                    "hsm log --ack {item}: entry {item} is not in the device log just read ({} \
                     entries{range}); nothing acknowledged",
                    log.entries.len()
                ),
            ));
        }
        backend
            .ack_audit_log(item)
            .await
            .map_err(|e| fail(1, format!("hsm log --ack {item}: {e}")))?;
        let _ = writeln!(text, "acknowledged the device log up to #{item}");
        json["acknowledged"] = json!(item);
    }
    Ok(Report::new(text, json))
}

fn no_device_log(kind: &str) -> anyhow::Error {
    fail(
        1,
        format!(
            "hsm log: the configured backend is {kind}, which keeps no device audit log (only a \
             YubiHSM 2 does; Castellan's own chain: keyctl audit export)"
        ),
    )
}

/// One header line, then one line per entry, oldest first.
fn text(device: &str, log: &DeviceLog) -> String {
    let mut out = format!(
        "{device}: {} log entries (unlogged: {} boot, {} auth events)\n",
        log.entries.len(),
        log.unlogged_boot_events,
        log.unlogged_auth_events
    );
    for e in &log.entries {
        let _ = writeln!(
            out,
            "#{:<5} {:<24} session 0x{:04x} target 0x{:04x} second 0x{:04x} {} tick {}",
            e.item, e.command, e.session_key, e.target_key, e.second_key, e.result, e.tick
        );
    }
    out
}

fn to_json(device: &str, log: &DeviceLog) -> Value {
    let entries: Vec<Value> = log
        .entries
        .iter()
        .map(|e| {
            json!({
                "item": e.item,
                "command": e.command,
                "length": e.length,
                "sessionKey": e.session_key,
                "targetKey": e.target_key,
                "secondKey": e.second_key,
                "result": e.result,
                "tick": e.tick,
                "digest": e.digest,
            })
        })
        .collect();
    json!({
        "device": device,
        "unloggedBootEvents": log.unlogged_boot_events,
        "unloggedAuthEvents": log.unlogged_auth_events,
        "entries": entries,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use castellan_signer::backend::yubihsm::DeviceLogEntry;

    use super::*;

    #[test]
    fn entries_print_one_line_each_and_as_json() {
        let log = DeviceLog {
            unlogged_boot_events: 1,
            unlogged_auth_events: 2,
            entries: vec![DeviceLogEntry {
                item: 7,
                command: "SignEcdsa".into(),
                length: 35,
                session_key: 1,
                target_key: 0x1234,
                second_key: 0xffff,
                result: "Success(SignEcdsa)".into(),
                tick: 4242,
                digest: "00".repeat(16),
            }],
        };
        let t = text("yubihsm http://127.0.0.1:1", &log);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[0].contains("1 log entries (unlogged: 1 boot, 2 auth events)"));
        for part in [
            "#7 ",
            "SignEcdsa",
            "session 0x0001",
            "target 0x1234",
            "second 0xffff",
            "Success(SignEcdsa)",
            "tick 4242",
        ] {
            assert!(lines[1].contains(part), "{part:?} not in {:?}", lines[1]);
        }
        let j = to_json("d", &log);
        assert_eq!(j["entries"][0]["targetKey"], 0x1234);
        assert_eq!(j["entries"][0]["command"], "SignEcdsa");
        assert_eq!(j["unloggedAuthEvents"], 2);
    }
}

//! The independent checker: eth-account (Python) recovers signers from what Castellan signs.
//!
//! `CASTELLAN_PYTHON` names a Python with `eth-account` 0.14 installed (exported by
//! `source scripts/tools.sh`, which `scripts/test` does). Without it the test fails with a message
//! saying how to run it: tests never skip silently.
//!
//! Harness code fails the test that called it, so it panics with a message (and Python's stderr)
//! instead of returning errors.
#![allow(clippy::panic, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use alloy::primitives::{Address, hex};

/// One script for every check; the first argument selects it, hex arguments follow, and typed data
/// arrives on stdin. It prints the recovered address.
const SCRIPT: &str = r#"
import json, sys
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from hexbytes import HexBytes

kind = sys.argv[1]
if kind == "transaction":
    print(Account.recover_transaction(HexBytes(sys.argv[2])))
elif kind == "personal":
    message = encode_defunct(primitive=bytes.fromhex(sys.argv[2]))
    print(Account.recover_message(message, signature=HexBytes(sys.argv[3])))
elif kind == "typed":
    message = encode_typed_data(full_message=json.loads(sys.stdin.read()))
    print(Account.recover_message(message, signature=HexBytes(sys.argv[2])))
else:
    sys.exit("unknown check " + kind)
"#;

/// The sender eth-account recovers from a signed raw transaction (`Account.recover_transaction`).
pub fn recover_transaction(raw: &[u8]) -> Address {
    run(&["transaction", &hex::encode_prefixed(raw)], "")
}

/// The signer eth-account recovers from a `personal_sign` signature over `message`
/// (`Account.recover_message(encode_defunct(message), signature)`).
pub fn recover_personal_message(message: &[u8], signature: &[u8]) -> Address {
    run(
        &[
            "personal",
            &hex::encode(message),
            &hex::encode_prefixed(signature),
        ],
        "",
    )
}

/// The signer eth-account recovers from an `eth_signTypedData_v4` signature over the typed data
/// `json` (`Account.recover_message(encode_typed_data(full_message=...), signature)`).
pub fn recover_typed_data(json: &str, signature: &[u8]) -> Address {
    run(&["typed", &hex::encode_prefixed(signature)], json)
}

fn run(args: &[&str], stdin: &str) -> Address {
    let python = std::env::var_os("CASTELLAN_PYTHON").unwrap_or_else(|| {
        panic!(
            "CASTELLAN_PYTHON is not set: run the tests with scripts/test \
             (or `source scripts/tools.sh` first)"
        )
    });
    let mut child = Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin was piped")
        .write_all(stdin.as_bytes())
        .expect("write to the checker's stdin");
    let output = child.wait_with_output().expect("wait for the checker");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "eth-account check {:?} failed ({}):\n{stderr}",
            args.first(),
            output.status
        );
    }
    stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("eth-account printed {stdout:?}, not an address: {e}\n{stderr}"))
}

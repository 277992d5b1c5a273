#!/usr/bin/env python3
"""Independent verifier for a Castellan audit-chain export (JSON lines).

Recomputes every record's hash from the canonical form documented in signer/src/audit.rs
(sorted keys, no whitespace, UTF-8, integers only; keccak256), checks seq continuity and
prev_hash links, and checks that each checkpoint names a record whose hash it matches. With
--audit-address it also checks every checkpoint's EIP-191 signature over the head hash
(needs eth-account). Exit 0 and "OK ..." when intact; exit 1 and "FAIL seq N: ..." naming the
first bad record otherwise.

usage: verify_audit.py EXPORT.jsonl [--audit-address 0x..] [--anchor-seq N --anchor-hash 0x..]
"""
import argparse
import json
import sys

from eth_hash.auto import keccak

ZERO = "0x" + "00" * 32
FIELDS = {"seq", "prev_hash", "at", "kind", "request_id", "identity", "payload", "hash"}


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def recover(hash_hex, sig_hex):
    from eth_account import Account
    from eth_account.messages import encode_defunct

    msg = encode_defunct(primitive=bytes.fromhex(hash_hex[2:]))
    return Account.recover_message(msg, signature=bytes.fromhex(sig_hex[2:]))


def verify(lines, audit_address=None, anchor=None):
    expected_seq, expected_prev = (1, ZERO) if anchor is None else (anchor[0] + 1, anchor[1])
    hashes = {} if anchor is None else {anchor[0]: anchor[1]}
    count = checkpoints = 0
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        seq = rec.get("seq")
        if set(rec) != FIELDS:
            return f"FAIL seq {seq}: members {sorted(rec)} are not the record fields"
        stored = rec.pop("hash")
        computed = "0x" + keccak(canonical(rec)).hex()
        if computed != stored:
            return f"FAIL seq {seq}: altered (contents hash to {computed}, stored {stored})"
        if seq != expected_seq:
            what = "records dropped or moved" if seq > expected_seq else "reordered or duplicated"
            return f"FAIL seq {seq}: seq gap, expected {expected_seq} ({what})"
        if rec["prev_hash"] != expected_prev:
            return f"FAIL seq {seq}: prev_hash does not link to record {seq - 1}"
        if rec["kind"] == "checkpoint":
            p = rec["payload"]
            if not isinstance(p.get("seq"), int) or p["seq"] >= seq:
                return f"FAIL seq {seq}: bad checkpoint: seq {p.get('seq')}"
            if p["seq"] in hashes and hashes[p["seq"]] != p.get("hash"):
                return f"FAIL seq {seq}: bad checkpoint: hash differs from record {p['seq']}"
            if p["seq"] not in hashes and p["seq"] >= expected_seq - count:
                return f"FAIL seq {seq}: bad checkpoint: unknown seq {p['seq']}"
            if audit_address is not None:
                if p.get("signer", "").lower() != audit_address.lower():
                    return f"FAIL seq {seq}: bad checkpoint: signer {p.get('signer')}"
                try:
                    who = recover(p["hash"], p["signature"])
                except Exception as e:  # malformed signature
                    return f"FAIL seq {seq}: bad checkpoint: signature does not recover ({e})"
                if who.lower() != audit_address.lower():
                    return f"FAIL seq {seq}: bad checkpoint: signature recovers to {who}"
                checkpoints += 1
        hashes[seq] = stored
        expected_prev, expected_seq = stored, seq + 1
        count += 1
    return f"OK {count} records, head seq {expected_seq - 1} hash {expected_prev}, {checkpoints} signed checkpoints"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("--audit-address")
    ap.add_argument("--anchor-seq", type=int)
    ap.add_argument("--anchor-hash")
    a = ap.parse_args()
    anchor = (a.anchor_seq, a.anchor_hash) if a.anchor_seq is not None else None
    with open(a.export, encoding="utf-8") as f:
        result = verify(f, a.audit_address, anchor)
    print(result)
    sys.exit(0 if result.startswith("OK") else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Generates vectors.json: the APDUs the Ledger Ethereum app expects, built independently of
Castellan's Rust code by Ledger's own Python client (`ledger-app-clients-ethereum` 0.6,
`CommandBuilder`), with transactions RLP-encoded by `rlp`, EIP-712 hashed by `eth-account` 0.14,
and device answers (addresses, signatures) made with `eth-keys` from a fixed TEST-ONLY key.

Run once, in a venv of its own (the client pulls in ~500 MB):
    python3 -m venv /tmp/ledgervenv
    /tmp/ledgervenv/bin/pip install 'ledger-app-clients-ethereum==0.6.*'
    /tmp/ledgervenv/bin/python signer/tests/data/ledger/make_vectors.py > signer/tests/data/ledger/vectors.json

Chunking: Ledger's client cuts payloads into fixed 255-byte chunks (`apdus_official`). A payload of
255*k + 3 bytes then ends in a 3-byte chunk, which the app misparses
(https://github.com/LedgerHQ/app-ethereum/issues/409); Castellan, like alloy's Ledger signer,
uses the largest chunk size <= 255 that avoids it. For such payloads `apdus` re-serialises the
same payload with that chunk size through CommandBuilder._serialize; for every other payload
`apdus` is exactly `apdus_official`.
"""
import json
import struct

import rlp
from eth_account.messages import encode_typed_data, _hash_eip191_message, encode_defunct
from eth_keys import keys
from eth_utils import keccak
from ledger_app_clients.ethereum.command_builder import CommandBuilder, InsType, P1Type
from ragger.bip import pack_derivation_path

PATH = "m/44'/60'/0'/0/0"
# TEST ONLY: a well-known private key (never holds funds).
PRIVATE_KEY = keys.PrivateKey(bytes.fromhex(
    "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"))
CHAIN_ID = 31337
RECIPIENT = bytes.fromhex("70997970C51812dc3A010C7d01b50e0d17dc79C8")
GWEI = 10**9

cb = CommandBuilder()


def chunk_size(n):
    return next(i for i in range(255, 0, -1) if n % i != 3)


def castellan_split(ins, payload):
    size = chunk_size(len(payload))
    out, p1 = [], P1Type.SIGN_FIRST_CHUNK
    while payload:
        out.append(bytes(cb._serialize(ins, p1, 0x00, payload[:size])))
        payload = payload[size:]
        p1 = P1Type.SIGN_SUBSQT_CHUNK
    return out


def device_signature(digest):
    sig = PRIVATE_KEY.sign_msg_hash(digest)
    # The app answers v || r || s; v is 27/28 here (Castellan ignores it and recovers the parity).
    return bytes([27 + sig.v]) + sig.r.to_bytes(32, "big") + sig.s.to_bytes(32, "big")


def tx_vector(name, tx_type, fields, target_total):
    """Grows the calldata until path + signing payload is `target_total` bytes."""
    path = pack_derivation_path(PATH)
    for data_len in range(0, 2000):
        data = bytes((i * 7 + 1) % 256 for i in range(data_len))
        if tx_type == 0:
            body = rlp.encode([fields["nonce"], fields["gasPrice"], fields["gas"], RECIPIENT,
                               fields["value"], data, CHAIN_ID, 0, 0])
        elif tx_type == 1:
            access = [[RECIPIENT, [b"\x00" * 32]]]
            body = b"\x01" + rlp.encode([CHAIN_ID, fields["nonce"], fields["gasPrice"],
                                         fields["gas"], RECIPIENT, fields["value"], data, access])
        else:
            body = b"\x02" + rlp.encode([CHAIN_ID, fields["nonce"], fields["maxPriorityFeePerGas"],
                                         fields["maxFeePerGas"], fields["gas"], RECIPIENT,
                                         fields["value"], data, []])
        if len(path) + len(body) == target_total:
            break
    else:
        raise SystemExit(f"no calldata length gives {target_total}")
    official = [bytes(a) for a in cb.sign(PATH, body, 0x00)]
    ours = castellan_split(InsType.SIGN, path + body)
    assert b"".join(a[5:] for a in official) == b"".join(a[5:] for a in ours)
    digest = keccak(body)
    return {
        "name": name, "kind": "transaction", "tx_type": tx_type,
        "fields": {k: str(v) for k, v in fields.items()},
        "to": "0x" + RECIPIENT.hex(), "chain_id": CHAIN_ID, "input": data.hex(),
        "payload_len": len(path) + len(body), "signing_payload": body.hex(),
        "digest": digest.hex(),
        "apdus_official": [a.hex() for a in official],
        "apdus": [a.hex() for a in ours],
        "response": device_signature(digest).hex() + "9000",
    }


def personal_vector(name, message):
    official = [bytes(a) for a in cb.personal_sign(PATH, message)]
    payload = pack_derivation_path(PATH) + struct.pack(">I", len(message)) + message
    ours = castellan_split(InsType.PERSONAL_SIGN, payload)
    digest = _hash_eip191_message(encode_defunct(primitive=message))
    return {
        "name": name, "kind": "personal", "message": message.hex(),
        "payload_len": len(payload), "digest": digest.hex(),
        "apdus_official": [a.hex() for a in official],
        "apdus": [a.hex() for a in ours],
        "response": device_signature(digest).hex() + "9000",
    }


MAIL = {
    "types": {
        "EIP712Domain": [
            {"name": "name", "type": "string"}, {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"},
        ],
        "Person": [{"name": "name", "type": "string"}, {"name": "wallet", "type": "address"}],
        "Mail": [{"name": "from", "type": "Person"}, {"name": "to", "type": "Person"},
                 {"name": "contents", "type": "string"}],
    },
    "primaryType": "Mail",
    "domain": {"name": "Ether Mail", "version": "1", "chainId": CHAIN_ID,
               "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC"},
    "message": {
        "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
        "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
        "contents": "Hello, Bob!",
    },
}


def eip712_vector():
    signable = encode_typed_data(full_message=MAIL)
    domain_hash, message_hash = signable.header, signable.body
    apdu = bytes(cb.eip712_sign_legacy(PATH, domain_hash, message_hash))
    digest = keccak(b"\x19\x01" + domain_hash + message_hash)
    return {
        "name": "eip712_mail", "kind": "eip712", "typed_data": MAIL,
        "domain_separator": domain_hash.hex(), "hash_struct": message_hash.hex(),
        "digest": digest.hex(), "apdus_official": [apdu.hex()], "apdus": [apdu.hex()],
        "response": device_signature(digest).hex() + "9000",
    }


def address_vector():
    apdu = bytes(cb.get_public_addr(False, False, PATH, None))
    public = b"\x04" + PRIVATE_KEY.public_key.to_bytes()
    address = PRIVATE_KEY.public_key.to_checksum_address()
    response = bytes([len(public)]) + public + bytes([40]) + address[2:].encode() + b"\x90\x00"
    return {"name": "get_address", "kind": "address", "apdus_official": [apdu.hex()],
            "apdus": [apdu.hex()], "response": response.hex(), "address": address}


vectors = {
    "generated_by": "signer/tests/data/ledger/make_vectors.py (ledger-app-clients-ethereum 0.6.0)",
    "path": PATH,
    "address": PRIVATE_KEY.public_key.to_checksum_address(),
    "vectors": [
        address_vector(),
        tx_vector("tx_legacy_71", 0, {"nonce": 0, "gasPrice": 30 * GWEI, "gas": 100000,
                                      "value": 1000}, 71),
        tx_vector("tx_eip1559_258", 2, {"nonce": 1, "maxPriorityFeePerGas": GWEI,
                                        "maxFeePerGas": 30 * GWEI, "gas": 200000,
                                        "value": 2000}, 258),
        tx_vector("tx_eip2930_675", 1, {"nonce": 2, "gasPrice": 30 * GWEI, "gas": 300000,
                                        "value": 3000}, 675),
        personal_vector("personal_short", b"castellan: personal_sign through a Ledger"),
        personal_vector("personal_long", bytes(range(256)) * 2),
        eip712_vector(),
    ],
}
print(json.dumps(vectors, indent=1))

"""Payload encryption: what Temporal stores of our inputs, results, signals and state is ciphertext.

Every payload (workflow and activity inputs and results, signals, queries,
memos, failure messages) passes through `EncryptionCodec` on its way to the
server and back. AES-256-GCM with a fresh 96-bit nonce per payload; the key id
travels in the payload's metadata and is bound to the ciphertext as associated
data, so a payload cannot be passed off as encrypted under another key.

Keys come from `BILLING_ENCRYPTION_KEYS` ("kid2:BASE64,kid1:BASE64"): the first
encrypts, every one decrypts, so a new key goes first and the old ones stay
until no running workflow holds payloads under them (docs/temporal-connection.md).
Search attributes are not payloads: they stay readable, and hold no personal data.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
NONCE_BYTES = 12
KEY_BYTES = 32
KEYS_VARIABLE = "BILLING_ENCRYPTION_KEYS"
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class EncryptionKeyError(ValueError):
    """`BILLING_ENCRYPTION_KEYS` is malformed; the message names the entry, never the key."""


class PayloadDecryptionError(RuntimeError):
    """A payload cannot be decrypted with the keys this process holds; names the key id."""

    def __init__(self, key_id: str, message: str) -> None:
        self.key_id = key_id
        super().__init__(message)


@dataclass(frozen=True)
class EncryptionKey:
    key_id: str
    secret: bytes = field(repr=False)


def parse_keys(value: str) -> tuple[EncryptionKey, ...]:
    """The keys in `BILLING_ENCRYPTION_KEYS` order; an empty value means no encryption."""
    keys: list[EncryptionKey] = []
    for position, entry in enumerate((part.strip() for part in value.split(",")), start=1):
        if not entry:
            continue
        key_id, colon, encoded = entry.partition(":")
        key_id = key_id.strip()
        if not colon or not _KEY_ID.match(key_id):
            raise EncryptionKeyError(
                f"{KEYS_VARIABLE} entry {position} is not `key_id:base64-key` "
                "(a key id is 1-64 letters, digits, '.', '_' or '-')."
            )
        try:
            secret = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise EncryptionKeyError(
                f"{KEYS_VARIABLE}: key '{key_id}' is not valid base64."
            ) from None
        if len(secret) != KEY_BYTES:
            raise EncryptionKeyError(
                f"{KEYS_VARIABLE}: key '{key_id}' is {len(secret)} bytes; AES-256 needs "
                f"{KEY_BYTES} (make one with `openssl rand -base64 32`)."
            )
        if any(known.key_id == key_id for known in keys):
            raise EncryptionKeyError(f"{KEYS_VARIABLE}: key id '{key_id}' appears twice.")
        keys.append(EncryptionKey(key_id, secret))
    return tuple(keys)


def new_key_entry(key_id: str) -> str:
    """A fresh `key_id:base64` entry, for operators and tests."""
    return f"{key_id}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over whole payloads. With no keys it encrypts nothing.

    Payloads that are not encrypted pass through decode unchanged, so histories
    written before encryption was turned on stay readable. An encrypted payload
    this process cannot open is an error that names the key id.
    """

    def __init__(self, keys: Sequence[EncryptionKey]) -> None:
        super().__init__()
        self._ciphers = {key.key_id: AESGCM(key.secret) for key in keys}
        self._current = keys[0].key_id if keys else None

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._ciphers)

    @property
    def encrypts(self) -> bool:
        return self._current is not None

    async def encode(self, payloads: Iterable[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Iterable[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        if self._current is None:
            return payload
        key_id = self._current
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, payload.SerializeToString(), key_id.encode())
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id.encode()},
            data=nonce + sealed,
        )

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            held = ", ".join(f"'{k}'" for k in self._ciphers) or "none: it is not set"
            raise PayloadDecryptionError(
                key_id,
                f"A payload is encrypted with key '{key_id}', which {KEYS_VARIABLE} does not "
                f"hold (it holds {held}); add that key to {KEYS_VARIABLE}.",
            )
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], key_id.encode())
        except InvalidTag:
            raise PayloadDecryptionError(
                key_id,
                f"A payload encrypted with key '{key_id}' does not decrypt with the key "
                f"{KEYS_VARIABLE} gives as '{key_id}': it is the wrong key for that id "
                "(or the payload was altered).",
            ) from None
        return Payload.FromString(plain)

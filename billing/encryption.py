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
import json
import os
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory
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


# Reading histories as a namespace reader would -----------------------------------

# Search attributes are plaintext by design (they hold no personal data).
PLAINTEXT_FIELDS = frozenset({"search_attributes"})


def _sealable_payloads(event: HistoryEvent, patch_ids: Collection[str]) -> Iterator[Payload]:
    """Every payload an event carries that the codec must have sealed.

    Left out: search attributes, and the markers of `workflow.patched`, which
    Temporal writes itself with nothing but one of our patch ids.
    """
    if event.HasField("marker_recorded_event_attributes"):
        details = event.marker_recorded_event_attributes.details
        if set(details) == {"patch-data"} and all(
            _patch_id(p) in patch_ids for p in details["patch-data"].payloads
        ):
            return
    yield from payloads_in(event)


def _patch_id(payload: Payload) -> str | None:
    try:
        data = json.loads(payload.data)
    except ValueError:
        return None
    return str(data.get("id")) if isinstance(data, dict) else None


def payloads_in(message: Message) -> Iterator[Payload]:
    if isinstance(message, Payload):
        yield message
        return
    for described, value in message.ListFields():
        if described.message_type is None or described.name in PLAINTEXT_FIELDS:
            continue
        if described.message_type.GetOptions().map_entry:
            items: Iterable[Message] = value.values()
        elif isinstance(value, Message):
            items = (value,)
        else:
            items = value  # a repeated field
        for item in items:
            yield from payloads_in(item)


def clear_payloads(history: WorkflowHistory, patch_ids: Collection[str]) -> list[str]:
    """Where a history holds a payload that is not encrypted (an empty list when none).

    What anyone with access to the namespace reads in clear; `patch_ids` are the
    workflow's `workflow.patched` ids, which Temporal's markers may hold.
    """
    found: list[str] = []
    for event in history.events:
        for payload in _sealable_payloads(event, patch_ids):
            if payload.metadata.get("encoding") != ENCODING:
                kind = payload.metadata.get("encoding", b"?").decode(errors="replace")
                what = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").lower()
                found.append(f"event {event.event_id} {what} ({kind})")
    return found

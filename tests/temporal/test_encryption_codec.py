"""The payload codec on its own: keys, rotation, refusals (no server)."""

from __future__ import annotations

import base64

import pytest
from temporalio.api.common.v1 import Payload

from billing.encryption import (
    ENCODING,
    KEY_ID_METADATA,
    EncryptionCodec,
    EncryptionKeyError,
    PayloadDecryptionError,
    new_key_entry,
    parse_keys,
)

SECRET = b'{"owner_email":"ada@example.com","stripe_customer_id":"cus_Q1w2E3r4"}'


def plain(data: bytes = SECRET) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=data)


def codec(*entries: str) -> EncryptionCodec:
    return EncryptionCodec(parse_keys(",".join(entries)))


KID1 = new_key_entry("kid1")
KID2 = new_key_entry("kid2")


async def test_a_payload_is_ciphertext_under_the_first_key() -> None:
    [sealed] = await codec(KID2, KID1).encode([plain()])

    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID_METADATA] == b"kid2"
    assert b"ada@example.com" not in sealed.SerializeToString()
    assert b"cus_Q1w2E3r4" not in sealed.SerializeToString()
    assert await codec(KID2, KID1).decode([sealed]) == [plain()]


async def test_the_same_payload_never_encrypts_the_same_way_twice() -> None:
    one, two = await codec(KID1).encode([plain(), plain()])

    assert one.data != two.data


async def test_after_rotation_old_payloads_decrypt_and_new_ones_use_the_new_key() -> None:
    [old] = await codec(KID1).encode([plain(b"old")])
    rotated = codec(KID2, KID1)

    [new] = await rotated.encode([plain(b"new")])

    assert new.metadata[KEY_ID_METADATA] == b"kid2"
    assert await rotated.decode([old, new]) == [plain(b"old"), plain(b"new")]


async def test_a_key_that_was_removed_too_early_is_named() -> None:
    [old] = await codec(KID1).encode([plain()])

    with pytest.raises(PayloadDecryptionError) as caught:
        await codec(KID2).decode([old])

    assert caught.value.key_id == "kid1"
    assert str(caught.value) == (
        "A payload is encrypted with key 'kid1', which BILLING_ENCRYPTION_KEYS does not hold "
        "(it holds 'kid2'); add that key to BILLING_ENCRYPTION_KEYS."
    )


async def test_a_wrong_key_under_the_right_id_is_named() -> None:
    [sealed] = await codec(KID1).encode([plain()])

    with pytest.raises(PayloadDecryptionError, match="with the key BILLING_ENCRYPTION_KEYS gives"):
        await codec(new_key_entry("kid1")).decode([sealed])


async def test_without_keys_nothing_is_encrypted_and_ciphertext_is_named() -> None:
    [sealed] = await codec(KID1).encode([plain()])
    none = EncryptionCodec(())

    assert await none.encode([plain()]) == [plain()]
    with pytest.raises(PayloadDecryptionError, match=r"key 'kid1', which .* holds none"):
        await none.decode([sealed])


async def test_plaintext_payloads_pass_through() -> None:
    """Runs started before encryption was turned on stay readable."""
    assert await codec(KID1).decode([plain()]) == [plain()]


async def test_a_payload_relabelled_with_another_key_id_does_not_decrypt() -> None:
    """The key id is bound to the ciphertext (associated data)."""
    both = codec(KID2, KID1)
    [sealed] = await codec(KID1, KID2).encode([plain()])
    sealed.metadata[KEY_ID_METADATA] = b"kid2"

    with pytest.raises(PayloadDecryptionError, match="key 'kid2'"):
        await both.decode([sealed])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("kid1", "entry 1 is not `key_id:base64-key`"),
        (f"{KID1},no key here", "entry 2 is not `key_id:base64-key`"),
        ("kid1:%%%", "key 'kid1' is not valid base64"),
        (f"kid1:{base64.b64encode(b'x' * 16).decode()}", "key 'kid1' is 16 bytes"),
        (f"{KID1},{KID1}", "key id 'kid1' appears twice"),
    ],
    # Fixed ids: the keys are random, and parallel workers must collect the same names.
    ids=["no-colon", "bare-second-entry", "not-base64", "16-bytes", "duplicate-id"],
)
def test_malformed_keys_are_named_without_their_secret(value: str, message: str) -> None:
    with pytest.raises(EncryptionKeyError) as caught:
        parse_keys(value)

    assert message in str(caught.value)
    assert KID1.split(":")[1] not in str(caught.value)


def test_keys_keep_their_order_and_hide_their_secret() -> None:
    keys = parse_keys(f" {KID2} , {KID1} ,")

    assert [k.key_id for k in keys] == ["kid2", "kid1"]
    assert KID1.split(":")[1] not in repr(keys)
    assert parse_keys("") == ()

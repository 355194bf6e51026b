"""Model ownership primitives: manifests, delete orders and producer proofs, their keys and CLI."""

from __future__ import annotations

import os
import stat

import msgpack
import pytest
from click.testing import CliRunner
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings, strategies as st

from enclaveq.cli import cli
from protocol.codec import pack
from protocol.errors import KeyFileError, MalformedMessage, SignatureInvalid
from protocol.ownership import (
    DELETE_LABEL, MANIFEST_LABEL, MAX_ALLOWED_PRODUCERS, PRODUCER_SESSION_LABEL, DeleteOrder, ModelManifest,
    ProducerProof, generate_signing_key, load_signing_key, parse_public_key, public_key_bytes, save_signing_key,
)

MODEL_ID = "5e" * 32
OWNER = generate_signing_key()
OWNER_PUB = public_key_bytes(OWNER)
ALICE, BOB = generate_signing_key(), generate_signing_key()
SESSION = {"pool": "pool-a", "epoch": 3, "session_id": b"\x11" * 16, "sealed_session": b"\x22" * 80}
IDENTITY_POINT = b"\x01" + bytes(31)  # small order: "signatures" for it need no private key
FORGED_SIGNATURE = IDENTITY_POINT + bytes(32)  # R = identity, S = 0


def manifest(**changes) -> ModelManifest:
    fields = {"model_id": MODEL_ID, "size": 1234, "owner_key": OWNER_PUB,
              "allowed_producers": (public_key_bytes(ALICE), public_key_bytes(BOB)), "issued_at_ms": 1_700_000_000_000}
    return ModelManifest(**{**fields, **changes})


def order(**changes) -> DeleteOrder:
    return DeleteOrder(**{"model_id": MODEL_ID, "owner_key": OWNER_PUB, "issued_at_ms": 1_700_000_000_001, **changes})


def signed_wire(kind: str, message: bytes, signature: bytes) -> bytes:
    return pack({"v": 1, "t": kind, "m": message, "sig": signature})


def flipped(data: bytes, index: int, mask: int) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("allowed", [None, (public_key_bytes(ALICE),)], ids=["any producer", "allow-list"])
def test_a_signed_manifest_verifies_back_to_the_same_manifest(allowed):
    original = manifest(allowed_producers=allowed)
    assert ModelManifest.verify(original.sign(OWNER)) == original


def test_a_signed_delete_order_verifies_back_to_the_same_order():
    assert DeleteOrder.verify(order().sign(OWNER)) == order()


def test_a_producer_proof_survives_its_wire_form_and_verifies_for_its_session():
    proof = ProducerProof.create(ALICE, **SESSION)
    assert ProducerProof.from_bytes(proof.to_bytes()) == proof
    assert proof.producer_key == public_key_bytes(ALICE)
    ProducerProof.from_bytes(proof.to_bytes()).verify(**SESSION)


def test_the_allow_list_decides_who_may_use_a_model_and_the_owner_is_not_implicitly_on_it():
    restricted = manifest(allowed_producers=(public_key_bytes(ALICE),))
    assert restricted.allows(public_key_bytes(ALICE))
    assert not restricted.allows(public_key_bytes(BOB)) and not restricted.allows(OWNER_PUB)
    assert manifest(allowed_producers=None).allows(public_key_bytes(BOB))


def test_the_signed_bytes_are_the_documented_canonical_lists():
    m = manifest(allowed_producers=None)
    assert msgpack.unpackb(m.canonical()) == [MANIFEST_LABEL, MODEL_ID, 1234, OWNER_PUB, None, 1_700_000_000_000]
    assert msgpack.unpackb(order().canonical()) == [DELETE_LABEL, MODEL_ID, OWNER_PUB, 1_700_000_000_001]
    proof = ProducerProof.create(ALICE, **SESSION)
    expected = pack([PRODUCER_SESSION_LABEL, "pool-a", 3, b"\x11" * 16, b"\x22" * 80, public_key_bytes(ALICE)])
    Ed25519PublicKey.from_public_bytes(proof.producer_key).verify(proof.signature, expected)
    wire = msgpack.unpackb(m.sign(OWNER))
    assert set(wire) == {"v", "t", "m", "sig"} and wire["t"] == "model_manifest" and wire["m"] == m.canonical()


# --------------------------------------------------------------------------- tampering


def signed_forms():
    return {
        "manifest": (manifest().sign(OWNER), ModelManifest.verify),
        "delete order": (order().sign(OWNER), DeleteOrder.verify),
        "producer proof": (ProducerProof.create(ALICE, **SESSION).to_bytes(),
                           lambda data: ProducerProof.from_bytes(data).verify(**SESSION)),
    }


@pytest.mark.parametrize("name", ["manifest", "delete order", "producer proof"])
@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_single_byte_of_a_signed_form_makes_it_refused(name, mask):
    wire, check = signed_forms()[name]
    for index in range(len(wire)):
        with pytest.raises((SignatureInvalid, MalformedMessage)):
            check(flipped(wire, index, mask))


@pytest.mark.parametrize("name", ["manifest", "delete order", "producer proof"])
def test_every_truncation_of_a_signed_form_is_malformed(name):
    wire, check = signed_forms()[name]
    for length in range(len(wire)):
        with pytest.raises(MalformedMessage):
            check(wire[:length])


def test_trailing_bytes_after_a_signed_form_are_refused():
    for wire, check in signed_forms().values():
        with pytest.raises(MalformedMessage):
            check(wire + b"\x00")


def test_a_manifest_signed_by_someone_else_than_its_owner_is_refused():
    m = manifest()
    with pytest.raises(SignatureInvalid):
        ModelManifest.verify(signed_wire("model_manifest", m.canonical(), BOB.sign(m.canonical())))
    with pytest.raises(ValueError, match="not the key named"):
        m.sign(BOB)


def test_a_delete_order_signed_by_someone_else_than_its_owner_is_refused():
    o = order()
    with pytest.raises(SignatureInvalid):
        DeleteOrder.verify(signed_wire("model_delete_order", o.canonical(), BOB.sign(o.canonical())))
    with pytest.raises(ValueError):
        o.sign(BOB)


def test_a_producer_proof_presented_under_another_key_is_refused():
    proof = ProducerProof.create(ALICE, **SESSION)
    with pytest.raises(SignatureInvalid):
        ProducerProof(producer_key=public_key_bytes(BOB), signature=proof.signature).verify(**SESSION)


def test_a_manifest_signature_never_verifies_as_a_delete_order():
    m, o = manifest(), order()
    manifest_sig = msgpack.unpackb(m.sign(OWNER))["sig"]
    with pytest.raises(SignatureInvalid):  # the order's own bytes, the manifest's signature
        DeleteOrder.verify(signed_wire("model_delete_order", o.canonical(), manifest_sig))
    with pytest.raises(MalformedMessage):  # the manifest's bytes relabelled as an order
        DeleteOrder.verify(signed_wire("model_delete_order", m.canonical(), manifest_sig))
    with pytest.raises(MalformedMessage):  # the whole signed manifest handed to the wrong parser
        DeleteOrder.verify(m.sign(OWNER))


def test_a_delete_order_signature_never_verifies_as_a_manifest():
    m, o = manifest(), order()
    order_sig = msgpack.unpackb(o.sign(OWNER))["sig"]
    with pytest.raises(SignatureInvalid):
        ModelManifest.verify(signed_wire("model_manifest", m.canonical(), order_sig))
    with pytest.raises(MalformedMessage):
        ModelManifest.verify(signed_wire("model_manifest", o.canonical(), order_sig))
    with pytest.raises(MalformedMessage):
        ModelManifest.verify(o.sign(OWNER))


def test_a_signature_over_the_same_fields_under_another_label_does_not_verify():
    # The label alone separates the kinds: identical fields signed under the manifest label
    # give a signature that is useless for a delete order, and vice versa.
    fields = [MODEL_ID, OWNER_PUB, 1]
    as_manifest_label = OWNER.sign(pack([MANIFEST_LABEL, *fields]))
    with pytest.raises(SignatureInvalid):
        DeleteOrder.verify(signed_wire("model_delete_order", pack([DELETE_LABEL, *fields]), as_manifest_label))
    owner_as_producer = ProducerProof.create(OWNER, **SESSION)
    with pytest.raises(SignatureInvalid):
        ModelManifest.verify(signed_wire("model_manifest", manifest().canonical(), owner_as_producer.signature))


@pytest.mark.parametrize("change", [
    {"pool": "pool-b"}, {"epoch": 4}, {"session_id": b"\x12" * 16}, {"sealed_session": b"\x22" * 79 + b"\x23"},
], ids=["pool", "epoch", "session_id", "sealed_session"])
def test_a_producer_proof_is_bound_to_each_part_of_its_session(change):
    proof = ProducerProof.create(ALICE, **SESSION)
    with pytest.raises(SignatureInvalid):
        proof.verify(**{**SESSION, **change})


# --------------------------------------------------------------------------- canonical form and field rules


def test_an_allow_list_is_stored_sorted_and_without_duplicates():
    a, b = public_key_bytes(ALICE), public_key_bytes(BOB)
    m = manifest(allowed_producers=[b, a, b, a])
    assert m.allowed_producers == tuple(sorted({a, b}))
    assert ModelManifest.verify(m.sign(OWNER)).allowed_producers == tuple(sorted({a, b}))


def test_an_allow_list_holds_at_most_the_limit_of_distinct_keys():
    keys = [public_key_bytes(generate_signing_key()) for _ in range(MAX_ALLOWED_PRODUCERS + 1)]
    full = manifest(allowed_producers=keys[:MAX_ALLOWED_PRODUCERS] + keys[:10])
    assert len(full.allowed_producers) == MAX_ALLOWED_PRODUCERS
    assert ModelManifest.verify(full.sign(OWNER)) == full
    with pytest.raises(MalformedMessage, match="limit"):
        manifest(allowed_producers=keys)


@pytest.mark.parametrize("allowed", [[], [b"\x05" * 31], [b"\x05" * 33], ["ab" * 32], b"\x05" * 32, "ab" * 32,
                                     [IDENTITY_POINT]],
                         ids=["empty", "short key", "long key", "hex text", "bare bytes", "bare text", "small order"])
def test_an_allow_list_must_be_a_non_empty_collection_of_usable_32_byte_keys(allowed):
    with pytest.raises(MalformedMessage):
        manifest(allowed_producers=allowed)


def test_an_unsorted_allow_list_is_refused_even_when_correctly_signed():
    a, b = sorted([public_key_bytes(ALICE), public_key_bytes(BOB)])
    message = pack([MANIFEST_LABEL, MODEL_ID, 1234, OWNER_PUB, [b, a], 1])
    with pytest.raises(MalformedMessage, match="canonical"):
        ModelManifest.verify(signed_wire("model_manifest", message, OWNER.sign(message)))


def test_a_needlessly_wide_integer_is_refused_even_when_correctly_signed():
    head = pack([MANIFEST_LABEL, MODEL_ID, 1234, OWNER_PUB, None])
    message = bytes([head[0] + 1]) + head[1:] + b"\xcf" + (1).to_bytes(8, "big")  # 1 as a uint64
    assert msgpack.unpackb(message)[-1] == 1
    with pytest.raises(MalformedMessage, match="canonical"):
        ModelManifest.verify(signed_wire("model_manifest", message, OWNER.sign(message)))


@pytest.mark.parametrize("change", [
    {"model_id": "5E" * 32}, {"model_id": "5e" * 31}, {"model_id": b"5e" * 32}, {"size": 0}, {"size": True},
    {"size": 2**63}, {"issued_at_ms": -1}, {"issued_at_ms": 1.5}, {"owner_key": OWNER_PUB[:31]},
], ids=["uppercase id", "short id", "bytes id", "zero size", "bool size", "huge size", "negative time",
        "float time", "short owner key"])
def test_a_manifest_with_an_invalid_field_cannot_exist(change):
    with pytest.raises(MalformedMessage):
        manifest(**change)


def test_openssl_accepts_forged_signatures_for_small_order_keys_so_they_are_refused_everywhere():
    # Why the refusal exists: with the identity point as public key, a signature that needs no
    # private key verifies for any message.
    Ed25519PublicKey.from_public_bytes(IDENTITY_POINT).verify(FORGED_SIGNATURE, b"anything at all")
    message = pack([MANIFEST_LABEL, MODEL_ID, 1234, IDENTITY_POINT, None, 1])
    with pytest.raises(MalformedMessage, match="small-order"):
        ModelManifest.verify(signed_wire("model_manifest", message, FORGED_SIGNATURE))
    message = pack([DELETE_LABEL, MODEL_ID, IDENTITY_POINT, 1])
    with pytest.raises(MalformedMessage, match="small-order"):
        DeleteOrder.verify(signed_wire("model_delete_order", message, FORGED_SIGNATURE))
    with pytest.raises(MalformedMessage, match="small-order"):
        ProducerProof.from_bytes(pack({"v": 1, "k": IDENTITY_POINT, "s": FORGED_SIGNATURE}))
    with pytest.raises(KeyFileError, match="small-order"):
        parse_public_key(IDENTITY_POINT.hex())


@pytest.mark.parametrize("encoding", [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
])
@pytest.mark.parametrize("sign_bit", [0, 0x80])
def test_every_refused_encoding_really_is_a_key_openssl_lets_anyone_sign_for(encoding, sign_bit):
    raw = bytes.fromhex(encoding)
    raw = raw[:31] + bytes([raw[31] | sign_bit])
    public = Ed25519PublicKey.from_public_bytes(raw)
    forged = 0
    for i in range(64):  # [k]A is the identity for about one message in eight (or more)
        try:
            public.verify(FORGED_SIGNATURE, b"message %d" % i)
            forged += 1
        except InvalidSignature:
            pass
    assert forged > 0
    with pytest.raises(MalformedMessage, match="small-order"):
        manifest(owner_key=raw)


# --------------------------------------------------------------------------- fuzzing


PARSERS = (ModelManifest.verify, DeleteOrder.verify, ProducerProof.from_bytes)

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.binary(max_size=70)
    | st.text(max_size=70) | st.sampled_from([MANIFEST_LABEL, DELETE_LABEL, OWNER_PUB, MODEL_ID, 1, 64 * b"\0"]),
    lambda inner: st.lists(inner, max_size=7) | st.dictionaries(st.text(max_size=4), inner, max_size=5),
    max_leaves=12)


def refuses_cleanly(data: bytes) -> None:
    for parse in PARSERS:
        try:
            parse(data)
        except (MalformedMessage, SignatureInvalid):
            pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_ever_give_typed_refusals(data):
    refuses_cleanly(data)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "t", "m", "sig", "k", "s", "x"]), msgpack_values, max_size=5))
def test_arbitrary_msgpack_maps_only_ever_give_typed_refusals(value):
    refuses_cleanly(pack(value))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["model_manifest", "model_delete_order"]),
       label=st.sampled_from([MANIFEST_LABEL, DELETE_LABEL, PRODUCER_SESSION_LABEL]),
       rest=st.lists(msgpack_values, max_size=7), sig=st.binary(min_size=64, max_size=64))
def test_arbitrary_signed_parts_behind_a_valid_envelope_only_ever_give_typed_refusals(kind, label, rest, sig):
    refuses_cleanly(signed_wire(kind, pack([label, *rest]), sig))


@settings(max_examples=200, deadline=None)
@given(st.from_type(object).filter(lambda v: not isinstance(v, (bytes, bytearray, memoryview))))
def test_a_parser_given_something_other_than_bytes_refuses_it_as_malformed(value):
    refuses_cleanly(value)


# --------------------------------------------------------------------------- key files


def test_a_saved_key_is_private_to_its_owner_and_loads_back(tmp_path):
    path = tmp_path / "owner.pem"
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        save_signing_key(OWNER, path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_key_bytes(load_signing_key(path)) == OWNER_PUB


def test_saving_a_key_never_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "owner.pem"
    save_signing_key(OWNER, path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        save_signing_key(ALICE, path)
    assert path.read_bytes() == before
    (tmp_path / "link.pem").symlink_to(tmp_path / "nowhere.pem")
    with pytest.raises(KeyFileError, match="already exists"):
        save_signing_key(ALICE, tmp_path / "link.pem")
    assert not (tmp_path / "nowhere.pem").exists()


SECRET_MARKER = "TOPSECRET-do-not-print-me"


@pytest.mark.parametrize("content", [
    SECRET_MARKER.encode(),
    f"-----BEGIN PRIVATE KEY-----\n{SECRET_MARKER}\n-----END PRIVATE KEY-----\n".encode(),
    b"\xff\xfe" + SECRET_MARKER.encode() * 100,
    b"",
], ids=["text", "pem armour around garbage", "binary", "empty"])
def test_loading_a_garbage_key_file_is_a_key_file_error_that_does_not_repeat_it(tmp_path, content):
    path = tmp_path / "garbage.pem"
    path.write_bytes(content)
    for load in (load_signing_key, parse_public_key):
        with pytest.raises(KeyFileError) as caught:
            load(path)
        assert SECRET_MARKER not in str(caught.value) and caught.value.__cause__ is None
        assert str(path) in str(caught.value)


def test_loading_a_key_of_another_kind_or_an_encrypted_key_is_a_key_file_error(tmp_path):
    x25519 = tmp_path / "x25519.pem"
    x25519.write_bytes(X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="not a PEM Ed25519 private key"):
        load_signing_key(x25519)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(OWNER.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(KeyFileError, match="encrypted"):
        load_signing_key(encrypted)
    public_only = tmp_path / "public.pem"
    public_only.write_bytes(OWNER.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError):
        load_signing_key(public_only)
    with pytest.raises(KeyFileError, match="no key file"):
        load_signing_key(tmp_path / "missing.pem")
    with pytest.raises(KeyFileError):
        load_signing_key(tmp_path)


def test_a_public_key_can_be_given_as_hex_or_as_a_pem_public_or_private_key_file(tmp_path):
    private = tmp_path / "owner.pem"
    save_signing_key(OWNER, private)
    public = tmp_path / "owner.pub.pem"
    public.write_bytes(OWNER.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    for given_as in (OWNER_PUB.hex(), OWNER_PUB.hex().upper(), f" {OWNER_PUB.hex()}\n", str(private), private,
                     str(public), public):
        assert parse_public_key(given_as) == OWNER_PUB


@pytest.mark.parametrize("text", ["", "ab" * 31, "ab" * 33, "zz" * 32, "nonexistent.pem"])
def test_text_that_is_neither_a_key_nor_a_key_file_is_refused_without_being_repeated(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyFileError) as caught:
        parse_public_key(text)
    assert not text or text not in str(caught.value)


# --------------------------------------------------------------------------- command line


def run_cli(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_keys_generate_writes_a_private_key_file_and_prints_only_its_public_key(tmp_path):
    out = tmp_path / "owner.pem"
    result = run_cli("keys", "generate", "--out", str(out))
    assert result.exit_code == 0
    public_hex = result.stdout.strip()
    assert len(public_hex) == 64 and bytes.fromhex(public_hex) == public_key_bytes(load_signing_key(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "--owner-key" in result.stderr and "--producer-key" in result.stderr


def test_keys_generate_refuses_to_replace_an_existing_key(tmp_path):
    out = tmp_path / "owner.pem"
    run_cli("keys", "generate", "--out", str(out))
    before = out.read_bytes()
    result = run_cli("keys", "generate", "--out", str(out))
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert out.read_bytes() == before


def test_keys_show_prints_the_public_key_of_a_private_or_public_key_file(tmp_path):
    out = tmp_path / "alice.pem"
    generated = run_cli("keys", "generate", "--out", str(out)).stdout.strip()
    assert run_cli("keys", "show", str(out)).stdout.strip() == generated
    public = tmp_path / "alice.pub.pem"
    public.write_bytes(load_signing_key(out).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert run_cli("keys", "show", str(public)).stdout.strip() == generated


def test_keys_show_of_a_garbage_file_fails_without_printing_its_contents(tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text(SECRET_MARKER)
    result = run_cli("keys", "show", str(garbage))
    assert result.exit_code == 2 and "not a PEM Ed25519" in result.stderr
    assert SECRET_MARKER not in result.output


@pytest.mark.parametrize("command", [["keys"], ["keys", "generate"], ["keys", "show"]], ids=" ".join)
def test_every_keys_command_has_a_help_with_examples(command):
    result = run_cli(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout and "Examples:" in result.stdout


def test_keys_is_listed_in_the_top_level_help():
    assert "keys" in run_cli("--help").stdout

"""No input crashes the Nitro parser or verifier: only EvidenceMalformed (parser) or an
AttestationError (verifier) ever escapes, and whatever verifies carries the original signed bytes.

Inputs per run (hypothesis ``max_examples``; each test runs exactly that many unless the
strategy is exhausted): random bytes 1000, random bytes behind a COSE_Sign1 prefix 1000,
random CBOR values (incl. semantic tags, shared references, nested containers) in every
envelope and document position 400, byte-level mutations (set, bit flip, insert, delete,
truncate; 1-4 per input) of a valid fake document through the full verifier 800 -- 3200 in
all, about 6 s (hypothesis' own generation dominates).
"""

from __future__ import annotations

from datetime import datetime, UTC

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import AttestationError, EvidenceMalformed
from attestation.nitro import PLATFORM
from attestation.nitro.abi import parse_evidence
from attestation.testing.nitro import FakeNitro

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FAKE = FakeNitro(now=NOW, intermediates=2)
VALID = FAKE.document(user_data=b"u" * 64, nonce=b"n" * 16)
VALID_PARSED = parse_evidence(VALID)
INPUTS = FAKE.inputs()

pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _parse_or_malformed(data: bytes) -> None:
    try:
        parse_evidence(data)
    except EvidenceMalformed:
        pass


@settings(max_examples=1000, **FUZZ)
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _parse_or_malformed(data)


@settings(max_examples=1000, **FUZZ)
@given(st.sampled_from([b"\x84\x44\xa1\x01\x38\x22\xa0", b"\xd2\x84\x44\xa1\x01\x38\x22\xa0\x59", b"\x84\x40\xa0",
                        b"\x84\x44\xa1\x01\x38\x22\xa0\x58\x40\xa9"]), st.binary(max_size=2048))
def test_random_bytes_after_a_cose_prefix(prefix, rest):
    _parse_or_malformed(prefix + rest)


_keys = st.integers(min_value=-3, max_value=40) | st.text(max_size=8) | st.binary(max_size=4)
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False) | st.binary(max_size=80) | st.text(max_size=20))
_values = st.recursive(
    _scalars,
    lambda inner: (st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3)
                   | st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 3, 4, 18, 24, 28, 29, 30, 32, 35, 37, 258, 55799]), inner)),
    max_leaves=4,
)
_FIELDS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce")


@settings(max_examples=400, **FUZZ)
@given(st.data())
def test_random_cbor_in_every_position(data):
    """Valid envelope and document, with random CBOR values substituted in chosen places."""
    fields = FAKE.fields(user_data=b"u" * 64)
    for name in data.draw(st.sets(st.sampled_from(_FIELDS + ("pcrs.0", "cabundle.0", "extra")), max_size=3)):
        value = data.draw(_values)
        if name == "pcrs.0":
            pcrs = fields["pcrs"] if isinstance(fields["pcrs"], dict) else {}
            fields["pcrs"] = {**pcrs, data.draw(_keys): value}
        elif name == "cabundle.0":
            bundle = fields["cabundle"] if isinstance(fields["cabundle"], list) else []
            fields["cabundle"] = [value, *bundle[1:]]
        elif name == "extra":
            fields[data.draw(st.text(max_size=12))] = value
        else:
            fields[name] = value
    try:
        payload = cbor2.dumps(fields)
    except Exception:  # noqa: BLE001 - a value cbor2 cannot encode is not an input
        return
    envelope = [cbor2.dumps({1: -35}), {}, payload, bytes(96)]
    slot = data.draw(st.sampled_from([None, 0, 1, 2, 3]))
    if slot is not None:
        envelope[slot] = data.draw(_values)
    try:
        encoded = cbor2.dumps(cbor2.CBORTag(18, envelope) if data.draw(st.booleans()) else envelope)
    except Exception:  # noqa: BLE001
        return
    try:
        PLATFORM.verify(encoded, INPUTS)
    except AttestationError:
        pass


@st.composite
def _mutations(draw):
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["set", "xor", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "xor":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


@settings(max_examples=800, **FUZZ)
@given(_mutations())
def test_mutated_valid_document_through_the_verifier(data):
    try:
        verified = PLATFORM.verify(data, INPUTS)
    except AttestationError:
        return
    # Accepted only if everything signed is exactly the original (e.g. the mutation hit an
    # unsigned header byte in a way that still parses, or only trailing bytes changed).
    ev = verified.report
    assert (ev.protected, ev.payload, ev.signature) == (VALID_PARSED.protected, VALID_PARSED.payload,
                                                        VALID_PARSED.signature)
    assert verified.claims["user_data"] == b"u" * 64

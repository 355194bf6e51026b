"""Property-based fuzzing of the TDX quote parser and verifier (v4 and v5): whatever the bytes,
only EvidenceMalformed or EvidenceInvalid escape.

Inputs tried per run (hypothesis examples): 2,000 random byte strings, 1,000 random bodies behind
valid v4/v5 headers (v5 with a chosen body descriptor), 1,500 multi-byte mutations of valid signed
v4 and v5 quotes (verified in full), 600 rewritten length / type fields: 5,100 in all.
"""

from __future__ import annotations

import struct
from datetime import datetime, UTC

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.intel.abi import INTEL_QE_VENDOR_ID
from attestation.platforms import VerificationInputs
from attestation.tdx import PLATFORM
from attestation.tdx.abi import parse_quote
from attestation.testing.intel import FakeIntelPki, FakeQuotingEnclave

NOW = datetime(2026, 11, 27, tzinfo=UTC)
PKI = FakeIntelPki(NOW)
QE = FakeQuotingEnclave(PKI)
QUOTES = {4: QE.tdx_quote(version=4), 5: QE.tdx_quote(version=5, body_type=3)}
AT = VerificationInputs(now=NOW, trust=PKI.trust())
SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _header(version: int) -> bytes:
    return struct.pack("<HHIHH", version, 2, 0x81, 0, 0) + INTEL_QE_VENDOR_ID + bytes(20)


def _typed(data: bytes) -> None:
    try:
        PLATFORM.verify(data, AT)
    except (EvidenceMalformed, EvidenceInvalid):
        pass


@settings(max_examples=2000, **SLOW)
@given(st.binary(max_size=6000))
def test_random_bytes_only_malformed(data):
    try:
        parse_quote(data)
    except EvidenceMalformed:
        pass


@settings(max_examples=1000, **SLOW)
@given(st.sampled_from([4, 5]), st.integers(0, 4), st.integers(0, 2**32 - 1), st.binary(max_size=5000))
def test_random_body_behind_a_valid_header(version, body_type, body_size, rest):
    prefix = _header(version)
    if version == 5:
        prefix += struct.pack("<HI", body_type, body_size if body_size % 3 else {2: 584, 3: 648}.get(body_type, 0))
    _typed(prefix + rest)


def mutate(data, original: bytes) -> bytes:
    """1-8 edits: replace a byte, insert or delete a few, or cut the tail; then maybe append junk."""
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8), label="edits")):
        kind = data.draw(st.sampled_from(["replace", "replace", "insert", "delete", "cut"]), label="kind")
        position = data.draw(st.integers(0, max(len(mutated) - 1, 0)), label="position")
        if kind == "replace" and mutated:
            mutated[position] = data.draw(st.integers(0, 255), label="byte")
        elif kind == "insert":
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        elif kind == "delete":
            del mutated[position:position + data.draw(st.integers(1, 32), label="length")]
        else:
            del mutated[position:]
    return bytes(mutated) + data.draw(st.binary(max_size=32), label="tail")


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=1500, **SLOW)
@given(st.sampled_from([4, 5]), st.data())
def test_mutations_of_valid_quotes(version, data):
    _typed(mutate(data, QUOTES[version]))


def _fields(version: int) -> list[tuple[int, int]]:
    sig = 0x27C if version == 4 else 0x2C2
    return [
        (48, 2), (50, 4),                       # v5 body descriptor (ignored offsets in v4: body bytes)
        (sig - 4, 4),                           # signature data length
        (sig + 128, 2), (sig + 130, 4),         # outer certification data type / size
        (sig + 134 + 384 + 64, 2),              # QE auth data size
        (sig + 134 + 384 + 64 + 2 + 32, 2),     # inner certification data type
        (sig + 134 + 384 + 64 + 4 + 32, 4),     # inner certification data size
    ]


@settings(max_examples=600, **SLOW)
@given(st.sampled_from([4, 5]), st.data())
def test_rewritten_length_and_type_fields(version, data):
    offset, size = data.draw(st.sampled_from(_fields(version)))
    value = data.draw(st.integers(0, (1 << (8 * size)) - 1))
    mutated = bytearray(QUOTES[version])
    mutated[offset:offset + size] = value.to_bytes(size, "little")
    _typed(bytes(mutated))

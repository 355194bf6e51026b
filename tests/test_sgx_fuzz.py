"""Property-based fuzzing of the SGX quote parser and verifier: whatever the bytes, only
EvidenceMalformed or EvidenceInvalid escape (never IndexError, struct.error, ValueError, ...).

Inputs tried per run (hypothesis examples): 2,000 random byte strings, 1,000 random bodies behind
a valid v3 header, 1,500 multi-byte mutations of a valid signed quote (verified in full), 600
rewritten length fields, 800 mutations of the PCK chain PEM: 5,900 in all.
"""

from __future__ import annotations

import struct
from datetime import datetime, UTC

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.intel.abi import INTEL_QE_VENDOR_ID, parse_pck_chain
from attestation.platforms import VerificationInputs
from attestation.sgx import PLATFORM
from attestation.sgx.abi import parse_quote
from attestation.testing.intel import FakeIntelPki, FakeQuotingEnclave, quote_regions

NOW = datetime(2026, 11, 27, tzinfo=UTC)
# Built once at import: hypothesis runs many examples and must not rebuild keys for each.
PKI = FakeIntelPki(NOW)
QUOTE = FakeQuotingEnclave(PKI).sgx_quote(report_data=b"\x5a" * 64)
AT = VerificationInputs(now=NOW, trust=PKI.trust())
REGIONS = quote_regions(parse_quote(QUOTE))
HEADER = struct.pack("<HHIHH", 3, 2, 0, 8, 13) + INTEL_QE_VENDOR_ID + bytes(20)
SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _typed(fn, data) -> None:
    try:
        fn(data)
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
@given(st.binary(min_size=0, max_size=5000))
def test_random_body_behind_a_valid_header(rest):
    _typed(lambda d: PLATFORM.verify(d, AT), HEADER + rest)


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
@given(st.data())
def test_mutations_of_a_valid_quote(data):
    _typed(lambda d: PLATFORM.verify(d, AT), mutate(data, QUOTE))


LENGTH_FIELDS = [
    (0x1B0, 4),                                # signature data length
    (0x1B4 + 576, 2),                          # QE auth data size
    (0x1B4 + 578 + 32, 2),                     # certification data type
    (0x1B4 + 580 + 32, 4),                     # certification data size
]


@settings(max_examples=600, **SLOW)
@given(st.sampled_from(LENGTH_FIELDS), st.integers(0, 2**32 - 1))
def test_rewritten_length_fields(field, value):
    offset, size = field
    data = bytearray(QUOTE)
    data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    _typed(lambda d: PLATFORM.verify(d, AT), bytes(data))


PEM = QUOTE[REGIONS.certification[0]:REGIONS.certification[1]]


@pytest.mark.filterwarnings("ignore::UserWarning")  # cryptography warns about odd certificates it parses
@settings(max_examples=800, **SLOW)
@given(st.lists(st.tuples(st.integers(0, len(PEM) - 1), st.sampled_from(b"\x00\n\r-=+/AZaz09 \xff")),
                min_size=1, max_size=4),
       st.one_of(st.none(), st.integers(0, len(PEM))))
def test_pem_chain_mutations(edits, cut):
    data = bytearray(PEM)
    for pos, value in edits:
        data[pos] = value
    data = bytes(data[:cut] if cut is not None else data)
    try:
        parse_pck_chain(data)
    except EvidenceMalformed:
        pass

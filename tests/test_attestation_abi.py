"""The simulated evidence format: exact round trips, and EvidenceMalformed for everything else."""

from __future__ import annotations

import hashlib
from datetime import datetime, UTC

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation import Policy, verify_evidence
from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.sim import abi
from attestation.sim.abi import SimReport, encode_evidence, encode_report, parse_evidence, parse_report
from attestation.testing.sim import FakeSimAuthority

pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
MEASUREMENT = hashlib.sha256(b"worker").digest()
REPORT_DATA = hashlib.sha512(b"statement").digest()

# Built once at import: hypothesis runs many examples and must not rebuild keys for each.
AUTHORITY = FakeSimAuthority(now=T0)
VALID = AUTHORITY.evidence(REPORT_DATA, measurement=MEASUREMENT, svn=7)
VALID_FIELDS = msgpack.unpackb(VALID)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def body(**changes) -> list:
    fields = {
        "tag": abi.REPORT_TAG,
        "version": 1,
        "measurement": MEASUREMENT,
        "debug": False,
        "svn": 7,
        "report_data": REPORT_DATA,
        "issued_at_ms": 1_772_366_400_000,
    }
    fields.update(changes)
    return list(fields.values())


def evidence_with(*, body_fields=None, **changes) -> bytes:
    tag, version, signed_body, chain, signature = VALID_FIELDS
    fields = {
        "tag": tag,
        "version": version,
        "body": pack(body_fields) if body_fields is not None else signed_body,
        "chain": chain,
        "signature": signature,
    }
    fields.update(changes)
    return pack(list(fields.values()))


def test_valid_evidence_parses_into_its_fields():
    parsed = parse_evidence(VALID)

    assert parsed.version == 1
    assert parsed.report.measurement == MEASUREMENT
    assert parsed.report.report_data == REPORT_DATA
    assert parsed.report.security_version == 7
    assert parsed.report.debug is False
    assert parsed.report.issued_at == T0
    assert parsed.chain == (AUTHORITY.leaf, AUTHORITY.root)
    assert parse_report(parsed.signed_body) == parsed.report


def test_encoding_a_parsed_evidence_gives_back_the_same_bytes():
    parsed = parse_evidence(VALID)
    assert encode_evidence(parsed.signed_body, parsed.chain, parsed.signature) == VALID
    assert encode_report(parsed.report) == parsed.signed_body


def test_issued_at_is_exact_to_the_millisecond():
    when = datetime(2031, 7, 9, 1, 2, 3, 456_000, tzinfo=UTC)
    report = SimReport(MEASUREMENT, False, 0, REPORT_DATA, SimReport.ms_from_datetime(when))
    assert parse_report(encode_report(report)).issued_at == when


@pytest.mark.parametrize(
    "bad_body, reason",
    [
        (body(tag="enclaveq/sim/other"), "tag"),
        (body(version=2), "version"),
        (body(version=True), "version"),
        (body(measurement=MEASUREMENT[:31]), "measurement"),
        (body(measurement=MEASUREMENT.hex()), "measurement"),
        (body(debug=1), "debug"),
        (body(svn=-1), "security_version"),
        (body(svn=2**32), "security_version"),
        (body(svn=True), "security_version"),
        (body(report_data=REPORT_DATA[:63]), "report_data"),
        (body(report_data=REPORT_DATA + b"\x00"), "report_data"),
        (body(issued_at_ms=-1), "issued_at_ms"),
        (body(issued_at_ms=abi.MAX_ISSUED_AT_MS + 1), "issued_at_ms"),
        (body(issued_at_ms=1.5), "issued_at_ms"),
        (body()[:-1], "7 elements"),
        (body() + [0], "7 elements"),
        ({"measurement": MEASUREMENT}, "msgpack"),
    ],
)
def test_a_report_body_with_a_wrong_field_is_malformed_and_says_which(bad_body, reason):
    with pytest.raises(EvidenceMalformed, match=reason):
        parse_evidence(evidence_with(body_fields=bad_body))


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"tag": "enclaveq/sgx/quote"}, "tag"),
        ({"version": 2}, "version"),
        ({"body": "text"}, "body"),
        ({"signature": b""}, "signature"),
        ({"signature": b"\x00" * 300}, "signature"),
        ({"chain": []}, "chain"),
        ({"chain": VALID_FIELDS[3][:1]}, "chain"),
        ({"chain": VALID_FIELDS[3] * 3}, "chain"),
        ({"chain": [b"not a certificate", VALID_FIELDS[3][1]]}, "certificate 0"),
        ({"chain": [VALID_FIELDS[3][0], "pem text"]}, "certificate 1"),
    ],
)
def test_an_evidence_container_with_a_wrong_field_is_malformed_and_says_which(changes, reason):
    with pytest.raises(EvidenceMalformed, match=reason):
        parse_evidence(evidence_with(**changes))


def test_a_non_canonical_encoding_of_the_same_values_is_malformed():
    tag, version, signed_body, chain, signature = VALID_FIELDS
    # Version 1 written as a 16-bit integer instead of a fixint: same value, other bytes.
    stretched = b"\x95" + pack(tag) + b"\xcd\x00\x01" + pack(signed_body) + pack(chain) + pack(signature)
    assert msgpack.unpackb(stretched) == VALID_FIELDS
    with pytest.raises(EvidenceMalformed, match="canonical"):
        parse_evidence(stretched)


def test_a_certificate_whose_signature_bit_string_claims_unused_bits_is_malformed():
    # cryptography ignores a BIT STRING's unused-bits count when it returns the signature, so
    # this bent leaf would still verify: a second encoding of the same certificate. It is only
    # valid DER when the last signature bit is 0, so pick an authority whose leaf has that.
    authority = next(a for a in iter(lambda: FakeSimAuthority(now=T0), None) if a.leaf.signature[-1] % 2 == 0)
    leaf = authority.leaf.public_bytes(Encoding.DER)
    tail = b"\x03" + bytes([len(authority.leaf.signature) + 1]) + b"\x00" + authority.leaf.signature
    assert leaf.endswith(tail)
    unused_bits_at = len(leaf) - len(tail) + 2
    bent = leaf[:unused_bits_at] + b"\x01" + leaf[unused_bits_at + 1 :]
    assert x509.load_der_x509_certificate(bent).signature == authority.leaf.signature

    evidence = authority.evidence(REPORT_DATA, measurement=MEASUREMENT)
    tag, version, signed_body, _, signature = msgpack.unpackb(evidence)
    with pytest.raises(EvidenceMalformed, match="non-canonical signature"):
        parse_evidence(pack([tag, version, signed_body, [bent, authority.root.public_bytes(Encoding.DER)], signature]))


def test_oversized_evidence_is_refused_before_parsing():
    with pytest.raises(EvidenceMalformed, match="more than"):
        parse_evidence(b"\x00" * (abi.MAX_EVIDENCE_BYTES + 1))


def test_report_construction_checks_shapes_for_the_provider_side():
    with pytest.raises(ValueError, match="report_data"):
        SimReport(MEASUREMENT, False, 0, b"short", 0)


# --- fuzzing: only EvidenceMalformed may ever escape the parser ---------------------------------


def parses_or_is_malformed(data: bytes) -> None:
    try:
        parse_evidence(data)
    except EvidenceMalformed:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise_anything_but_evidence_malformed(data):
    parses_or_is_malformed(data)


def mutate(data, original: bytes) -> bytes:
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8), label="edits")):
        kind = data.draw(st.sampled_from(["replace", "insert", "delete"]), label="kind")
        position = data.draw(st.integers(0, max(len(mutated) - 1, 0)), label="position")
        if kind == "replace" and mutated:
            mutated[position] = data.draw(st.integers(0, 255), label="byte")
        elif kind == "insert":
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        elif mutated:
            del mutated[position : position + data.draw(st.integers(1, 32), label="length")]
    return bytes(mutated)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_evidence_never_raises_anything_but_evidence_malformed(data):
    parses_or_is_malformed(mutate(data, VALID))


FRONT_DOOR_POLICY = Policy(
    measurements=(MEASUREMENT.hex(),), allow_simulation=True, sim_root_sha256=AUTHORITY.root_sha256
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_evidence_through_the_front_door_is_refused_with_a_typed_error(data):
    mutated = mutate(data, VALID)
    try:
        verify_evidence("sim", mutated, FRONT_DOOR_POLICY, expected_report_data=REPORT_DATA, now=T0)
    except (EvidenceMalformed, EvidenceInvalid):
        return
    # Only an edit that cancelled itself out may be accepted.
    assert mutated == VALID


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=30)
    | st.binary(max_size=80)
    | st.sampled_from([abi.EVIDENCE_TAG, abi.REPORT_TAG, 1, MEASUREMENT, REPORT_DATA]),
    lambda children: st.lists(children, max_size=8)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_values)
def test_well_formed_msgpack_of_the_wrong_shape_is_malformed(value):
    with pytest.raises(EvidenceMalformed):
        parse_evidence(pack(value))


@settings(max_examples=300, deadline=None)
@given(
    tag=st.sampled_from([abi.EVIDENCE_TAG, "x"]),
    version=st.sampled_from([1, 0, 2, True]),
    signed_body=st.one_of(st.just(VALID_FIELDS[2]), st.binary(max_size=200).map(bytes)),
    chain=st.one_of(
        st.just(VALID_FIELDS[3]),
        st.lists(st.binary(max_size=600), min_size=0, max_size=5),
    ),
    signature=st.one_of(st.just(VALID_FIELDS[4]), st.binary(max_size=80)),
)
def test_evidence_assembled_from_valid_and_random_parts_never_raises_anything_else(
    tag, version, signed_body, chain, signature
):
    parses_or_is_malformed(pack([tag, version, signed_body, chain, signature]))

"""Real AWS Nitro attestation documents (../shared/vectors/nitro): they verify at their own time
and parse to EXPECTED.json; any change to what is signed, or truncation, is a typed refusal;
the wrong time or the wrong root fails."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta, UTC
from pathlib import Path

import cbor2
import pytest

from attestation.errors import AttestationError, EvidenceInvalid, EvidenceMalformed
from attestation.nitro import PLATFORM
from attestation.nitro.abi import parse_evidence
from attestation.platforms import VerificationInputs
from attestation.trust import AWS_NITRO_ROOT_G1, DEFAULT_TRUST, TrustAnchors

NITRO_VECTORS = ["nitro/blocky-nitrite/nitro_attestation.b64", "nitro/evervault/valid-attestation-doc-bytes"]


def _load(vectors_dir: Path, name: str) -> tuple[bytes, dict]:
    raw = (vectors_dir / name).read_bytes()
    if name.endswith(".b64"):
        raw = base64.b64decode(raw)
    expected = json.loads((vectors_dir / "EXPECTED.json").read_text())[name]
    return raw, expected


def _at(expected: dict) -> datetime:
    return datetime.fromisoformat(expected["timestamp_utc"])


@pytest.fixture(params=NITRO_VECTORS, ids=lambda n: n.split("/")[1])
def vector(request, vectors_dir):
    return _load(vectors_dir, request.param)


def _verify(raw: bytes, now: datetime, trust: TrustAnchors = DEFAULT_TRUST):
    return PLATFORM.verify(raw, VerificationInputs(now=now, trust=trust))


def _blob(value: bytes | None, expected: dict | None) -> None:
    if expected is None:
        assert value is None
        return
    assert len(value) == expected["len"]
    assert hashlib.sha256(value).hexdigest() == expected["sha256"]
    assert value[:32].hex() == expected["hex_prefix32"]


def test_verifies_at_its_timestamp_and_matches_expected(vector):
    raw, exp = vector
    verified = _verify(raw, _at(exp))
    claims = verified.claims
    assert set(claims) == {"module_id", "digest", "timestamp", "pcrs", "public_key", "user_data", "nonce"}
    assert verified.platform == "nitro"
    assert claims["module_id"] == exp["module_id"]
    assert claims["digest"] == exp["digest"]
    assert claims["timestamp"] == exp["timestamp_ms"]
    assert verified.issued_at == _at(exp)
    assert len(claims["pcrs"]) == exp["pcr_count"]
    assert sorted({len(v) for v in claims["pcrs"].values()}) == exp["pcr_len"]
    assert list(claims["pcrs"]) == [str(i) for i in range(exp["pcr_count"])]
    for index in (0, 1, 2, 3, 4, 8):
        assert claims["pcrs"][str(index)].hex() == exp[f"PCR{index}"]
    for name in ("public_key", "user_data", "nonce"):
        _blob(claims[name], exp[name])
    assert verified.measurement.hex() == exp["PCR0"]
    assert verified.report_data == (claims["user_data"] or b"")
    assert verified.debug is False
    assert verified.trailing_bytes == 0

    # Envelope, as the independent parser saw it.
    ev = verified.report
    assert ev.cose_length == exp["cose_len"] == len(raw)
    assert raw[:8].hex() == exp["first_bytes"]
    assert ev.tagged is (exp["cose_tag"] is not None)
    assert ev.protected.hex() == exp["protected_hex"]
    assert {str(k): v for k, v in cbor2.loads(ev.protected).items()} == exp["protected"]
    assert dict(ev.unprotected) == exp["unprotected"]
    assert len(ev.signature) == exp["signature_len"]
    assert list(cbor2.loads(ev.payload)) == exp["payload_keys"]

    # Chain: leaf first, then the cabundle reversed (root last).
    chain = verified.chain
    expected_chain = [exp["leaf"], *reversed(exp["cabundle"])]
    assert len(chain) == len(expected_chain)
    for got, want in zip(chain, expected_chain):
        assert got.subject == want["subject"]
        assert got.not_before.isoformat() == want["not_before"]
        assert got.not_after.isoformat() == want["not_after"]
    assert chain[-1].sha256 == AWS_NITRO_ROOT_G1
    assert exp["cabundle0_equals_root"] and exp["cose_sig_ok"] and exp["chain_valid_at_doc_timestamp"]


def test_expired_at_2026_and_valid_inside_leaf_window(vector):
    raw, exp = vector
    with pytest.raises(EvidenceInvalid, match="expired"):
        _verify(raw, datetime(2026, 11, 27, tzinfo=UTC))
    leaf_start = datetime.fromisoformat(exp["leaf"]["not_before"])
    leaf_end = datetime.fromisoformat(exp["leaf"]["not_after"])
    _verify(raw, leaf_start)
    _verify(raw, leaf_end)
    with pytest.raises(EvidenceInvalid, match="not valid before"):
        _verify(raw, leaf_start - timedelta(seconds=1))
    with pytest.raises(EvidenceInvalid, match="expired"):
        _verify(raw, leaf_end + timedelta(seconds=1))


def test_wrong_root_fails(vector):
    raw, exp = vector
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        _verify(raw, _at(exp), TrustAnchors({"nitro": frozenset({hashlib.sha256(b"other root").digest()})}))
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        _verify(raw, _at(exp), TrustAnchors({}))
    # The AWS root pinned for another platform is not trusted for Nitro.
    with pytest.raises(EvidenceInvalid):
        _verify(raw, _at(exp), TrustAnchors({"sgx": frozenset({AWS_NITRO_ROOT_G1})}))


def test_trailing_bytes_tolerated_and_counted(vector):
    raw, exp = vector
    for tail in (b"\x00", b"\xff" * 3, b"\x84\x44\xa1\x01\x38\x22", raw[:100]):
        verified = _verify(raw + tail, _at(exp))
        assert verified.trailing_bytes == len(tail)
        assert verified.report.cose_length == len(raw)


def test_tagged_form_verifies(vector):
    raw, exp = vector
    verified = _verify(b"\xd2" + raw, _at(exp))  # CBOR tag 18 around the same array
    assert verified.report.tagged is True
    assert verified.measurement.hex() == exp["PCR0"]


def _regions(raw: bytes):
    """Offsets of the signed parts (protected, payload, signature) and of the long values inside
    the payload (certificates, the three blobs, module_id, each PCR)."""
    ev = parse_evidence(raw)
    protected_at = raw.index(ev.protected)
    payload_at = raw.index(ev.payload)
    signature_at = ev.cose_length - len(ev.signature)
    assert raw[signature_at:ev.cose_length] == ev.signature
    doc, payload = ev.document, ev.payload
    spans = []
    for value in (doc.certificate, *doc.cabundle):
        at = payload_at + payload.index(value)
        spans.append((at, at + len(value)))
    for name in ("module_id", "public_key", "user_data", "nonce"):  # values may repeat: find the key
        value = getattr(doc, name)
        if value:
            key, encoded = cbor2.dumps(name), cbor2.dumps(value)
            header = len(encoded) - len(value if isinstance(value, bytes) else value.encode())
            at = payload_at + payload.index(key + encoded) + len(key) + header
            spans.append((at, at + len(encoded) - header))
    cursor = payload.index(b"dpcrs")
    for index, value in doc.pcrs.items():  # walk the map: equal PCR values repeat in the bytes
        cursor = payload.index(bytes([index, 0x58, len(value)]) + value, cursor) + 3
        spans.append((payload_at + cursor, payload_at + cursor + len(value)))
    return ev, protected_at, payload_at, signature_at, spans


def _sample(start: int, end: int, count: int) -> list[int]:
    step = max(1, (end - start) // count)
    return sorted({*range(start, end, step), end - 1})


def _must_refuse(raw: bytes, now: datetime, where: str) -> None:
    try:
        _verify(raw, now)
    except AttestationError:
        return
    except Exception as exc:  # pragma: no cover - the assertion below reports it
        pytest.fail(f"{where}: untyped {type(exc).__name__}: {exc}")
    pytest.fail(f"{where}: tampered document verified")


def test_any_single_byte_change_of_signed_data_is_refused(vector):
    raw, exp = vector
    now = _at(exp)
    ev, protected_at, payload_at, signature_at, spans = _regions(raw)
    positions: set[int] = set(range(protected_at, protected_at + len(ev.protected)))
    positions |= set(range(signature_at, signature_at + len(ev.signature)))
    # Every payload byte outside the long values: all CBOR structure (every map key, every
    # length and type byte), the digest and the timestamp...
    inside = {i for a, b in spans for i in range(a, b)}
    positions |= {i for i in range(payload_at, payload_at + len(ev.payload)) if i not in inside}
    # ...plus first, last and evenly spread bytes of every long value: 16 per certificate or
    # blob, 3 per PCR and module_id (each such flip costs a signature check).
    for a, b in spans:
        positions |= set(_sample(a, b, 16 if b - a > 100 else 2))
    # The COSE envelope's own headers (array, protected/payload/signature byte-string headers).
    positions |= set(range(0, protected_at)) | set(range(payload_at - 3, payload_at))
    positions |= {signature_at - 2, signature_at - 1}
    assert len(positions) > 300
    for index in sorted(positions):
        tampered = bytearray(raw)
        tampered[index] ^= 0xFF
        _must_refuse(bytes(tampered), now, f"byte {index} flipped")


def test_every_truncation_is_refused(vector):
    raw, exp = vector
    now = _at(exp)
    for length in range(len(raw)):
        with pytest.raises((EvidenceMalformed, EvidenceInvalid)):
            _verify(raw[:length], now)


def test_dropping_the_root_or_reordering_the_bundle_fails(vector):
    """Re-encoding the payload breaks the AWS signature, so this only shows the parser and the
    chain agree on the bundle's order; the fake PKI tests cover chains signed anew."""
    raw, exp = vector
    outer = cbor2.loads(raw)
    doc = cbor2.loads(outer[2])
    doc["cabundle"] = list(reversed(doc["cabundle"]))
    outer[2] = cbor2.dumps(doc)
    with pytest.raises(EvidenceInvalid):
        _verify(cbor2.dumps(outer), _at(exp))

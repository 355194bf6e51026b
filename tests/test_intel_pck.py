"""PCK certificate SGX Extensions: the real PCK leaves inside the vector quotes, synthetic
certificates from the fake Intel PKI, strictness of the DER reader, and fuzzing (only
EvidenceMalformed may escape)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import EvidenceMalformed
from attestation.intel.pck import PckExtensions, parse_pck_extensions, parse_sgx_extensions
from attestation.testing.intel import default_pki, sgx_extensions_der

from .intel_vectors import VECTOR_QUOTES, vector_quote

# ------------------------------------------------------------------ real PCK certificates


@pytest.mark.parametrize("relative", VECTOR_QUOTES)
def test_vector_pck_leaf_extensions(vectors_dir: Path, relative: str) -> None:
    expected = json.loads((vectors_dir / "EXPECTED.json").read_text())[relative]
    leaf = vector_quote(vectors_dir, relative).chain[0]
    ext = parse_pck_extensions(leaf)
    assert ext.fmspc.hex() == expected["pck_fmspc"]
    assert ext.pce_id == b"\x00\x00"
    assert len(ext.cpusvn) == 16 and len(ext.tcb_components) == 16
    # Intel's PCK certificates carry CPUSVN = the 16 component SVNs (tcbType 0).
    assert bytes(ext.tcb_components) == ext.cpusvn
    assert ext.pcesvn > 0
    if "pce_svn" in expected:   # the PCK certificate is chosen for a TCB at or below the running PCE's
        assert ext.pcesvn <= expected["pce_svn"]
    assert ext.sgx_type == 1                      # Scalable (Xeon SP)
    assert ext.ppid is not None and len(ext.ppid) == 16
    # Platform CA issued: PlatformInstanceID and Configuration are present.
    assert ext.platform_instance_id is not None and len(ext.platform_instance_id) == 16
    assert ext.dynamic_platform is True and ext.cached_keys is True and ext.smt_enabled is True


def test_vector_pck_values(vectors_dir: Path) -> None:
    """Values read from the real PCK leaves (cross-checked against the TCB Info evaluation in
    test_intel_collateral: both TDX platforms land on the UpToDate level)."""
    tdx4 = parse_pck_extensions(vector_quote(vectors_dir, "tdx/trustee/tdx_quote_4.dat").chain[0])
    assert tdx4.tcb_components[:8] == (5, 5, 13, 2, 3, 1, 0, 3) and tdx4.pcesvn == 11
    v5 = parse_pck_extensions(vector_quote(vectors_dir, "tdx/go-tdx-guest/quote_v5_sample.dat").chain[0])
    assert v5.tcb_components[:8] == (4, 4, 2, 2, 4, 1, 0, 5) and v5.pcesvn == 13


@pytest.mark.parametrize("relative", VECTOR_QUOTES)
def test_non_pck_certificates_have_no_sgx_extensions(vectors_dir: Path, relative: str) -> None:
    for cert in vector_quote(vectors_dir, relative).chain[1:]:
        with pytest.raises(EvidenceMalformed, match="no SGX Extensions"):
            parse_pck_extensions(cert)


# ------------------------------------------------------------------ synthetic


def test_synthetic_roundtrip_through_certificate() -> None:
    pki = default_pki()
    comps = tuple(range(16, 32))
    leaf = pki.issue_leaf(extensions=sgx_extensions_der(fmspc=bytes.fromhex("00906ea10000"), tcb_components=comps,
                                                        pcesvn=0x1234, pce_id=b"\x00\x01", sgx_type=2))
    ext = parse_pck_extensions(leaf)
    assert ext == PckExtensions(fmspc=bytes.fromhex("00906ea10000"), pce_id=b"\x00\x01", cpusvn=bytes(comps),
                                pcesvn=0x1234, tcb_components=comps, sgx_type=2, ppid=bytes(range(16)))


@settings(max_examples=200, deadline=None)
@given(comps=st.lists(st.integers(0, 255), min_size=16, max_size=16), pcesvn=st.integers(0, 0xFFFF),
       fmspc=st.binary(min_size=6, max_size=6), pce_id=st.binary(min_size=2, max_size=2),
       cpusvn=st.binary(min_size=16, max_size=16), sgx_type=st.one_of(st.none(), st.integers(0, 2)),
       config=st.one_of(st.none(), st.dictionaries(st.sampled_from([1, 2, 3]), st.booleans())))
def test_roundtrip_property(comps, pcesvn, fmspc, pce_id, cpusvn, sgx_type, config) -> None:
    der = sgx_extensions_der(fmspc=fmspc, tcb_components=comps, pcesvn=pcesvn, cpusvn=cpusvn, pce_id=pce_id,
                                sgx_type=sgx_type, configuration=config)
    ext = parse_sgx_extensions(der)
    assert (ext.fmspc, ext.pce_id, ext.cpusvn, ext.pcesvn, ext.tcb_components, ext.sgx_type) == (
        fmspc, pce_id, cpusvn, pcesvn, tuple(comps), sgx_type)
    config = config or {}
    assert ext.dynamic_platform == config.get(1) and ext.cached_keys == config.get(2)
    assert ext.smt_enabled == config.get(3)


def _good() -> bytes:
    return sgx_extensions_der(fmspc=bytes(6), tcb_components=[1] * 16, pcesvn=5)


def _entry(oid_der: bytes, value: bytes) -> bytes:
    body = oid_der + value
    return bytes([0x30, len(body)]) + body


OID_FMSPC = bytes.fromhex("060a2a864886f84d010d0104")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:-1], "runs past|truncated"),
    (lambda d: d + b"\x00", "trailing"),
    (lambda d: b"\x31" + d[1:], "expected tag"),
    (lambda d: bytes([0x30, 0x80]) + d[2:], "indefinite|not minimally|length"),
    (lambda d: b"", "truncated"),
    (lambda d: b"\x04\x00", "expected tag"),
])
def test_structural_malformations(mutate, message) -> None:
    with pytest.raises(EvidenceMalformed, match=message):
        parse_sgx_extensions(mutate(_good()))


def _rebuild(items: list[bytes]) -> bytes:
    body = b"".join(items)
    return b"\x30\x82" + len(body).to_bytes(2, "big") + body


def _items(der: bytes) -> list[bytes]:
    from attestation.intel.pck import DerReader
    top = DerReader(der).sequence("top")
    out = []
    while not top.at_end():
        start = top.pos
        top.read_tlv()
        out.append(der[start:top.pos])
    return out


def test_long_form_length_must_be_minimal() -> None:
    items = _items(_good())
    # Re-encode the outer SEQUENCE with a two-byte length although it is shorter than 256 bytes.
    body = b"".join(items)
    assert len(body) >= 0x80
    parse_sgx_extensions(_rebuild(items) if len(body) >= 256 else b"\x30\x81" + bytes([len(body)]) + body)
    with pytest.raises(EvidenceMalformed, match="minimally"):
        parse_sgx_extensions(b"\x30\x82" + len(body).to_bytes(2, "big") + body if len(body) < 256
                             else b"\x30\x83\x00" + len(body).to_bytes(2, "big") + body)


def test_missing_and_duplicate_entries() -> None:
    items = _items(_good())
    fmspc_items = [i for i in items if OID_FMSPC in i]
    others = [i for i in items if OID_FMSPC not in i]
    with pytest.raises(EvidenceMalformed, match="FMSPC missing"):
        parse_sgx_extensions(_rebuild(others))
    with pytest.raises(EvidenceMalformed, match="duplicate"):
        parse_sgx_extensions(_rebuild(items + fmspc_items))
    # An unknown OID is skipped (forward compatibility).
    unknown = _entry(bytes.fromhex("060a2a864886f84d010d0163"), b"\x05\x00")
    assert parse_sgx_extensions(_rebuild(items + [unknown])).fmspc == bytes(6)


@pytest.mark.parametrize("kwargs, message", [
    ({"fmspc": bytes(5)}, "FMSPC is 5 bytes"),
    ({"pce_id": bytes(3)}, "PCE-ID is 3 bytes"),
    ({"cpusvn": bytes(15)}, "CPUSVN is 15 bytes"),
    ({"tcb_components": [1] * 15 + [256]}, "outside 0..255"),
    ({"tcb_components": [1] * 15 + [-1]}, "outside 0..255"),
    ({"pcesvn": 0x10000}, "outside 0..65535"),
    ({"tcb_components": [1] * 15}, "components missing: 16"),
])
def test_field_errors(kwargs, message) -> None:
    args = {"fmspc": bytes(6), "tcb_components": [1] * 16, "pcesvn": 5}
    args.update(kwargs)
    with pytest.raises(EvidenceMalformed, match=message):
        parse_sgx_extensions(sgx_extensions_der(**args))


def test_non_minimal_integer_rejected() -> None:
    good = _good()
    # component 01 is encoded as 02 01 01; make it 02 02 00 01 (non-minimal) by rebuilding the TCB.
    bad = good.replace(b"\x06\x0b\x2a\x86\x48\x86\xf8\x4d\x01\x0d\x01\x02\x01\x02\x01\x01",
                       b"\x06\x0b\x2a\x86\x48\x86\xf8\x4d\x01\x0d\x01\x02\x01\x02\x02\x00\x01")
    assert bad != good
    with pytest.raises(EvidenceMalformed):
        parse_sgx_extensions(bad)


def test_certificate_with_garbage_extension_value() -> None:
    leaf = default_pki().issue_leaf(extensions=b"\x30\x03\x02\x01")
    with pytest.raises(EvidenceMalformed):
        parse_pck_extensions(leaf)


# ------------------------------------------------------------------ fuzzing

FUZZ_EXAMPLES = 1500


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        parse_sgx_extensions(data)
    except EvidenceMalformed:
        pass


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_encoding(data) -> None:
    der = bytearray(sgx_extensions_der(fmspc=bytes(6), tcb_components=[3] * 16, pcesvn=7, sgx_type=1,
                                          platform_instance_id=bytes(16), configuration={1: True, 2: False}))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(0, len(der) - 1)))
        if op == "flip" and der:
            der[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del der[at:]
        elif op == "insert":
            der[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif der:
            del der[at]
    try:
        ext = parse_sgx_extensions(bytes(der))
    except EvidenceMalformed:
        return
    assert len(ext.fmspc) == 6 and len(ext.cpusvn) == 16 and len(ext.tcb_components) == 16


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_certificate(data) -> None:
    """Whole PCK certificates with bytes changed: whatever cryptography still loads, the extension
    parser either reads or refuses with EvidenceMalformed."""
    from cryptography.hazmat.primitives import serialization

    leaf = _fuzz_leaf()
    der = bytearray(leaf.public_bytes(serialization.Encoding.DER))
    ext_at = der.find(bytes.fromhex("2a864886f84d010d01"))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(max(0, ext_at - 8), len(der) - 80))   # mostly inside the SGX extension
        der[at] ^= data.draw(st.integers(1, 255))
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
    except ValueError:
        return
    try:
        parse_pck_extensions(cert)
    except EvidenceMalformed:
        pass


@lru_cache(maxsize=1)
def _fuzz_leaf() -> x509.Certificate:
    return default_pki().issue_leaf(extensions=sgx_extensions_der(fmspc=bytes.fromhex("00606a000000"),
                                                                  tcb_components=[4] * 16, pcesvn=11))

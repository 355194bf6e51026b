"""Intel TCB Info / QE Identity collateral: the real PCS documents in the vectors, their signatures
over the exact raw JSON bytes, issuer chains (fake PKI), collateral directories and CRLs."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, UTC
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.chain import verify_chain
from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.intel.collateral import (
    IntelCollateral,
    json_member_spans,
    load_collateral,
    load_crl,
    load_issuer_chain,
    parse_qe_identity,
    parse_tcb_info,
    signature_valid,
    verify_qe_identity,
    verify_tcb_info,
)
from attestation.testing.intel import FakeIntelPki, default_pki
from attestation.testing.intel_collateral import enclave_level, qe_identity, tcb_info, tcb_level
from attestation.trust import DEFAULT_TRUST

from .intel_vectors import vector_quote

UTC = UTC
NOW = datetime(2026, 11, 27, tzinfo=UTC)
COLLATERAL = "tdx/go-tdx-guest/collateral"
# A time inside the validity of the 2023 documents, the 2023 CRLs and the tdx_quote_4 PCK chain.
IN_2023 = datetime(2023, 6, 20, tzinfo=UTC)

# The public key of Intel's "Intel SGX TCB Signing" certificate (X || Y). It is *recovered* below
# from the three vector documents (one key fits all three signatures), so the test shows both
# that our raw-span extraction is what Intel signed and that all three documents are Intel's.
INTEL_TCB_SIGNING_KEY = bytes.fromhex(
    "43451bcc73c9d5917caf766e61af3fe98087dd4f13257b261e851897799dd13d"
    "6811fb47713803bb9bae587fccddc2e31be9a28b86962acc6daf96da58eeca96")


def _doc(vectors_dir: Path, name: str) -> bytes:
    return (vectors_dir / COLLATERAL / name).read_bytes()


# ------------------------------------------------------------------ ECDSA P-256 public key recovery

_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_A = _P - 3
_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
      0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)


def _add(p, q):
    if p is None:
        return q
    if q is None:
        return p
    if p[0] == q[0] and (p[1] + q[1]) % _P == 0:
        return None
    if p == q:
        lam = (3 * p[0] * p[0] + _A) * pow(2 * p[1], -1, _P) % _P
    else:
        lam = (q[1] - p[1]) * pow(q[0] - p[0], -1, _P) % _P
    x = (lam * lam - p[0] - q[0]) % _P
    return x, (lam * (p[0] - x) - p[1]) % _P


def _mul(k, p):
    out = None
    while k:
        if k & 1:
            out = _add(out, p)
        p = _add(p, p)
        k >>= 1
    return out


def recover_keys(message: bytes, signature: bytes) -> set[tuple[int, int]]:
    """Every P-256 public key for which ``signature`` (r||s) verifies over ``message`` (SHA-256)."""
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    e = int.from_bytes(hashlib.sha256(message).digest(), "big")
    keys = set()
    for x in (r, r + _N):
        if x >= _P:
            continue
        y2 = (pow(x, 3, _P) + _A * x + _B) % _P
        y = pow(y2, (_P + 1) // 4, _P)
        if y * y % _P != y2:
            continue
        for yy in (y, _P - y):
            q = _mul(pow(r, -1, _N), _add(_mul(s, (x, yy)), _mul(-e % _N, _G)))
            if q is not None:
                keys.add(q)
    return keys


def _intel_key() -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + INTEL_TCB_SIGNING_KEY)


# ------------------------------------------------------------------ the real PCS documents


def test_vector_tcb_info_parses(vectors_dir: Path) -> None:
    info = parse_tcb_info(_doc(vectors_dir, "sample_tcbInfo_response"))
    assert (info.id, info.version, info.fmspc.hex(), info.pce_id, info.tcb_type) == ("TDX", 3, "50806f000000",
                                                                                     b"\0\0", 0)
    assert info.issue_date == datetime(2023, 6, 18, 8, 42, 58, tzinfo=UTC)
    assert info.next_update == datetime(2023, 7, 18, 8, 42, 58, tzinfo=UTC)
    assert info.tcb_evaluation_data_number == 15
    assert [lv.status for lv in info.tcb_levels] == ["UpToDate", "OutOfDate"]
    assert info.tcb_levels[0].sgx_components[:8] == (5, 5, 2, 2, 3, 1, 0, 3)
    assert info.tcb_levels[0].tdx_components[:3] == (3, 0, 5)
    assert info.tcb_levels[1].advisory_ids[0] == "INTEL-SA-00106" and len(info.tcb_levels[1].advisory_ids) == 13
    assert info.tdx_module is not None and info.tdx_module.mrsigner == bytes(48)
    assert info.tdx_module_identities == ()

    v5 = parse_tcb_info(_doc(vectors_dir, "sample_tcbinfo_response_v5"))
    assert (v5.fmspc.hex(), v5.tcb_evaluation_data_number) == ("90c06f000000", 18)
    assert [m.id for m in v5.tdx_module_identities] == ["TDX_03", "TDX_01"]
    assert [lv.isvsvn for lv in v5.tdx_module_identities[1].tcb_levels] == [6, 4, 2]
    assert [lv.status for lv in v5.tcb_levels] == ["UpToDate", "OutOfDate", "OutOfDate"]


def test_vector_qe_identity_parses(vectors_dir: Path) -> None:
    qe = parse_qe_identity(_doc(vectors_dir, "sample_qeIdentity_response"))
    assert (qe.id, qe.version, qe.isvprodid, qe.miscselect, qe.miscselect_mask) == ("TD_QE", 2, 2, 0, 0xFFFFFFFF)
    assert qe.mrsigner.hex() == "dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5"
    assert qe.attributes.hex() == "11" + "00" * 15 and qe.attributes_mask.hex() == "fbffffffffffffff" + "00" * 8
    assert [(lv.isvsvn, lv.status) for lv in qe.tcb_levels] == [(4, "UpToDate")]


@pytest.mark.parametrize("name, member", [("sample_tcbInfo_response", "tcbInfo"),
                                          ("sample_tcbinfo_response_v5", "tcbInfo"),
                                          ("sample_qeIdentity_response", "enclaveIdentity")])
def test_signed_span_is_the_raw_member_value(vectors_dir: Path, name: str, member: str) -> None:
    body = _doc(vectors_dir, name)
    start, end = json_member_spans(body)[member]
    assert body[:start] == b'{"' + member.encode() + b'":'
    assert body[end:].startswith(b',"signature":"')
    parsed = parse_tcb_info(body) if member == "tcbInfo" else parse_qe_identity(body)
    assert parsed.signed_bytes == body[start:end]


def test_vector_signatures_share_one_key_which_is_intels(vectors_dir: Path) -> None:
    docs = [parse_tcb_info(_doc(vectors_dir, "sample_tcbInfo_response")),
            parse_tcb_info(_doc(vectors_dir, "sample_tcbinfo_response_v5")),
            parse_qe_identity(_doc(vectors_dir, "sample_qeIdentity_response"))]
    candidates = [recover_keys(d.signed_bytes, d.signature) for d in docs]
    common = candidates[0] & candidates[1] & candidates[2]
    assert len(common) == 1, "the three documents must be signed by one key"
    (x, y), = common
    assert x.to_bytes(32, "big") + y.to_bytes(32, "big") == INTEL_TCB_SIGNING_KEY
    for doc in docs:
        assert signature_valid(_intel_key(), doc.signed_bytes, doc.signature)
        # A re-serialisation of the same JSON is *not* what Intel signed.
        reserialised = json.dumps(json.loads(doc.signed_bytes), indent=1).encode()
        assert not signature_valid(_intel_key(), reserialised, doc.signature)


@pytest.mark.parametrize("name", ["sample_tcbInfo_response", "sample_tcbinfo_response_v5",
                                  "sample_qeIdentity_response"])
def test_vector_any_tampered_byte_fails(vectors_dir: Path, name: str) -> None:
    body = _doc(vectors_dir, name)
    parse, member = ((parse_qe_identity, "enclaveIdentity") if "qeIdentity" in name
                     else (parse_tcb_info, "tcbInfo"))
    start, end = json_member_spans(body)[member]
    sig_start = body.index(b'"signature":"') + len(b'"signature":"')
    positions = list(range(start, end)) + list(range(sig_start, sig_start + 128))
    for pos in positions:
        tampered = bytearray(body)
        tampered[pos] ^= 0x01 if body[pos] not in b"0123456789abcdefABCDEF" else 0x02 if body[pos] != 0x61 else 0x03
        try:
            doc = parse(bytes(tampered))
        except EvidenceMalformed:
            continue
        assert not signature_valid(_intel_key(), doc.signed_bytes, doc.signature), f"byte {pos} of {name}"


def _intel_issuer_chain(vectors_dir: Path) -> Path | None:
    """The PCS issuer-chain header (Intel SGX TCB Signing + Root CA), if the vectors ever carry it."""
    for pattern in ("*tcb*signing*", "*issuer*chain*", "*TCB-Info-Issuer-Chain*"):
        found = sorted(vectors_dir.rglob(pattern))
        if found:
            return found[0]
    return None


def test_vector_collateral_full_chain_to_pinned_root(vectors_dir: Path, tmp_path: Path) -> None:
    chain_file = _intel_issuer_chain(vectors_dir)
    if chain_file is None:
        pytest.skip("the vectors do not include Intel's TCB Signing certificate (PCS sends it only in the "
                    "TCB-Info-Issuer-Chain header); signatures are checked against the recovered key above")
    for name in ("sample_tcbInfo_response", "sample_qeIdentity_response"):
        shutil.copy(vectors_dir / COLLATERAL / name, tmp_path / name)
    shutil.copy(chain_file, tmp_path / "tcb_signing_chain.pem")
    coll = load_collateral(tmp_path, now=IN_2023, trust=DEFAULT_TRUST)
    assert coll.tcb_info is not None and coll.qe_identity is not None
    assert coll.tcb_info.signer_chain[-1].sha256 == next(iter(DEFAULT_TRUST.for_platform("sgx")))


def test_vector_collateral_directory_without_issuer_chain_is_refused(vectors_dir: Path) -> None:
    if _intel_issuer_chain(vectors_dir) is not None:
        pytest.skip("the vectors carry the issuer chain")
    with pytest.raises(EvidenceInvalid, match="issuer chain"):
        load_collateral(vectors_dir / COLLATERAL, now=IN_2023, trust=DEFAULT_TRUST)


# ------------------------------------------------------------------ real CRLs


def test_vector_crls(vectors_dir: Path) -> None:
    pck_crl = load_crl(_doc(vectors_dir, "pckcrl"))
    root_crl = load_crl(_doc(vectors_dir, "rootcrl.der"))
    chain = vector_quote(vectors_dir, "tdx/trustee/tdx_quote_4.dat").chain
    leaf, platform_ca, root = chain
    assert pck_crl.issuer == platform_ca.subject and root_crl.issuer == root.subject
    assert pck_crl.is_signature_valid(platform_ca.public_key())
    assert root_crl.is_signature_valid(root.public_key())
    assert pck_crl.next_update_utc == datetime(2023, 7, 8, 7, 27, 52, tzinfo=UTC)
    assert len(pck_crl) > 0
    # The genuine quote's chain is not revoked by the genuine CRLs.
    verify_chain(chain, now=IN_2023, trusted_roots=DEFAULT_TRUST.for_platform("tdx"), crls=[pck_crl, root_crl])
    # The same CRL as PEM and as hex text (as some PCS/PCCS responses carry it).
    der = pck_crl.public_bytes(serialization.Encoding.DER)
    assert load_crl(pck_crl.public_bytes(serialization.Encoding.PEM)) == pck_crl
    assert load_crl(der.hex().encode()) == pck_crl
    assert load_crl(b"  " + der.hex().upper().encode() + b"\n") == pck_crl
    import base64
    assert load_crl(base64.encodebytes(der)) == pck_crl


@pytest.mark.parametrize("data", [b"", b"hello", b"\x30\x03\x02\x01\x00", b"abc", b"-----BEGIN X509 CRL-----\nxx\n"])
def test_load_crl_rejects_garbage(data: bytes) -> None:
    with pytest.raises(EvidenceMalformed):
        load_crl(data)


# ------------------------------------------------------------------ fake PKI: signatures and chains


def _sgx_levels() -> list[dict]:
    return [tcb_level("UpToDate", sgx=[5] * 16, pcesvn=10),
            tcb_level("OutOfDate", sgx=[1] * 16, pcesvn=1, advisories=["INTEL-SA-00001"])]


def test_synthetic_tcb_info_verifies() -> None:
    pki = default_pki()
    body = pki.tcb_info_document(fmspc=bytes.fromhex("00906ea10000"), levels=_sgx_levels())
    info = verify_tcb_info(body, pki.issuer_chain_pem(), now=NOW, trust=pki.trust())
    assert info.fmspc.hex() == "00906ea10000" and [c.subject for c in info.signer_chain][0].endswith(
        "CN=Intel SGX TCB Signing")
    # The PCS header form (URL-encoded PEM), a certificate list in either order, and an embedded chain.
    assert verify_tcb_info(body, pki.issuer_chain_header(), now=NOW, trust=pki.trust()).fmspc == info.fmspc
    assert verify_tcb_info(body, [pki.root, pki.signing], now=NOW, trust=pki.trust()).fmspc == info.fmspc
    embedded = pki.tcb_info_document(fmspc=bytes(6), levels=_sgx_levels(), embed_chain="TCB-Info-Issuer-Chain")
    assert verify_tcb_info(embedded, now=NOW, trust=pki.trust()).fmspc == bytes(6)


def test_whitespace_inside_the_signed_value_is_signed() -> None:
    pki = default_pki()
    body = pki.sign_document("tcbInfo", tcb_info(levels=_sgx_levels(), issue_date=NOW), indent=True)
    assert b"\n  " in body
    verify_tcb_info(body, pki.issuer_chain(), now=NOW, trust=pki.trust())
    with pytest.raises(EvidenceInvalid, match="signature does not verify"):
        verify_tcb_info(body.replace(b"\n  ", b"\n   ", 1), pki.issuer_chain(), now=NOW, trust=pki.trust())


def test_synthetic_qe_identity_verifies() -> None:
    pki = default_pki()
    body = pki.qe_identity_document(levels=[enclave_level("UpToDate", 8)])
    ident = verify_qe_identity(body, pki.issuer_chain_header(), now=NOW, trust=pki.trust())
    assert ident.id == "QE" and ident.isvprodid == 1


def test_every_single_byte_change_fails() -> None:
    pki = default_pki()
    body = pki.tcb_info_document(fmspc=bytes.fromhex("00906ea10000"), levels=_sgx_levels()[:1])
    chain = pki.issuer_chain()
    for pos in range(len(body)):
        tampered = bytearray(body)
        tampered[pos] = (tampered[pos] + 1) % 256 if body[pos] != ord("9") else ord("0")
        with pytest.raises((EvidenceMalformed, EvidenceInvalid)):
            verify_tcb_info(bytes(tampered), chain, now=NOW, trust=pki.trust())


def test_wrong_signing_key_or_chain_fails() -> None:
    pki, other = default_pki(), FakeIntelPki(NOW)
    body = pki.tcb_info_document(levels=_sgx_levels())
    # Another PKI's chain (its root pinned): the signature does not verify with its signing key.
    with pytest.raises(EvidenceInvalid, match="signature does not verify"):
        verify_tcb_info(body, other.issuer_chain(), now=NOW, trust=other.trust())
    # The right chain, but its root is not pinned (the real Intel root is).
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        verify_tcb_info(body, pki.issuer_chain(), now=NOW, trust=DEFAULT_TRUST)
    # Signed by another key, presented with our chain.
    forged = pki.tcb_info_document(levels=_sgx_levels(), key=other.signing_key)
    with pytest.raises(EvidenceInvalid, match="signature does not verify"):
        verify_tcb_info(forged, pki.issuer_chain(), now=NOW, trust=pki.trust())
    # No chain at all.
    with pytest.raises(EvidenceInvalid, match="no issuer chain"):
        verify_tcb_info(body, now=NOW, trust=pki.trust())


def test_signer_must_be_the_tcb_signing_certificate() -> None:
    """A PCK key also chains to the Intel root; it must not be able to sign TCB Info."""
    pki = default_pki()
    forged = pki.tcb_info_document(levels=_sgx_levels(), key=pki.leaf_key)
    with pytest.raises(EvidenceInvalid, match="not 'Intel SGX TCB Signing'"):
        verify_tcb_info(forged, [pki.leaf, pki.ca, pki.root], now=NOW, trust=pki.trust())
    # A certificate named "Intel SGX TCB Signing" but issued by the PCK CA (not by the root).
    key, cert = pki.issue("Intel SGX TCB Signing", issuer="ca")
    forged = pki.tcb_info_document(levels=_sgx_levels(), key=key)
    with pytest.raises(EvidenceInvalid, match="no root certificate"):
        verify_tcb_info(forged, [cert, pki.ca, pki.root], now=NOW, trust=pki.trust())


def test_signing_certificate_validity_is_checked_at_now() -> None:
    pki = FakeIntelPki(datetime(2024, 1, 1, tzinfo=UTC), signing_not_before=datetime(2020, 1, 1, tzinfo=UTC),
                       signing_not_after=datetime(2025, 5, 21, tzinfo=UTC))
    body = pki.tcb_info_document(levels=_sgx_levels(), issue_date=datetime(2024, 1, 1, tzinfo=UTC))
    with pytest.raises(EvidenceInvalid, match="expired"):
        verify_tcb_info(body, pki.issuer_chain(), now=NOW, trust=pki.trust())
    assert verify_tcb_info(body, pki.issuer_chain(), now=datetime(2024, 1, 2, tzinfo=UTC), trust=pki.trust())
    with pytest.raises(EvidenceInvalid, match="not valid before"):
        verify_tcb_info(body, pki.issuer_chain(), now=datetime(2019, 1, 1, tzinfo=UTC), trust=pki.trust())


def test_issuer_pool_with_extra_certificates() -> None:
    """A directory's certificate pool may hold an expired predecessor of the signing certificate
    (same key) and a look-alike root: the pair that verifies at ``now`` is used."""
    pki, other = default_pki(), FakeIntelPki(NOW)
    _, expired = pki.issue("Intel SGX TCB Signing", key=pki.signing_key,
                           not_before=datetime(2018, 1, 1, tzinfo=UTC), not_after=datetime(2019, 1, 1, tzinfo=UTC))
    body = pki.tcb_info_document(levels=_sgx_levels())
    pool = [other.root, expired, other.signing, pki.root, pki.signing]
    assert verify_tcb_info(body, pool, now=NOW, trust=pki.trust()).signer_chain[0].not_after == \
        pki.signing.not_valid_after_utc
    with pytest.raises(EvidenceInvalid, match="expired"):
        verify_tcb_info(body, [expired, pki.root], now=NOW, trust=pki.trust())


def test_revoked_signing_certificate_fails() -> None:
    pki = default_pki()
    body = pki.tcb_info_document(levels=_sgx_levels())
    root_crl = pki.crl(issuer="root", revoked=[pki.signing])
    with pytest.raises(EvidenceInvalid, match="revoked"):
        verify_tcb_info(body, pki.issuer_chain(), now=NOW, trust=pki.trust(), crls=[root_crl])


# ------------------------------------------------------------------ malformed documents


def _mutated_info(**changes) -> bytes:
    pki = default_pki()
    info = tcb_info(levels=_sgx_levels(), issue_date=NOW)
    for path, value in changes.items():
        target = info
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[int(key)] if key.isdigit() else target[key]
        last = keys[-1]
        if value is _DELETE:
            del target[last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return pki.sign_document("tcbInfo", info)


_DELETE = object()


@pytest.mark.parametrize("changes, message", [
    ({"version": 4}, "version 4"),
    ({"version": True}, "integer"),
    ({"id": "XYZ"}, "neither SGX nor TDX"),
    ({"tcbType": 1}, "tcbType 1"),
    ({"fmspc": "00"}, "6 bytes of hex"),
    ({"fmspc": "zz906ea10000"}, "hex"),
    ({"pceId": _DELETE}, "pceId is missing"),
    ({"issueDate": "yesterday"}, "ISO 8601"),
    ({"issueDate": "2024-01-01T00:00:00"}, "time zone"),
    ({"tcbLevels": []}, "non-empty list"),
    ({"tcbLevels__0__tcbStatus": "Fine"}, "not a known TCB status"),
    ({"tcbLevels__0__tcb__pcesvn": -1}, "0..65535"),
    ({"tcbLevels__0__tcb__sgxtcbcomponents": [{"svn": 1}] * 15}, "15 entries"),
    ({"tcbLevels__0__tcb__sgxtcbcomponents__3": {"svn": 256}}, "0..255"),
    ({"tcbLevels__0__tcb__sgxtcbcomponents__3": {"svn": "1"}}, "0..255"),
    ({"tcbLevels__1__advisoryIDs": "INTEL-SA-1"}, "list of strings"),
    ({"tcbLevels__0__tcb": [1]}, "not a JSON object"),
])
def test_malformed_tcb_info(changes, message) -> None:
    with pytest.raises(EvidenceMalformed, match=message):
        parse_tcb_info(_mutated_info(**changes))


@pytest.mark.parametrize("body, message", [
    (b'{"tcbInfo":{"a":1},"tcbInfo":{"a":2},"signature":"00"}', "duplicate key"),
    (b'{"tcbInfo":{"version":3,"version":2},"signature":"00"}', "duplicate key"),
    (b'{"tcbInfo":{"x":NaN},"signature":"00"}', "NaN"),
    (b'{"tcbInfo":1,"signature":"' + b"00" * 64 + b'"}', "not a JSON object"),
    (b'[1,2]', "not a JSON object"),
    (b'{"signature":"00"}', "no 'tcbInfo'"),
    (b'\xff\xfe{}', "not valid JSON"),
    (b'{"tcbInfo":{}}', "signature is missing"),
    (b'[' * 100000, "not valid JSON"),
])
def test_malformed_json(body: bytes, message: str) -> None:
    with pytest.raises(EvidenceMalformed, match=message):
        parse_tcb_info(body)


def test_qe_identity_v1_and_unknown_id_rejected() -> None:
    with pytest.raises(EvidenceMalformed, match="version 1"):
        parse_qe_identity(b'{"qeIdentity":{"version":1},"signature":"00"}')
    pki = default_pki()
    ident = qe_identity(levels=[enclave_level("UpToDate", 1)], issue_date=NOW)
    ident["id"] = "PCE"
    with pytest.raises(EvidenceMalformed, match="not QE, QVE or TD_QE"):
        parse_qe_identity(pki.sign_document("enclaveIdentity", ident))


def test_json_member_spans_handles_escapes_and_nesting() -> None:
    body = b'{ "a\\"b" : "x\\\\\\"}" , "tcbInfo" :\n {"k":[1,{"q":"]}"}]} ,"n":-1.5e3 }'
    spans = json_member_spans(body)
    assert body[slice(*spans['a"b'])] == b'"x\\\\\\"}"'
    assert body[slice(*spans["tcbInfo"])] == b'{"k":[1,{"q":"]}"}]}'
    assert body[slice(*spans["n"])] == b"-1.5e3"


# ------------------------------------------------------------------ collateral directories


def test_load_collateral_directory(tmp_path: Path) -> None:
    pki = default_pki()
    crl = pki.crl(revoked=[12345])
    pki.write_collateral_dir(
        tmp_path,
        tcb_info=pki.tcb_info_document(fmspc=bytes.fromhex("00906ea10000"), levels=_sgx_levels()),
        qe_identity=pki.qe_identity_document(levels=[enclave_level("UpToDate", 8)]),
        crls=[crl, pki.crl(issuer="root")])
    (tmp_path / "README").write_text("notes")
    (tmp_path / ".hidden").write_text("x")
    coll = load_collateral(tmp_path, now=NOW, trust=pki.trust())
    assert isinstance(coll, IntelCollateral)
    assert coll.tcb_info.fmspc.hex() == "00906ea10000" and coll.qe_identity.id == "QE"
    assert len(coll.crls) == 2 and any(c.get_revoked_certificate_by_serial_number(12345) for c in coll.crls)
    assert any("ignored README" in n for n in coll.notes)
    assert coll.as_mapping()["crls"] == list(coll.crls)


def test_load_collateral_pcs_style_names_and_formats(tmp_path: Path) -> None:
    """Files as PCS clients save them: any name, chain embedded or as the URL-encoded header text,
    several TCB Infos, CRLs as PEM and as hex text."""
    pki = default_pki()
    (tmp_path / "sample_tcbInfo_response").write_bytes(
        pki.tcb_info_document(fmspc=bytes.fromhex("00906ea10000"), levels=_sgx_levels()))
    (tmp_path / "tdx_tcb").write_bytes(pki.tcb_info_document(
        fmspc=bytes.fromhex("50806f000000"), tcb_id="TDX",
        levels=[tcb_level("UpToDate", sgx=[1] * 16, pcesvn=1, tdx=[1] * 16)]))
    (tmp_path / "qe.json").write_bytes(pki.qe_identity_document(
        levels=[enclave_level("UpToDate", 8)], embed_chain="SGX-Enclave-Identity-Issuer-Chain"))
    (tmp_path / "TCB-Info-Issuer-Chain.txt").write_text(pki.issuer_chain_header())
    (tmp_path / "pck.crl").write_bytes(pki.crl(revoked=[7]).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "root_crl_hex").write_text(pki.crl(issuer="root").public_bytes(serialization.Encoding.DER).hex())
    coll = load_collateral(tmp_path, now=NOW, trust=pki.trust())
    assert sorted(i.fmspc.hex() for i in coll.tcb_infos) == ["00906ea10000", "50806f000000"]
    assert len(coll.crls) == 2 and coll.qe_identities[0].id == "QE"


def test_load_collateral_errors(tmp_path: Path) -> None:
    pki = default_pki()
    body = pki.tcb_info_document(levels=_sgx_levels())
    (tmp_path / "tcb_info.json").write_bytes(body)
    with pytest.raises(EvidenceInvalid, match="tcb_info.json.*no issuer chain"):
        load_collateral(tmp_path, now=NOW, trust=pki.trust())
    (tmp_path / "tcb_signing_chain.pem").write_bytes(pki.issuer_chain_pem())
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        load_collateral(tmp_path, now=NOW, trust=DEFAULT_TRUST)
    (tmp_path / "tcb_info.json").write_bytes(body.replace(b'"UpToDate"', b'"OutOfDate"', 1))
    with pytest.raises(EvidenceInvalid, match="signature"):
        load_collateral(tmp_path, now=NOW, trust=pki.trust())
    (tmp_path / "tcb_info.json").write_bytes(body)
    (tmp_path / "bad.crl").write_bytes(b"\x30\x05garbage")
    with pytest.raises(EvidenceMalformed, match="bad.crl"):
        load_collateral(tmp_path, now=NOW, trust=pki.trust())
    (tmp_path / "bad.crl").unlink()
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(EvidenceMalformed, match="other.json"):
        load_collateral(tmp_path, now=NOW, trust=pki.trust())
    (tmp_path / "other.json").unlink()
    stale = pki.crl(last_update=datetime(2026, 1, 1, tzinfo=UTC), next_update=datetime(2026, 2, 1, tzinfo=UTC))
    (tmp_path / "stale.der").write_bytes(stale.public_bytes(serialization.Encoding.DER))
    coll = load_collateral(tmp_path, now=NOW, trust=pki.trust())
    assert any("stale" in n for n in coll.notes)
    with pytest.raises(EvidenceMalformed, match="does not exist"):
        load_collateral(tmp_path / "missing", now=NOW, trust=pki.trust())


def test_load_collateral_applies_root_crl_to_signing_cert(tmp_path: Path) -> None:
    pki = default_pki()
    pki.write_collateral_dir(tmp_path, tcb_info=pki.tcb_info_document(levels=_sgx_levels()),
                             crls=[pki.crl(issuer="root", revoked=[pki.signing])])
    with pytest.raises(EvidenceInvalid, match="revoked"):
        load_collateral(tmp_path, now=NOW, trust=pki.trust())


# ------------------------------------------------------------------ CRLs against PCK chains


def test_crl_listing_the_pck_serial_fails_the_chain() -> None:
    pki = default_pki()
    leaf = pki.issue_leaf(serial=0x5EED)
    chain = [leaf, pki.ca, pki.root]
    roots = pki.trust().for_platform("sgx")
    verify_chain(chain, now=NOW, trusted_roots=roots, crls=[pki.crl(revoked=[1, 2, 3]), pki.crl(issuer="root")])
    with pytest.raises(EvidenceInvalid, match="revoked"):
        verify_chain(chain, now=NOW, trusted_roots=roots, crls=[pki.crl(revoked=[1, 0x5EED])])
    # The PCK CA revoked by the root CRL.
    with pytest.raises(EvidenceInvalid, match="revoked"):
        verify_chain(chain, now=NOW, trusted_roots=roots, crls=[pki.crl(issuer="root", revoked=[pki.ca])])
    # A CRL that names the PCK CA as issuer but is signed by someone else is an error, not ignored.
    other = FakeIntelPki(NOW)
    with pytest.raises(EvidenceInvalid, match="not signed by it"):
        verify_chain(chain, now=NOW, trusted_roots=roots, crls=[other.crl()])
    # The CRL file round trip (DER, PEM, hex) keeps it effective.
    crl = pki.crl(revoked=[0x5EED])
    for data in (crl.public_bytes(serialization.Encoding.DER), crl.public_bytes(serialization.Encoding.PEM),
                 crl.public_bytes(serialization.Encoding.DER).hex().encode()):
        with pytest.raises(EvidenceInvalid, match="revoked"):
            verify_chain(chain, now=NOW, trusted_roots=roots, crls=[load_crl(data)])


def test_load_issuer_chain_forms() -> None:
    pki = default_pki()
    pem = pki.issuer_chain_pem()
    assert load_issuer_chain(pem) == tuple(pki.issuer_chain())
    assert load_issuer_chain(pki.issuer_chain_header()) == tuple(pki.issuer_chain())
    assert load_issuer_chain(pki.root.public_bytes(serialization.Encoding.DER)) == (pki.root,)
    with pytest.raises(EvidenceMalformed):
        load_issuer_chain(b"no certificates here")


# ------------------------------------------------------------------ fuzzing (only EvidenceMalformed escapes)

FUZZ_EXAMPLES = 800


def _base_documents() -> list[bytes]:
    pki = default_pki()
    return [pki.tcb_info_document(fmspc=bytes(6), levels=_sgx_levels()),
            pki.tcb_info_document(fmspc=bytes(6), tcb_id="TDX", levels=[
                tcb_level("UpToDate", sgx=[1] * 16, pcesvn=1, tdx=[1] * 16)],
                tdx_module_identities=[]),
            pki.qe_identity_document(levels=[enclave_level("UpToDate", 8)])]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    for parse in (parse_tcb_info, parse_qe_identity, load_crl):
        try:
            parse(data)
        except EvidenceMalformed:
            pass


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_documents(data) -> None:
    docs = _base_documents()
    body = bytearray(docs[data.draw(st.integers(0, len(docs) - 1))])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body) - 1))
        op = data.draw(st.sampled_from(["set", "cut", "insert"]))
        if op == "set":
            body[at] = data.draw(st.sampled_from(list(b'{}[]",:0123456789-.eE tfnul\\') + [0x80, 0xFF]))
        elif op == "cut":
            del body[at:at + data.draw(st.integers(1, 20))]
        else:
            body[at:at] = data.draw(st.sampled_from([b'"x":1,', b"[", b"}", b'"', b"\\u0000", b"1e999"]))
    pki = default_pki()
    for verify in (verify_tcb_info, verify_qe_identity):
        try:
            verify(bytes(body), pki.issuer_chain(), now=NOW, trust=pki.trust())
        except (EvidenceMalformed, EvidenceInvalid):
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 300) | st.text(max_size=8) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_field_values(data) -> None:
    """Replace one field anywhere in a valid TCB Info with an arbitrary JSON value."""
    pki = default_pki()
    info = tcb_info(fmspc=bytes(6), tcb_id="TDX", issue_date=NOW, levels=[
        tcb_level("UpToDate", sgx=[1] * 16, pcesvn=1, tdx=[1] * 16, advisories=["A"])],
        tdx_module_identities=[{"id": "TDX_01", "mrsigner": "00" * 48, "attributes": "00" * 8,
                                "attributesMask": "FF" * 8, "tcbLevels": [enclave_level("UpToDate", 1)]}])
    target = info
    while True:
        keys = list(target.keys()) if isinstance(target, dict) else list(range(len(target)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = target[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            target = child
            continue
        target[key] = data.draw(json_values)
        break
    try:
        parse_tcb_info(pki.sign_document("tcbInfo", info))
    except EvidenceMalformed:
        pass

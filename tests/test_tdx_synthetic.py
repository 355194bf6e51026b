"""TDX quotes (v4, v5 with TDX 1.0 and 1.5 bodies) from the project's fake Intel signers: both
PCK CA kinds, every policy field, the debug bit, revocation, validity, and each broken link."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime, timedelta, UTC

import pytest

from attestation.errors import EvidenceInvalid, EvidenceMalformed, PolicyViolation, Violation
from attestation.intel.abi import INTEL_QE_VENDOR_ID, QuoteHeader
from attestation.platforms import VerificationInputs
from attestation.policy import policy_from_mapping
from attestation.registry import platform
from attestation.tdx import PLATFORM, TdxPolicy
from attestation.tdx.abi import parse_quote
from attestation.tdx.policy import MEASUREMENT_KEYS
from attestation.testing.intel import FakeIntelPki, FakeQuotingEnclave, tdx_code_pin
from attestation.verify import verify_evidence

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
PKI = FakeIntelPki(NOW)
QE = FakeQuotingEnclave(PKI)
# Verified with Intel TDX collateral (an UpToDate TCB, fresh CRLs), as a [tdx] policy requires by default.
AT = VerificationInputs(now=NOW, trust=PKI.trust(), collateral=PKI.collateral(tdx=True))
BARE = replace(AT, collateral={})  # no collateral at all
SHAPES = [(4, 2), (5, 2), (5, 3)]
SHAPE_IDS = ["v4", "v5-tdx1.0", "v5-tdx1.5"]


def h(label: str) -> bytes:
    return hashlib.sha384(label.encode()).digest()


def _verify(quote: bytes, inputs: VerificationInputs = AT):
    return PLATFORM.verify(quote, inputs)


def _judge(table: dict, inputs: VerificationInputs = AT, **body):
    return PLATFORM.violations(_verify(QE.tdx_quote(**body), inputs), TdxPolicy.from_table(tdx_code_pin() | table),
                               inputs)


def _only(found: list[Violation]) -> Violation:
    assert len(found) == 1, found
    return found[0]


def test_registry_serves_this_platform():
    assert platform("tdx") is PLATFORM and PLATFORM.name == "tdx" and PLATFORM.section is TdxPolicy


@pytest.mark.parametrize("version, body_type", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("processor", [False, True], ids=["platform-ca", "processor-ca"])
def test_every_shape_and_ca_kind_verifies(version, body_type, processor):
    pki = FakeIntelPki(NOW, processor=processor)
    qe = FakeQuotingEnclave(pki)
    fields = {key: h(key) for key in MEASUREMENT_KEYS}
    quote = qe.tdx_quote(version=version, body_type=body_type, report_data=b"\x07" * 64, **fields)
    v = _verify(quote, VerificationInputs(now=NOW, trust=pki.trust()))
    q = v.report.quote
    assert v.claims["version"] == version and q.body_type == body_type
    assert v.measurement == h("mrtd") and v.report_data == b"\x07" * 64
    for key in MEASUREMENT_KEYS:
        assert v.claims[key] == h(key)
    if body_type == 3:
        assert q.body.tee_tcb_svn2 is not None and q.body.mrservicetd == bytes(48)
    ca = "Processor" if processor else "Platform"
    assert f"CN=Intel SGX PCK {ca} CA" in v.chain[1].subject
    assert v.report.pck_ca == ("processor" if processor else "platform")
    assert len(q.signed_region) == {(4, 2): 632, (5, 2): 638, (5, 3): 702}[(version, body_type)]


@pytest.mark.parametrize("attrs, debug", [(0x0, False), (0x1, True), (0x10000001, True), (0x10000000, False),
                                          (0xFFFFFFFE, False)])
def test_debug_is_td_attributes_bit_0(attrs, debug):
    v = _verify(QE.tdx_quote(td_attributes=attrs))
    assert v.debug is debug
    assert [x.field for x in PLATFORM.violations(v, TdxPolicy.from_table(tdx_code_pin()), AT)] == (["tdx.debug"] if debug else [])
    assert PLATFORM.violations(v, TdxPolicy.from_table(tdx_code_pin() | {"debug_allowed": True}), AT) == []


@pytest.mark.parametrize("key", MEASUREMENT_KEYS)
def test_each_measurement_field(key):
    allowed = [h("a").hex(), h("b").hex()]
    v = _only(_judge({key: allowed}, **{key: h("c")}))
    assert v.field == f"tdx.{key}" and v.value == h("c").hex()
    assert allowed[0] in v.expected and allowed[1] in v.expected and f"[tdx] {key}" in v.expected
    assert _judge({key: allowed}, **{key: h("b")}) == []


def test_xfam_with_mask():
    table = {"xfam": "0300000000000000", "xfam_mask": "0f00000000000000"}
    assert _judge(table, xfam=bytes.fromhex("f300000000000000")) == []
    v = _only(_judge(table, xfam=bytes.fromhex("0700000000000000")))
    assert (v.field, v.value) == ("tdx.xfam", "0700000000000000")
    assert v.expected.startswith("0300000000000000 under mask 0f00000000000000")
    assert _only(_judge({"xfam": "e702060000000000"}, xfam=bytes.fromhex("e742060000000000"))).field == "tdx.xfam"


def test_td_attributes_with_mask():
    # require SEPT_VE_DISABLE (bit 28), ignore the rest
    table = {"td_attributes": "0000001000000000", "td_attributes_mask": "0000001000000000"}
    assert _judge(table, td_attributes=0x10000000 | 0x40000000) == []
    v = _only(_judge(table, td_attributes=0))
    assert (v.field, v.value) == ("tdx.td_attributes", "0000000000000000")


def test_min_tee_tcb_svn_is_component_wise():
    # TEE_TCB_SVN[1] = 1 is a TDX module the fake TCB Info does not describe: judged without collateral.
    table = {"min_tee_tcb_svn": "03000500" + "00" * 12, "require_collateral": False}
    assert _judge(table, BARE, tee_tcb_svn=bytes([3, 0, 5]) + bytes(13)) == []
    assert _judge(table, BARE, tee_tcb_svn=bytes([9, 1, 6, 1]) + bytes(12)) == []
    v = _only(_judge(table, BARE, tee_tcb_svn=bytes([4, 0, 4]) + bytes(13)))  # larger first byte does not compensate
    assert v.field == "tdx.tee_tcb_svn" and v.value == "04000400" + "00" * 12
    assert "03000500" in v.expected and "component 2 lower" in v.expected


def test_all_violations_are_reported_at_once():
    table = {"mrtd": [h("x").hex()], "rtmr3": [h("y").hex()], "xfam": "0300000000000000",
             "min_tee_tcb_svn": "ff" * 16}
    found = PLATFORM.violations(_verify(QE.tdx_quote(td_attributes=1), BARE),
                                TdxPolicy.from_table(tdx_code_pin() | table), BARE)
    assert [v.field for v in found] == ["tdx.mrtd", "tdx.rtmr3", "tdx.xfam", "tdx.debug", "tdx.tee_tcb_svn",
                                        "tdx.collateral"]
    assert "collateral required" in found[-1].value


@pytest.mark.parametrize("status, accepted, ok", [
    ("UpToDate", None, True), ("OutOfDate", None, False), ("OutOfDate", ["UpToDate", "OutOfDate"], True),
    ("OutOfDateConfigurationNeeded", ["OutOfDate"], False), ("Revoked", ["UpToDate"], False),
])
def test_tcb_status_is_judged_when_collateral_gave_one(status, accepted, ok):
    v = replace(_verify(QE.tdx_quote()), tcb_status=status, advisory_ids=("INTEL-SA-00837",))
    table = {"accepted_advisory_ids": ["INTEL-SA-00837"]}
    if accepted is not None:
        table["accepted_tcb_statuses"] = accepted
    found = PLATFORM.violations(v, TdxPolicy.from_table(tdx_code_pin() | table), AT)
    assert (found == []) is ok
    if not ok:
        assert _only(found).field == "tdx.tcb_status"
    found = PLATFORM.violations(v, TdxPolicy.from_table(tdx_code_pin() | {"accepted_tcb_statuses": ["UpToDate", "OutOfDate"]}), AT)
    assert "tdx.advisory_ids" in [x.field for x in found]


def test_front_door_judges_the_tdx_table():
    policy = policy_from_mapping({"nonce_required": False, "tdx": tdx_code_pin(mrtd=h("good"))})
    rd = b"\x02" * 64
    claims = verify_evidence("tdx", QE.tdx_quote(version=5, mrtd=h("good"), report_data=rd), policy,
                             expected_report_data=rd, now=NOW, trust=PKI.trust(), collateral=AT.collateral)
    assert claims.measurement == h("good") and claims.details["version"] == 5
    assert claims.tcb_evaluated and claims.tcb_status == "UpToDate"
    with pytest.raises(PolicyViolation) as info:
        verify_evidence("tdx", QE.tdx_quote(mrtd=h("bad"), td_attributes=1, report_data=rd), policy,
                        expected_report_data=rd, now=NOW, trust=PKI.trust(), collateral=AT.collateral)
    assert set(info.value.fields) >= {"tdx.mrtd", "tdx.debug"}


# ---- revocation, validity, roots

def test_revoked_pck_leaf_and_ca_are_refused():
    for crl in (PKI.crl(issuer="ca", revoked=[PKI.leaf]), PKI.crl(issuer="root", revoked=[PKI.ca])):
        with pytest.raises(EvidenceInvalid, match="revoked"):
            _verify(QE.tdx_quote(), replace(AT, collateral={"crls": [crl]}))
    _verify(QE.tdx_quote(), replace(AT, collateral={"crls": [PKI.crl(issuer="ca"), PKI.crl(issuer="root")]}))


@pytest.mark.parametrize("which", ["leaf", "ca", "root"])
def test_expired_fake_chain_fails_after_expiry_and_passes_inside(which):
    end = NOW + timedelta(days=2)
    pki = FakeIntelPki(NOW, **{f"{which}_not_after": end})
    quote = FakeQuotingEnclave(pki).tdx_quote(version=5)
    _verify(quote, VerificationInputs(now=end, trust=pki.trust()))
    with pytest.raises(EvidenceInvalid, match="expired"):
        _verify(quote, VerificationInputs(now=end + timedelta(microseconds=1), trust=pki.trust()))


def test_wrong_root_fails():
    for trust in (None, FakeIntelPki(NOW).trust(), replace(PKI.trust(), roots={"sgx": frozenset({PKI.root_sha256})})):
        inputs = VerificationInputs(now=NOW) if trust is None else VerificationInputs(now=NOW, trust=trust)
        with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
            _verify(QE.tdx_quote(), inputs)


# ---- each broken link

OTHER_KEY = FakeQuotingEnclave(PKI).attestation_key


@pytest.mark.parametrize("options, error, match", [
    ({"quote_key": OTHER_KEY}, EvidenceInvalid, "quote signature"),
    ({"qe_key": OTHER_KEY}, EvidenceInvalid, "QE report signature"),
    ({"qe_report_data": bytes(64)}, EvidenceInvalid, "does not bind"),
    ({"attestation_key_raw": bytes(64)}, EvidenceInvalid, "not a point on P-256"),
    ({"cert_type": 1}, EvidenceMalformed, "type 1"),
    ({"pem": PKI.pem_chain([PKI.leaf, PKI.ca])}, EvidenceInvalid, "expected 3"),
    ({"pem": PKI.pem_chain([PKI.issue_leaf(signing_key=OTHER_KEY), PKI.ca, PKI.root])}, EvidenceInvalid,
     "not signed by"),
])
@pytest.mark.parametrize("version", [4, 5])
def test_each_broken_link_is_refused(options, error, match, version):
    with pytest.raises(error, match=match):
        _verify(QE.tdx_quote(version=version, sig_options=options))


def test_header_and_descriptor_are_checked():
    h4 = QuoteHeader(4, 2, 0x81, 0, 0, INTEL_QE_VENDOR_ID, bytes(20))
    with pytest.raises(EvidenceMalformed, match="not TDX"):
        _verify(QE.tdx_quote(header=replace(h4, tee_type=0)))
    with pytest.raises(EvidenceInvalid, match="QE vendor ID"):
        _verify(QE.tdx_quote(header=replace(h4, qe_vendor_id=bytes(16))))
    with pytest.raises(EvidenceMalformed, match="version 6"):
        _verify(QE.tdx_quote(header=replace(h4, version=6)))
    quote = bytearray(QE.tdx_quote(version=5, body_type=3))
    for body_type, size in ((1, 384), (3, 584), (4, 648), (2, 648)):
        mutated = bytearray(quote)
        mutated[48:54] = body_type.to_bytes(2, "little") + size.to_bytes(4, "little")
        with pytest.raises(EvidenceMalformed, match="body type"):
            _verify(bytes(mutated))


def test_outer_certification_type_must_be_6():
    quote = bytearray(QE.tdx_quote())
    offset = 0x27C + 128
    assert quote[offset:offset + 2] == b"\x06\x00"
    quote[offset:offset + 2] = b"\x05\x00"
    with pytest.raises(EvidenceMalformed, match="type 5"):
        _verify(bytes(quote))


@pytest.mark.parametrize("version", [4, 5])
def test_trailing_bytes_verify_and_are_counted(version):
    for junk in (b"", b"\x00" * 70, b"39 bytes of ASCII junk after the quote!"):
        quote = QE.tdx_quote(version=version, trailing=junk)
        assert _verify(quote).trailing_bytes == len(junk) == parse_quote(quote).trailing_bytes

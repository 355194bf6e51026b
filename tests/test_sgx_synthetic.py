"""SGX quotes from the project's fake Intel signers (attestation.testing.intel): both PCK CA
kinds, every policy field, debug bits, revocation, validity, and each broken link of the
signature chain (quote -> attestation key -> QE report -> PCK leaf -> CA -> root)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime, timedelta, UTC

import pytest

from attestation.errors import EvidenceInvalid, EvidenceMalformed, PolicyViolation, Violation
from attestation.intel.abi import QuoteHeader
from attestation.platforms import VerificationInputs
from attestation.policy import policy_from_mapping
from attestation.registry import platform
from attestation.sgx import PLATFORM, SgxPolicy
from attestation.sgx.abi import parse_quote
from attestation.testing.intel import FakeIntelPki, FakeQuotingEnclave, sgx_code_pin
from attestation.verify import verify_evidence

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
PKI = FakeIntelPki(NOW)
QE = FakeQuotingEnclave(PKI)
# Verified with Intel collateral (an UpToDate TCB, fresh CRLs), as a [sgx] policy requires by default.
AT = VerificationInputs(now=NOW, trust=PKI.trust(), collateral=PKI.collateral())
BARE = replace(AT, collateral={})  # no collateral at all

MRENCLAVE = hashlib.sha256(b"enclaveq worker").digest()
MRSIGNER = hashlib.sha256(b"enclaveq signer").digest()


def _verify(quote: bytes, inputs: VerificationInputs = AT):
    return PLATFORM.verify(quote, inputs)


def _judge(table: dict, **body):
    verified = _verify(QE.sgx_quote(**body))
    return PLATFORM.violations(verified, SgxPolicy.from_table(sgx_code_pin(**body) | table), AT)


def _only(found: list[Violation]) -> Violation:
    assert len(found) == 1, found
    return found[0]


def test_registry_serves_this_platform():
    assert platform("sgx") is PLATFORM and PLATFORM.name == "sgx" and PLATFORM.section is SgxPolicy


@pytest.mark.parametrize("processor", [False, True], ids=["platform-ca", "processor-ca"])
def test_both_pck_ca_kinds_verify(processor):
    pki = FakeIntelPki(NOW, processor=processor, fmspc=bytes.fromhex("30606a000000"))
    qe = FakeQuotingEnclave(pki)
    v = _verify(qe.sgx_quote(mrenclave=MRENCLAVE, isvsvn=7, report_data=b"\x42" * 64),
                VerificationInputs(now=NOW, trust=pki.trust()))
    assert v.measurement == MRENCLAVE and v.claims["isvsvn"] == 7 == v.security_version
    assert v.report_data == b"\x42" * 64
    ca = "Processor" if processor else "Platform"
    assert f"CN=Intel SGX PCK {ca} CA" in v.chain[1].subject
    if v.claims["fmspc"] is not None:
        assert v.claims["fmspc"] == bytes.fromhex("30606a000000")


def test_claims_carry_every_field():
    v = _verify(QE.sgx_quote(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, isvprodid=3, isvsvn=4, attributes_flags=0x07,
                             attributes_xfrm=0x1F, miscselect=0x11, cpusvn=bytes(range(16)), config_svn=9,
                             report_data=bytes(range(64))))
    c = v.claims
    assert (c["mrenclave"], c["mrsigner"], c["isvprodid"], c["isvsvn"]) == (MRENCLAVE, MRSIGNER, 3, 4)
    assert (c["attributes_flags"], c["attributes_xfrm"], c["miscselect"]) == (0x07, 0x1F, 0x11)
    assert (c["cpusvn"], c["config_svn"], c["report_data"]) == (bytes(range(16)), 9, bytes(range(64)))
    assert (c["qe_svn"], c["pce_svn"]) == (QE.qe_svn, QE.pce_svn)
    assert v.debug is True  # flags 0x07 has bit 1


@pytest.mark.parametrize("flags, debug", [(0x05, False), (0x07, True), (0x02, True), (0xFD, False)])
def test_debug_is_attributes_flags_bit_1(flags, debug):
    v = _verify(QE.sgx_quote(attributes_flags=flags))
    assert v.debug is debug
    found = PLATFORM.violations(v, SgxPolicy.from_table(sgx_code_pin()), AT)
    assert [x.field for x in found] == (["sgx.debug"] if debug else [])
    assert PLATFORM.violations(v, SgxPolicy.from_table(sgx_code_pin() | {"debug_allowed": True}), AT) == []


def test_matching_policy_has_no_violations():
    table = {
        "mrenclave": [MRENCLAVE.hex(), "00" * 32], "mrsigner": MRSIGNER.hex(), "isvprodid": [3, 4],
        "min_isvsvn": 4, "attributes": "0500000000000000" + "00" * 8,
        "attributes_mask": "fdffffffffffffff0000000000000000", "xfrm": "e700000000000000",
        "miscselect": 0x10, "miscselect_mask": 0xF0,
    }
    assert _judge(table, mrenclave=MRENCLAVE, mrsigner=MRSIGNER, isvprodid=3, isvsvn=4, miscselect=0x1F) == []


@pytest.mark.parametrize("table, body, field, value, expected_part", [
    ({"mrenclave": ["11" * 32]}, {"mrenclave": MRENCLAVE}, "sgx.mrenclave", MRENCLAVE.hex(), "11" * 32),
    ({"mrsigner": ["22" * 32, "33" * 32]}, {"mrsigner": MRSIGNER}, "sgx.mrsigner", MRSIGNER.hex(), "33" * 32),
    ({"isvprodid": 5}, {"isvprodid": 4}, "sgx.isvprodid", "4", "one of [5]"),
    ({"isvprodid": [1, 2]}, {"isvprodid": 4}, "sgx.isvprodid", "4", "one of [1, 2]"),
    ({"min_isvsvn": 10}, {"isvsvn": 9}, "sgx.isvsvn", "9", ">= 10"),
    ({"attributes": "0500000000000000e700000000000000"}, {"attributes_xfrm": 0x07}, "sgx.attributes",
     "0500000000000000" "0700000000000000", "0500000000000000e700000000000000 under mask " + "ff" * 16),
    ({"xfrm": "e700000000000000", "xfrm_mask": "ff00000000000000"}, {"attributes_xfrm": 0x03}, "sgx.xfrm",
     "0300000000000000", "e700000000000000 under mask ff00000000000000"),
    ({"miscselect": 1}, {"miscselect": 3}, "sgx.miscselect", "0x00000003", "0x00000001 under mask 0xffffffff"),
    ({"miscselect": 1, "miscselect_mask": 1}, {"miscselect": 2}, "sgx.miscselect", "0x00000002",
     "0x00000001 under mask 0x00000001"),
])
def test_each_policy_field_names_field_value_and_expectation(table, body, field, value, expected_part):
    v = _only(_judge(table, **body))
    assert v.field == field
    assert v.value == value
    assert expected_part in v.expected
    # and the same quote passes once the policy no longer asks
    assert _judge({}, **body) == []


def test_attributes_mask_ignores_unmasked_bits():
    table = {"attributes": "0100000000000000" + "00" * 8, "attributes_mask": "0100000000000000" + "00" * 8}
    assert _judge(table, attributes_flags=0x05, attributes_xfrm=0x3) == []
    assert _only(_judge(table, attributes_flags=0x04)).field == "sgx.attributes"


def test_all_violations_are_reported_at_once():
    table = {"mrenclave": ["11" * 32], "mrsigner": ["22" * 32], "isvprodid": 9, "min_isvsvn": 5,
             "xfrm": "0300000000000000", "miscselect": 0}
    verified = _verify(QE.sgx_quote(attributes_flags=0x07), BARE)
    found = PLATFORM.violations(verified, SgxPolicy.from_table(sgx_code_pin() | table), BARE)
    assert [v.field for v in found] == ["sgx.mrenclave", "sgx.mrsigner", "sgx.isvprodid", "sgx.isvsvn",
                                        "sgx.debug", "sgx.xfrm", "sgx.collateral"]
    assert "collateral required" in found[-1].value


def test_front_door_judges_the_sgx_table():
    policy = policy_from_mapping({"nonce_required": False, "sgx": {"mrenclave": [MRENCLAVE.hex()]}})
    quote = QE.sgx_quote(mrenclave=MRENCLAVE, report_data=b"\x01" * 64)
    claims = verify_evidence("sgx", quote, policy, expected_report_data=b"\x01" * 64, now=NOW, trust=PKI.trust(),
                             collateral=AT.collateral)
    assert claims.measurement == MRENCLAVE and claims.details["isvsvn"] == 0
    assert claims.tcb_evaluated and claims.tcb_status == "UpToDate"
    with pytest.raises(PolicyViolation) as info:
        verify_evidence("sgx", QE.sgx_quote(attributes_flags=0x07, report_data=b"\x01" * 64), policy,
                        expected_report_data=b"\x01" * 64, now=NOW, trust=PKI.trust(), collateral=AT.collateral)
    assert set(info.value.fields) >= {"sgx.mrenclave", "sgx.debug"}


# ---- TCB judgement (needs a TCB status, i.e. collateral; see test_sgx_tcb.py for the wiring)

@pytest.mark.parametrize("status, accepted, ok", [
    ("UpToDate", None, True), ("SWHardeningNeeded", None, False),
    ("SWHardeningNeeded", ["UpToDate", "SWHardeningNeeded"], True), ("OutOfDate", ["UpToDate"], False),
    ("ConfigurationNeeded", ["ConfigurationNeeded"], True), ("Revoked", ["UpToDate", "OutOfDate"], False),
])
def test_tcb_status_is_judged_when_collateral_gave_one(status, accepted, ok):
    v = replace(_verify(QE.sgx_quote()), tcb_status=status)
    table = {} if accepted is None else {"accepted_tcb_statuses": accepted}
    found = PLATFORM.violations(v, SgxPolicy.from_table(sgx_code_pin() | table), AT)
    if ok:
        assert found == []
    else:
        assert _only(found).field == "sgx.tcb_status" and _only(found).value == status


def test_advisory_ids_must_all_be_accepted():
    v = replace(_verify(QE.sgx_quote()), tcb_status="SWHardeningNeeded",
                advisory_ids=("INTEL-SA-00334", "INTEL-SA-00615"))
    table = {"accepted_tcb_statuses": ["SWHardeningNeeded"], "accepted_advisory_ids": ["INTEL-SA-00334"]}
    found = _only(PLATFORM.violations(v, SgxPolicy.from_table(sgx_code_pin() | table), AT))
    assert found.field == "sgx.advisory_ids" and found.value == "INTEL-SA-00615"
    table["accepted_advisory_ids"].append("INTEL-SA-00615")
    assert PLATFORM.violations(v, SgxPolicy.from_table(sgx_code_pin() | table), AT) == []


def test_without_collateral_the_quote_is_refused_unless_the_policy_waives_it():
    v = _verify(QE.sgx_quote(), BARE)
    assert v.tcb_status is None and not v.tcb_evaluated
    found = _only(PLATFORM.violations(v, SgxPolicy.from_table(sgx_code_pin()), BARE))
    assert found.field == "sgx.collateral" and "collateral required" in found.value
    assert "require_collateral = false" in found.expected and "--collateral DIR" in found.expected
    waived = SgxPolicy.from_table(sgx_code_pin() | {"require_collateral": False})
    assert PLATFORM.violations(v, waived, BARE) == []


# ---- revocation, validity, roots

def test_revoked_pck_leaf_is_refused():
    crl = PKI.crl(issuer="ca", revoked=[PKI.leaf])
    with pytest.raises(EvidenceInvalid, match="revoked"):
        _verify(QE.sgx_quote(), replace(AT, collateral={"crls": [crl]}))
    # a CRL that does not list it is fine, as is a root CRL revoking something else
    _verify(QE.sgx_quote(), replace(AT, collateral={"crls": [PKI.crl(issuer="ca"), PKI.crl(issuer="root")]}))


def test_revoked_pck_ca_is_refused():
    crl = PKI.crl(issuer="root", revoked=[PKI.ca])
    with pytest.raises(EvidenceInvalid, match="revoked"):
        _verify(QE.sgx_quote(), replace(AT, collateral={"crls": [crl]}))


def test_forged_crl_is_an_error():
    other = FakeIntelPki(NOW)
    forged = PKI.crl(issuer="ca", signing_key=other.ca_key)
    with pytest.raises(EvidenceInvalid, match="CRL"):
        _verify(QE.sgx_quote(), replace(AT, collateral={"crls": [forged]}))


@pytest.mark.parametrize("which", ["leaf", "ca", "root"])
def test_expired_fake_chain_fails_after_expiry_and_passes_inside(which):
    end = NOW + timedelta(days=3)
    pki = FakeIntelPki(NOW, **{f"{which}_not_after": end})
    quote = FakeQuotingEnclave(pki).sgx_quote()
    _verify(quote, VerificationInputs(now=end, trust=pki.trust()))
    with pytest.raises(EvidenceInvalid, match="expired"):
        _verify(quote, VerificationInputs(now=end + timedelta(seconds=1), trust=pki.trust()))
    with pytest.raises(EvidenceInvalid, match="not valid before"):
        _verify(quote, VerificationInputs(now=NOW - timedelta(days=400), trust=pki.trust()))


def test_wrong_root_fails():
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        _verify(QE.sgx_quote(), VerificationInputs(now=NOW))  # the default trust pins the real Intel root
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        _verify(QE.sgx_quote(), VerificationInputs(now=NOW, trust=FakeIntelPki(NOW).trust()))


# ---- each broken link

OTHER_KEY = FakeQuotingEnclave(PKI).attestation_key


@pytest.mark.parametrize("options, error, match", [
    ({"quote_key": OTHER_KEY}, EvidenceInvalid, "quote signature"),
    ({"qe_key": OTHER_KEY}, EvidenceInvalid, "QE report signature"),
    ({"qe_report_data": bytes(64)}, EvidenceInvalid, "does not bind"),
    ({"qe_report_data": hashlib.sha256(b"x").digest() + b"\x01" + bytes(31)}, EvidenceInvalid, "does not bind"),
    ({"attestation_key_raw": b"\x01" * 64}, EvidenceInvalid, "not a point on P-256"),
    ({"cert_type": 4}, EvidenceMalformed, "type 4"),
    ({"pem": PKI.pem_chain([PKI.leaf, PKI.root])}, EvidenceInvalid, "expected 3"),
    ({"pem": PKI.pem_chain([PKI.leaf, PKI.ca, PKI.root, PKI.root])}, EvidenceInvalid, "expected 3"),
    ({"pem": PKI.pem_chain([PKI.ca, PKI.leaf, PKI.root])}, EvidenceInvalid, "is neither"),
    ({"pem": PKI.pem_chain([PKI.leaf, PKI.issue_ca(name="Intel SGX PCK Rogue CA"), PKI.root])}, EvidenceInvalid,
     "is neither"),
    ({"pem": PKI.pem_chain([PKI.leaf, PKI.issue_ca(signing_key=OTHER_KEY), PKI.root])}, EvidenceInvalid,
     "is not signed by"),
    ({"pem": PKI.pem_chain([PKI.issue_leaf(signing_key=OTHER_KEY), PKI.ca, PKI.root])}, EvidenceInvalid,
     "is not signed by"),
    ({"pem": PKI.pem_chain([PKI.issue_leaf(name="Intel SGX PCK Certificat"), PKI.ca, PKI.root])}, EvidenceInvalid,
     "is not an 'Intel SGX PCK Certificate'"),
    # a genuine chain whose leaf key is not the one that signed the QE report
    ({"pem": PKI.pem_chain([PKI.issue_leaf(public_key=OTHER_KEY.public_key()), PKI.ca, PKI.root])},
     EvidenceInvalid, "QE report signature"),
    ({"pem": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, EvidenceMalformed, "not a DER"),
    ({"pem": PKI.pem_chain() + b"junk"}, EvidenceMalformed, "BEGIN"),
    ({"pem": PKI.pem_chain() + b"\n"}, EvidenceMalformed, "BEGIN"),
    ({"pem": b""}, EvidenceMalformed, "empty"),
])
def test_each_broken_link_is_refused(options, error, match):
    with pytest.raises(error, match=match):
        _verify(QE.sgx_quote(sig_options=options))


def test_pem_chain_variants_intel_emits_are_accepted():
    crlf = PKI.pem_chain().replace(b"\n", b"\r\n")
    for pem in (PKI.pem_chain(), PKI.pem_chain(nul=1), PKI.pem_chain(nul=3), crlf, PKI.pem_chain()[:-1]):
        _verify(QE.sgx_quote(sig_options={"pem": pem}))


def _set_a_pad_bit(pem: bytes) -> bytes | None:
    """The PEM with one pad bit set in the first base64 block that has padding, or None."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = bytearray(pem)
    search = 0
    while (end := pem.find(b"\n-----END CERTIFICATE-----", search)) != -1:
        search = end + 1
        last = end - 1
        while body[last] == ord("="):
            last -= 1
        if last != end - 1:  # padded: the last data character carries unused low bits
            body[last] = alphabet[alphabet.index(body[last]) | 1]
            return bytes(body)
    return None


def test_non_canonical_base64_is_malformed():
    # A lenient decoder would give the same certificate for these different bytes.
    for _ in range(50):
        leaf = PKI.issue_leaf()  # fresh signatures vary in length: some block will need padding
        chain = PKI.pem_chain([leaf, PKI.ca, PKI.root])
        mutated = _set_a_pad_bit(chain)
        if mutated is not None:
            break
    assert mutated is not None and mutated != chain
    with pytest.raises(EvidenceMalformed, match="non-canonical base64"):
        _verify(QE.sgx_quote(sig_options={"pem": mutated}))


def test_header_fields_are_checked():
    h = QuoteHeader(3, 2, 0, 1, 1, b"\x11" * 16, bytes(20))
    with pytest.raises(EvidenceInvalid, match="QE vendor ID"):
        _verify(QE.sgx_quote(header=h))
    with pytest.raises(EvidenceMalformed, match="attestation key type 3"):
        _verify(QE.sgx_quote(header=replace(h, att_key_type=3, qe_vendor_id=bytes.fromhex(
            "939a7233f79c4ca9940a0db3957f0607"))))
    with pytest.raises(EvidenceMalformed, match="reserved"):
        _verify(QE.sgx_quote(header=replace(h, tee_type=0x81)))


def test_trailing_bytes_verify_and_are_counted():
    for junk in (b"", b"\x00", b"\x00" * 70, b"not signed " * 10):
        v = _verify(QE.sgx_quote(trailing=junk))
        assert v.trailing_bytes == len(junk)
        assert parse_quote(QE.sgx_quote(trailing=junk)).trailing == junk


def test_signature_data_length_must_be_exact():
    quote = bytearray(QE.sgx_quote(trailing=b"\x00" * 8))
    length = int.from_bytes(quote[0x1B0:0x1B4], "little")
    for delta in (-1, 1, 8, -64):
        mutated = bytearray(quote)
        mutated[0x1B0:0x1B4] = (length + delta).to_bytes(4, "little")
        with pytest.raises(EvidenceMalformed):
            _verify(bytes(mutated))


def test_quoting_enclave_must_be_intels_and_not_debug():
    rogue = FakeQuotingEnclave(PKI, qe_mrsigner=hashlib.sha256(b"someone else's QE").digest())
    with pytest.raises(EvidenceInvalid, match="not Intel's Quoting Enclave signer"):
        _verify(rogue.sgx_quote())
    debug_qe = QE.qe_report(tdx=False, attributes_flags=0x17)
    with pytest.raises(EvidenceInvalid, match="debug Quoting Enclave"):
        _verify(QE.sgx_quote(sig_options={"qe_report": debug_qe}))

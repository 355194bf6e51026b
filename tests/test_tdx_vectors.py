"""The real TDX quotes in ../shared/vectors (v4 with a TDX 1.0 body, v5 with a TDX 1.5 body):
parse to EXPECTED.json, verify against the pinned Intel SGX Root CA inside their chains'
validity, and refuse every tampered or truncated variant with a typed error."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, UTC

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.intel.pck import parse_pck_extensions
from attestation.platforms import VerificationInputs
from attestation.tdx import PLATFORM
from attestation.tdx.abi import parse_quote
from attestation.testing.intel import FakeIntelPki, mutation_failures, quote_regions
from attestation.trust import INTEL_SGX_ROOT_CA, TrustAnchors

from .intel_vectors import AlsoRevokes

pytestmark = pytest.mark.vectors

FILES = ["tdx/trustee/tdx_quote_4.dat", "tdx/go-tdx-guest/quote_v5_sample.dat"]
INSIDE = datetime(2026, 11, 27, tzinfo=UTC)
AT = VerificationInputs(now=INSIDE)
BODY_FIELDS = ("tee_tcb_svn", "mrseam", "mrsignerseam", "seam_attributes", "td_attributes", "xfam", "mrtd",
               "mrconfigid", "mrowner", "mrownerconfig", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data")


@pytest.fixture(params=FILES)
def case(request, vectors_dir):
    name = request.param
    expected = json.loads((vectors_dir / "EXPECTED.json").read_text())[name]
    return name, (vectors_dir / name).read_bytes(), expected


def _qe_matches(body, exp: dict) -> None:
    assert body.cpusvn.hex() == exp["cpusvn"]
    assert body.miscselect == exp["miscselect"]
    assert body.attributes_flags == exp["attributes_flags"]
    assert body.attributes_xfrm == exp["attributes_xfrm"]
    assert body.debug is exp["debug"]
    assert body.mrenclave.hex() == exp["mrenclave"]
    assert body.mrsigner.hex() == exp["mrsigner"]
    assert body.isvprodid == exp["isvprodid"]
    assert body.isvsvn == exp["isvsvn"]
    assert body.config_svn == exp["config_svn"]
    assert body.report_data.hex() == exp["report_data"]


def test_parsed_values_equal_expected(case):
    name, quote, expected = case
    q = parse_quote(quote)
    assert len(quote) == expected["size"]
    assert q.header.version == expected["version"]
    assert q.header.att_key_type == expected["att_key_type"]
    assert hex(q.header.tee_type) == expected["tee_type"]
    assert q.header.qe_vendor_id.hex() == expected["qe_vendor_id"]
    assert q.header.user_data.hex() == expected["user_data"]
    first, last = expected["signed_region"].split(" ")[0].split("..")
    assert (0, len(q.signed_region) - 1) == (int(first), int(last))
    if q.version == 5:
        assert q.body_type == expected["body_type"] and len(q.body.encode()) == expected["body_size"]
    else:
        assert q.body_type == 2
    assert q.signature_data_len == expected["sig_data_len"]
    assert q.trailing_bytes == expected["trailing_bytes_after_sig"]
    body = expected["body"]
    for key in BODY_FIELDS:
        assert getattr(q.body, key).hex() == body[key], key
    assert q.body.debug is body["td_debug"]
    if "tee_tcb_svn2" in body:
        assert q.body.tee_tcb_svn2.hex() == body["tee_tcb_svn2"]
        assert q.body.mrservicetd.hex() == body["mrservicetd"]
    else:
        assert q.body.tee_tcb_svn2 is None and q.body.mrservicetd is None
    sig = q.signature_data
    assert sig.attestation_key.hex() == expected["attestation_key_xy"]
    assert sig.nested and expected["outer_cert_type"] == 6
    assert sig.outer_certification_size == expected["outer_cert_size"]
    _qe_matches(sig.qe_report, expected["qe_report"])
    assert len(sig.qe_auth_data) == expected["qe_auth_data_len"]
    assert sig.certification.type == expected["inner_cert_type"]
    assert len(sig.certification.data) == expected["inner_cert_size"] == expected["pck_chain_pem_len"]
    assert sig.certification.pck_chain.nul_padding == 1
    assert [c.subject.rfc4514_string() for c in sig.certification.pck_chain.certs] == [
        e["subject"] for e in expected["pck_chain"]["chain"]]


def test_verifies_and_claims_equal_expected(case):
    name, quote, expected = case
    v = PLATFORM.verify(quote, AT)
    body = expected["body"]
    assert v.platform == "tdx"
    assert set(v.claims) == {"version", "mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid", "mrowner",
                             "mrownerconfig", "mrseam", "td_attributes", "xfam", "tee_tcb_svn", "report_data"}
    assert v.claims["version"] == expected["version"]
    for key in set(v.claims) - {"version"}:
        assert v.claims[key].hex() == body[key], key
    assert v.measurement.hex() == body["mrtd"]
    assert v.report_data.hex() == body["report_data"]
    assert v.debug is body["td_debug"]
    assert v.trailing_bytes == 0
    assert v.tcb_status is None
    assert [(c.subject, c.not_before.isoformat(), c.not_after.isoformat()) for c in v.chain] == [
        (e["subject"], e["not_before"], e["not_after"]) for e in expected["pck_chain"]["chain"]]
    assert v.chain[-1].sha256 == INTEL_SGX_ROOT_CA
    leaf = v.report.quote.signature_data.certification.pck_chain.certs[0]
    assert parse_pck_extensions(leaf).fmspc.hex() == expected["pck_fmspc"]
    assert v.report.pck_extensions.fmspc.hex() == expected["pck_fmspc"]


def test_every_single_byte_change_is_refused(case):
    """Every byte of the signed region (632 / 702), the signature length and the signature data
    before the PEM chain (~650 bytes) is flipped twice (XOR 0x01, 0xff); every 7th byte of the
    PEM chain three times (XOR 0x01, 0x20, 0xff): 4,094 (v4) and 4,234 (v5) mutants; each must fail with
    EvidenceMalformed or EvidenceInvalid."""
    name, quote, _ = case
    r = quote_regions(parse_quote(quote))
    assert mutation_failures(PLATFORM.verify, quote, AT, range(r.signed[0], r.certification[0]), (0x01, 0xFF)) == []
    sparse = range(r.certification[0], r.certification[1], 7)
    assert mutation_failures(PLATFORM.verify, quote, AT, sparse, (0x01, 0x20, 0xFF)) == []
    # and the NUL that ends the chain
    assert mutation_failures(PLATFORM.verify, quote, AT, [r.certification[1] - 1], (0x01, 0x0A, 0x2D)) == []


def test_every_truncation_is_malformed(case):
    _, quote, _ = case
    for length in range(len(quote)):
        with pytest.raises(EvidenceMalformed):
            PLATFORM.verify(quote[:length], AT)


def test_trailing_bytes_are_tolerated_and_counted(case):
    _, quote, _ = case
    for junk in (b"\x00" * 70, b"39 bytes of ASCII junk after the quote!", b"\x01"):
        v = PLATFORM.verify(quote + junk, AT)
        assert v.trailing_bytes == len(junk)


def test_expired_and_not_yet_valid_chains_fail(case):
    _, quote, expected = case
    leaf = expected["pck_chain"]["chain"][0]
    before = datetime.fromisoformat(leaf["not_before"])
    after = datetime.fromisoformat(leaf["not_after"])
    PLATFORM.verify(quote, VerificationInputs(now=before))
    PLATFORM.verify(quote, VerificationInputs(now=after))
    with pytest.raises(EvidenceInvalid, match="expired"):
        PLATFORM.verify(quote, VerificationInputs(now=after + timedelta(seconds=1)))
    with pytest.raises(EvidenceInvalid, match="not valid before"):
        PLATFORM.verify(quote, VerificationInputs(now=before - timedelta(seconds=1)))


def test_wrong_root_fails(case):
    _, quote, _ = case
    for trust in (TrustAnchors({}), FakeIntelPki(INSIDE).trust(),
                  TrustAnchors({"sgx": frozenset({INTEL_SGX_ROOT_CA})})):
        with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
            PLATFORM.verify(quote, VerificationInputs(now=INSIDE, trust=trust))


def test_real_crls_are_checked(case, vectors_dir):
    """Intel's PCK CRL and root CRL are applied to the quote's chain: they are issued by its
    Platform CA and root (so they are not skipped as foreign), they do not revoke it, a CRL in
    the Platform CA's name that the Platform CA did not sign is refused, and the PCK CRL listing
    the quote's PCK certificate makes verification fail."""
    _, quote, _ = case
    coll = vectors_dir / "tdx/go-tdx-guest/collateral"
    pck_crl = x509.load_der_x509_crl((coll / "pckcrl").read_bytes())
    root_crl = x509.load_der_x509_crl((coll / "rootcrl.der").read_bytes())
    leaf, platform_ca, root = parse_quote(quote).signature_data.certification.pck_chain.certs
    assert pck_crl.issuer == platform_ca.subject and pck_crl.is_signature_valid(platform_ca.public_key())
    assert root_crl.issuer == root.subject and root_crl.is_signature_valid(root.public_key())
    PLATFORM.verify(quote, VerificationInputs(now=INSIDE, collateral={"crls": [pck_crl, root_crl]}))

    forged = (x509.CertificateRevocationListBuilder().issuer_name(pck_crl.issuer)
              .last_update(INSIDE).next_update(INSIDE).sign(FakeIntelPki(INSIDE).ca_key, hashes.SHA256()))
    with pytest.raises(EvidenceInvalid, match="CRL claiming issuer .*Intel SGX PCK Platform CA.* is not signed by it"):
        PLATFORM.verify(quote, VerificationInputs(now=INSIDE, collateral={"crls": [forged, root_crl]}))

    revoking = AlsoRevokes(pck_crl, leaf.serial_number)
    with pytest.raises(EvidenceInvalid, match=f"Intel SGX PCK Certificate.*serial {leaf.serial_number:x}.* is revoked"):
        PLATFORM.verify(quote, VerificationInputs(now=INSIDE, collateral={"crls": [revoking, root_crl]}))


def test_sgx_quote_is_refused_with_a_hint(vectors_dir):
    with pytest.raises(EvidenceMalformed, match="use platform sgx"):
        PLATFORM.verify((vectors_dir / "sgx/trustee/occlum_quote.dat").read_bytes(), AT)

"""A policy that constrains TCB status, advisories or revocation fails closed (issue 15, items 2-3).

For SGX, TDX and SEV-SNP, through the front door (``verify_evidence``): an out-of-date TCB is
refused when collateral says so; without collateral the evidence is refused with "collateral
required", unless the policy explicitly sets ``require_collateral = false`` (and then the claims
say the TCB was not evaluated); a revoked PCK / ASK / VCEK is refused; a CRL, TCB Info or QE
Identity past its nextUpdate is refused, and accepted within an explicit
``collateral_grace_seconds``; the claims list the collateral used and its age.
"""

from __future__ import annotations

from datetime import datetime, timedelta, UTC
from typing import Any

import pytest

from attestation.errors import EvidenceInvalid, PolicyError, PolicyViolation
from attestation.intel.tcb_status import TCB_STATUSES
from attestation.policy import policy_from_mapping
from attestation.sgx import SgxPolicy
from attestation.snp import SnpPolicy
from attestation.snp.verify import clear_caches
from attestation.tdx import TdxPolicy
from attestation.testing.intel import FakeIntelPki, FakeQuotingEnclave, sgx_code_pin, tdx_code_pin
from attestation.testing.snp import FakeAmd
from attestation.verify import verify_evidence

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
RD = b"\x15" * 64
PKI = FakeIntelPki(NOW)
QE = FakeQuotingEnclave(PKI)
MEASUREMENT = bytes.fromhex("42" * 48)


# ---- Intel: SGX and TDX share the rules, so every test runs for both --------------------------

INTEL = ["sgx", "tdx"]


def _quote(platform: str) -> bytes:
    return QE.sgx_quote(report_data=RD) if platform == "sgx" else QE.tdx_quote(report_data=RD)


def _intel_policy(platform: str, **keys: Any):
    pin = sgx_code_pin() if platform == "sgx" else tdx_code_pin()
    return policy_from_mapping({platform: pin | keys})


def _intel_collateral(platform: str, **options: Any) -> dict[str, Any]:
    return PKI.collateral(tdx=platform == "tdx", **options)


def _verify_intel(platform: str, policy, collateral: dict[str, Any] | None, now: datetime = NOW):
    return verify_evidence(platform, _quote(platform), policy, expected_report_data=RD, now=now, trust=PKI.trust(),
                           collateral=collateral)


def _refusal(call) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as info:
        call()
    return info.value


@pytest.mark.parametrize("platform", INTEL)
def test_an_up_to_date_policy_refuses_an_out_of_date_tcb(platform):
    refused = _refusal(lambda: _verify_intel(platform, _intel_policy(platform),
                                             _intel_collateral(platform, status="OutOfDate")))
    (violation,) = refused.violations
    assert violation.field == f"{platform}.tcb_status" and violation.value == "OutOfDate"
    assert "accepted_tcb_statuses" in violation.expected


@pytest.mark.parametrize("platform", INTEL)
def test_an_up_to_date_tcb_is_accepted_and_the_claims_say_it_was_evaluated(platform):
    claims = _verify_intel(platform, _intel_policy(platform), _intel_collateral(platform))
    assert claims.tcb_status == "UpToDate" and claims.tcb_evaluated is True
    kinds = sorted((c.kind, c.issuer) for c in claims.collateral)
    assert kinds == [("crl", "Intel SGX PCK Platform CA"), ("crl", "Intel SGX Root CA"),
                     ("qe_identity", "Intel SGX TCB Signing"), ("tcb_info", "Intel SGX TCB Signing")]
    assert all(c.age_seconds == DAY.total_seconds() for c in claims.collateral)  # issued NOW - 1 day
    doc = claims.to_json()
    assert doc["tcb_evaluated"] is True and {c["kind"] for c in doc["collateral"]} == {"crl", "tcb_info", "qe_identity"}


@pytest.mark.parametrize("platform", INTEL)
def test_without_collateral_the_evidence_is_refused_as_collateral_required(platform):
    refused = _refusal(lambda: _verify_intel(platform, _intel_policy(platform), None))
    (violation,) = refused.violations
    assert violation.field == f"{platform}.collateral" and "collateral required" in violation.value
    assert "pass --collateral DIR (see `enclaveq collateral fetch`)" in violation.expected
    assert f"set [{platform}] require_collateral = false" in violation.expected


@pytest.mark.parametrize("platform", INTEL)
def test_a_policy_that_constrains_the_tcb_cannot_be_met_by_omitting_collateral(platform):
    # The old fail-open: an OutOfDate platform simply withheld its collateral.
    policy = _intel_policy(platform, accepted_tcb_statuses=["UpToDate"], accepted_advisory_ids=[])
    refused = _refusal(lambda: _verify_intel(platform, policy, {}))
    assert refused.fields == (f"{platform}.collateral",)


@pytest.mark.parametrize("platform", INTEL)
def test_tcb_info_without_the_pck_chain_crls_is_not_enough(platform):
    # Without the PCK CRL a revoked PCK certificate would pass: revocation was not evaluated.
    collateral = _intel_collateral(platform, crls=[PKI.crl(issuer="root")])
    refused = _refusal(lambda: _verify_intel(platform, _intel_policy(platform), collateral))
    (violation,) = refused.violations
    assert violation.field == f"{platform}.collateral" and "PCK CRL" in violation.value
    assert "Root CA CRL" not in violation.value


@pytest.mark.parametrize("platform", INTEL)
def test_an_explicit_waiver_accepts_evidence_whose_tcb_was_not_evaluated(platform):
    claims = _verify_intel(platform, _intel_policy(platform, require_collateral=False), None)
    assert claims.tcb_evaluated is False and claims.tcb_status is None and claims.collateral == ()
    assert claims.to_json()["tcb_evaluated"] is False


@pytest.mark.parametrize("platform", INTEL)
def test_the_waiver_does_not_stop_given_collateral_from_being_judged(platform):
    policy = _intel_policy(platform, require_collateral=False)
    refused = _refusal(lambda: _verify_intel(platform, policy, _intel_collateral(platform, status="OutOfDate")))
    assert refused.fields == (f"{platform}.tcb_status",)


@pytest.mark.parametrize("platform", INTEL)
@pytest.mark.parametrize("revoked", ["leaf", "ca"])
def test_a_revoked_pck_certificate_or_pck_ca_is_refused(platform, revoked):
    crls = ([PKI.crl(issuer="ca", revoked=[PKI.leaf]), PKI.crl(issuer="root")] if revoked == "leaf"
            else [PKI.crl(issuer="ca"), PKI.crl(issuer="root", revoked=[PKI.ca])])
    for policy in (_intel_policy(platform), _intel_policy(platform, require_collateral=False)):
        with pytest.raises(EvidenceInvalid, match="revoked"):
            _verify_intel(platform, policy, _intel_collateral(platform, crls=crls))


def _stale_intel(platform: str, document: str) -> dict[str, Any]:
    """Collateral whose ``document`` ("crl", "tcb_info", "qe_identity") had its nextUpdate 2 hours before NOW."""
    late = NOW - timedelta(hours=2)
    if document == "crl":
        return _intel_collateral(platform, crls=[PKI.crl(issuer="ca", next_update=late), PKI.crl(issuer="root")])
    if document == "tcb_info":
        return _intel_collateral(platform, tcb_next_update=late)
    return _intel_collateral(platform, qe_next_update=late)


STALE_NAMES = {"crl": "stale CRL of 'Intel SGX PCK Platform CA'", "tcb_info": "stale TCB Info",
               "qe_identity": "stale QE Identity"}


@pytest.mark.parametrize("platform", INTEL)
@pytest.mark.parametrize("document", ["crl", "tcb_info", "qe_identity"])
def test_stale_collateral_is_refused_and_accepted_within_an_explicit_grace(platform, document):
    collateral = _stale_intel(platform, document)
    refused = _refusal(lambda: _verify_intel(platform, _intel_policy(platform), collateral))
    (violation,) = refused.violations
    assert violation.field == f"{platform}.collateral"
    assert STALE_NAMES[document] in violation.value and "nextUpdate 2026-11-27T10:00:00Z" in violation.value
    assert "2.0 h (7200 s)" in violation.value and "collateral_grace_seconds = 0" in violation.expected
    # one hour of grace is not enough for two hours of staleness; three hours are
    assert _refusal(lambda: _verify_intel(platform, _intel_policy(platform, collateral_grace_seconds=3600),
                                          collateral)).fields == (f"{platform}.collateral",)
    claims = _verify_intel(platform, _intel_policy(platform, collateral_grace_seconds=3 * 3600), collateral)
    stale = [c for c in claims.collateral if c.kind == document and c.next_update == NOW - timedelta(hours=2)]
    assert len(stale) == 1 and stale[0].age_seconds == DAY.total_seconds()
    # the deprecated switch still accepts any staleness
    assert _verify_intel(platform, _intel_policy(platform, allow_expired_collateral=True), collateral).tcb_evaluated


@pytest.mark.parametrize("platform", INTEL)
def test_staleness_is_judged_at_the_verification_time_given(platform):
    collateral = _intel_collateral(platform)  # nextUpdate NOW + 29 days (TCB Info, QE Identity)
    _verify_intel(platform, _intel_policy(platform), collateral, now=NOW + 28 * DAY)
    refused = _refusal(lambda: _verify_intel(platform, _intel_policy(platform), collateral, now=NOW + 29 * DAY + 1 * DAY))
    assert set(refused.fields) == {f"{platform}.collateral"}


def test_the_top_level_route_fails_closed_too():
    # No [sgx] table: the top-level allow-list route, judged with the collateral defaults.
    policy = policy_from_mapping({"measurements": sgx_code_pin()["mrenclave"], "nonce_required": False})
    refused = _refusal(lambda: _verify_intel("sgx", policy, None))
    assert refused.fields == ("sgx.collateral",) and "collateral required" in refused.violations[0].value
    claims = _verify_intel("sgx", policy, _intel_collateral("sgx"))
    assert claims.tcb_evaluated is True and claims.tcb_status == "UpToDate" and claims.advisory_ids == ()


def _top_level_policy():
    """No [sgx] table: SGX evidence is judged by the top-level allow-list and a table's defaults."""
    return policy_from_mapping({"measurements": sgx_code_pin()["mrenclave"], "nonce_required": False})


@pytest.mark.parametrize("status", [s for s in TCB_STATUSES if s not in ("UpToDate", "Revoked")])
def test_the_top_level_route_refuses_a_tcb_that_is_not_up_to_date(status):
    # The audit's fail-open: with full collateral, the top-level route judged collateral presence
    # and staleness only, so an OutOfDate (or any other) TCB status was accepted.
    refused = _refusal(lambda: _verify_intel("sgx", _top_level_policy(), _intel_collateral("sgx", status=status)))
    (violation,) = refused.violations
    assert violation.field == "sgx.tcb_status" and violation.value == status
    assert "one of [UpToDate]" in violation.expected and "default accepted_tcb_statuses" in violation.expected
    assert "no [sgx] table" in violation.expected


def test_the_top_level_route_refuses_a_revoked_tcb():
    refused = _refusal(lambda: _verify_intel("sgx", _top_level_policy(), _intel_collateral("sgx", status="Revoked")))
    (violation,) = refused.violations
    assert violation.field == "sgx.tcb_status" and violation.value == "Revoked"
    assert "never acceptable" in violation.expected


def test_the_top_level_route_refuses_a_tcb_level_with_an_advisory():
    collateral = _intel_collateral("sgx", advisories=["INTEL-SA-00615", "INTEL-SA-00828"])
    refused = _refusal(lambda: _verify_intel("sgx", _top_level_policy(), collateral))
    (violation,) = refused.violations
    assert violation.field == "sgx.advisory_ids" and violation.value == "INTEL-SA-00615, INTEL-SA-00828"
    assert "default accepted_advisory_ids = []" in violation.expected
    # both at once: every violation is named
    collateral = _intel_collateral("sgx", status="OutOfDate", advisories=["INTEL-SA-00615"])
    refused = _refusal(lambda: _verify_intel("sgx", _top_level_policy(), collateral))
    assert refused.fields == ("sgx.tcb_status", "sgx.advisory_ids")


@pytest.mark.parametrize("revoked", ["leaf", "ca"])
def test_the_top_level_route_refuses_a_revoked_pck_certificate_or_pck_ca(revoked):
    crls = ([PKI.crl(issuer="ca", revoked=[PKI.leaf]), PKI.crl(issuer="root")] if revoked == "leaf"
            else [PKI.crl(issuer="ca"), PKI.crl(issuer="root", revoked=[PKI.ca])])
    with pytest.raises(EvidenceInvalid, match="revoked"):
        _verify_intel("sgx", _top_level_policy(), _intel_collateral("sgx", crls=crls))


@pytest.mark.parametrize("section, pin", [(SgxPolicy, sgx_code_pin()), (TdxPolicy, tdx_code_pin())])
def test_the_top_level_tcb_defaults_are_a_platform_tables_defaults(section, pin):
    from attestation.verify import TOP_LEVEL_ADVISORY_IDS, TOP_LEVEL_TCB_STATUSES  # absent before the fix

    table = section.from_table(pin)
    assert table.accepted_tcb_statuses == TOP_LEVEL_TCB_STATUSES == ("UpToDate",)
    assert table.accepted_advisory_ids == TOP_LEVEL_ADVISORY_IDS == ()


@pytest.mark.parametrize("section, pin", [(SgxPolicy, sgx_code_pin()), (TdxPolicy, tdx_code_pin())])
def test_intel_collateral_keys_are_checked_alike_by_constructor_and_loader(section, pin):
    name = "sgx" if section is SgxPolicy else "tdx"
    assert section.from_table(pin).require_collateral is True
    for bad, key in (({"collateral_grace_seconds": 30 * 86400 + 1}, "collateral_grace_seconds"),
                     ({"collateral_grace_seconds": -1}, "collateral_grace_seconds"),
                     ({"collateral_grace_seconds": 60, "allow_expired_collateral": True}, "allow_expired_collateral")):
        with pytest.raises(PolicyError, match=rf"\[{name}\] {key}"):
            section.from_table(pin | bad)
        with pytest.raises(PolicyError, match=rf"\[{name}\] {key}"):
            policy_from_mapping({name: pin | bad})
    built = section.from_table(pin | {"collateral_grace_seconds": 30 * 86400, "require_collateral": False})
    assert section.from_table(built.to_table()) == built and "allow_expired_collateral" not in built.to_table()


# ---- SEV-SNP: the ARK's CRL from AMD KDS -----------------------------------------------------


@pytest.fixture(scope="module")
def amd() -> FakeAmd:
    return FakeAmd(now=NOW, products=("Milan", "Genoa"))


@pytest.fixture(autouse=True)
def _cold_snp_caches():
    clear_caches()
    yield
    clear_caches()


def _snp_policy(**keys: Any):
    return policy_from_mapping({"snp": {"measurement": [MEASUREMENT.hex()]} | keys})


def _verify_snp(amd: FakeAmd, policy, crls, *, evidence=None, now: datetime = NOW):
    ev = evidence or amd.evidence("Milan", measurement=MEASUREMENT, report_data=RD)
    collateral = None if crls is None else {"crls": list(crls)}
    return verify_evidence("snp", ev.report, policy, expected_report_data=RD, now=now, certs=ev.certs,
                           trust=amd.trust(), collateral=collateral)


def test_snp_with_the_ark_crl_is_accepted_and_the_claims_list_it(amd):
    claims = _verify_snp(amd, _snp_policy(), [amd.crl("Milan")])
    assert claims.tcb_evaluated is True
    (crl,) = claims.collateral
    assert (crl.kind, crl.issuer, crl.issued_at, crl.next_update) == ("crl", "ARK-Milan", NOW - DAY, NOW + 7 * DAY)
    assert crl.age_seconds == DAY.total_seconds()


def test_snp_below_the_policy_tcb_is_refused_when_collateral_is_given(amd):
    refused = _refusal(lambda: _verify_snp(amd, _snp_policy(min_tcb={"snp": 9}), [amd.crl("Milan")]))
    assert refused.fields == ("snp.reported_tcb.snp",)


def test_snp_without_the_ark_crl_is_refused_as_collateral_required(amd):
    for crls in (None, [], [amd.crl("Genoa")]):  # nothing, or another product's ARK
        refused = _refusal(lambda crls=crls: _verify_snp(amd, _snp_policy(), crls))
        (violation,) = refused.violations
        assert violation.field == "snp.collateral" and "collateral required" in violation.value
        assert "ARK-Milan" in violation.value and "/vcek/v1/Milan/crl" in violation.value
        assert "set [snp] require_collateral = false" in violation.expected
    # a CRL from the ASK alone does not cover the ASK itself
    refused = _refusal(lambda: _verify_snp(amd, _snp_policy(), [amd.crl("Milan", issuer="ask")]))
    assert refused.fields == ("snp.collateral",)


def test_snp_an_explicit_waiver_accepts_evidence_whose_revocation_was_not_evaluated(amd):
    claims = _verify_snp(amd, _snp_policy(require_collateral=False), None)
    assert claims.tcb_evaluated is False and claims.collateral == ()
    # ... but the TCB the report carries is still judged
    assert _refusal(lambda: _verify_snp(amd, _snp_policy(require_collateral=False, min_tcb={"snp": 9}),
                                        None)).fields == ("snp.reported_tcb.snp",)


@pytest.mark.parametrize("revoked", ["ask", "vcek"])
def test_snp_a_revoked_ask_or_vcek_is_refused(amd, revoked):
    ev = amd.evidence("Milan", measurement=MEASUREMENT, report_data=RD)
    crls = ([amd.crl("Milan", revoked=[ev.issuer])] if revoked == "ask"
            else [amd.crl("Milan"), amd.crl("Milan", issuer="ask", revoked=[ev.leaf])])
    for policy in (_snp_policy(), _snp_policy(require_collateral=False)):
        with pytest.raises(EvidenceInvalid, match="revoked"):
            _verify_snp(amd, policy, crls, evidence=ev)


def test_snp_a_forged_ark_crl_is_an_error(amd):
    from attestation.testing.snp import fake_rsa_key

    with pytest.raises(EvidenceInvalid, match="not signed"):
        _verify_snp(amd, _snp_policy(), [amd.crl("Milan", signing_key=fake_rsa_key("not the ark"))])


def test_snp_a_stale_crl_is_refused_and_accepted_within_an_explicit_grace(amd):
    crl = amd.crl("Milan", last_update=NOW - 8 * DAY, next_update=NOW - DAY)
    refused = _refusal(lambda: _verify_snp(amd, _snp_policy(), [crl]))
    (violation,) = refused.violations
    assert violation.field == "snp.collateral" and "stale CRL of 'ARK-Milan'" in violation.value
    assert "24.0 h (86400 s)" in violation.value and "[snp] collateral_grace_seconds = 0" in violation.expected
    assert _refusal(lambda: _verify_snp(amd, _snp_policy(collateral_grace_seconds=86399), [crl])).fields == (
        "snp.collateral",)
    claims = _verify_snp(amd, _snp_policy(collateral_grace_seconds=86400), [crl])
    (used,) = claims.collateral
    assert used.next_update == NOW - DAY and used.age_seconds == 8 * DAY.total_seconds()


def test_snp_the_warm_chain_cache_does_not_keep_a_crl_fresh(amd):
    # First verification fills the chain cache while the CRL is fresh; a later one at a time past
    # its nextUpdate must still be refused, and report the age at its own time.
    crl = amd.crl("Milan")  # nextUpdate NOW + 7 days
    assert _verify_snp(amd, _snp_policy(), [crl]).collateral[0].age_seconds == DAY.total_seconds()
    later = NOW + 8 * DAY
    refused = _refusal(lambda: _verify_snp(amd, _snp_policy(), [crl], now=later))
    assert refused.fields == ("snp.collateral",)
    claims = _verify_snp(amd, _snp_policy(collateral_grace_seconds=2 * 86400), [crl], now=later)
    assert claims.collateral[0].age_seconds == 9 * DAY.total_seconds()


def test_snp_collateral_keys_are_checked_alike_by_constructor_and_loader():
    pin = {"measurement": [MEASUREMENT.hex()]}
    assert SnpPolicy.from_table(pin).require_collateral is True
    for bad, key in (({"collateral_grace_seconds": 30 * 86400 + 1}, "collateral_grace_seconds"),
                     ({"collateral_grace_seconds": "1"}, "collateral_grace_seconds"),
                     ({"require_collateral": "no"}, "require_collateral")):
        with pytest.raises(PolicyError, match=rf"\[snp\] {key}"):
            SnpPolicy.from_table(pin | bad)
        with pytest.raises(PolicyError, match=rf"\[snp\] {key}"):
            SnpPolicy(measurement=(MEASUREMENT.hex(),), **bad)
    with pytest.raises(PolicyError, match="allow_expired_collateral"):
        SnpPolicy.from_table(pin | {"allow_expired_collateral": True})  # SEV-SNP only knows the grace
    built = SnpPolicy.from_table(pin | {"require_collateral": False, "collateral_grace_seconds": 600})
    assert SnpPolicy.from_table(built.to_table()) == built

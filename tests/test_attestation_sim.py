"""Simulated evidence through the front door: parse -> verify -> validate, at a pinned clock."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta, UTC

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from attestation import (
    AttestationError,
    EvidenceInvalid,
    EvidenceMalformed,
    Policy,
    PolicyViolation,
    UnsupportedPlatform,
    verify_evidence,
)
from attestation.sim import SimProvider, init_sim_dir
from attestation.testing.sim import FakeSimAuthority

pytestmark = pytest.mark.filterwarnings(
    # Byte-flipped certificates make cryptography warn about non-positive serials before we
    # reject them; the warning is expected noise for hostile input.
    "ignore::cryptography.utils.CryptographyDeprecationWarning"
)

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
MEASUREMENT = hashlib.sha256(b"the worker we trust").digest()
OTHER_MEASUREMENT = hashlib.sha256(b"some other worker").digest()


def report_data_for(nonce: bytes) -> bytes:
    return hashlib.sha512(b"statement:" + nonce).digest()


NONCE_DATA = report_data_for(b"nonce-1")


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    return init_sim_dir(tmp_path_factory.mktemp("sim"), now=T0)


@pytest.fixture
def policy(sim_dir) -> Policy:
    return Policy(
        measurements=(MEASUREMENT.hex(),),
        allow_simulation=True,
        sim_root_sha256=sim_dir.root_sha256,
    )


def provider(sim_dir, *, at=T0, measurement=MEASUREMENT, **kwargs) -> SimProvider:
    return SimProvider(sim_dir, measurement, clock=lambda: at, **kwargs)


def with_(policy: Policy, **changes) -> Policy:
    fields = {
        "measurements": policy.measurements,
        "allow_simulation": policy.allow_simulation,
        "sim_root_sha256": policy.sim_root_sha256,
        "min_security_version": policy.min_security_version,
        "debug_allowed": policy.debug_allowed,
        "max_evidence_age_seconds": policy.max_evidence_age_seconds,
        "nonce_required": policy.nonce_required,
        "max_clock_skew_seconds": policy.max_clock_skew_seconds,
    }
    fields.update(changes)
    return Policy(**fields)


def refusal(evidence: bytes, policy: Policy, *, now=T0, expected=NONCE_DATA) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as info:
        verify_evidence("sim", evidence, policy, expected_report_data=expected, now=now)
    return info.value


# --- acceptance -----------------------------------------------------------------------------


def test_fresh_simulated_evidence_verifies_and_returns_the_claims_it_was_made_with(sim_dir, policy):
    evidence = provider(sim_dir, svn=3).evidence(NONCE_DATA)

    claims = verify_evidence(
        "sim", evidence, policy, expected_report_data=NONCE_DATA, now=T0 + timedelta(seconds=2)
    )

    assert claims.platform == "sim"
    assert claims.simulated is True
    assert claims.measurement == MEASUREMENT
    assert claims.debug is False
    assert claims.security_version == 3
    assert claims.report_data == NONCE_DATA
    assert claims.issued_at == T0
    assert [c.subject for c in claims.chain] == [
        "CN=enclaveq SIMULATION attestation key — no confidentiality,O=enclaveq simulation",
        "CN=enclaveq SIMULATION root — no confidentiality,O=enclaveq simulation",
    ]
    assert claims.chain[-1].sha256.hex() == sim_dir.root_sha256


def test_claims_serialise_to_json_with_lowercase_hex_and_utc_times(sim_dir, policy):
    evidence = provider(sim_dir).evidence(NONCE_DATA)
    claims = verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=T0)

    data = claims.to_json()

    assert data["measurement"] == MEASUREMENT.hex()
    assert data["report_data"] == NONCE_DATA.hex()
    assert data["issued_at"] == "2026-03-01T12:00:00Z"
    assert data["chain"][1]["sha256"] == sim_dir.root_sha256
    assert data["simulated"] is True


def test_every_acceptance_of_simulated_evidence_logs_a_warning(sim_dir, policy, caplog):
    evidence = provider(sim_dir).evidence(NONCE_DATA)

    with caplog.at_level(logging.WARNING, logger="enclaveq.attestation"):
        verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=T0)
        verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=T0)

    warnings = [r for r in caplog.records if r.name == "enclaveq.attestation"]
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert "no confidentiality" in warnings[0].getMessage()
    assert "SIMULATED" in warnings[0].getMessage()


def test_refused_evidence_logs_no_acceptance_warning(sim_dir, policy, caplog):
    evidence = provider(sim_dir, measurement=OTHER_MEASUREMENT).evidence(NONCE_DATA)

    with caplog.at_level(logging.WARNING, logger="enclaveq.attestation"):
        refusal(evidence, policy)

    assert not [r for r in caplog.records if r.name == "enclaveq.attestation"]


# --- policy refusals, each naming field, value and expectation ------------------------------


def test_a_policy_pinning_another_measurement_refuses_and_names_both(sim_dir, policy):
    evidence = provider(sim_dir, measurement=OTHER_MEASUREMENT).evidence(NONCE_DATA)

    error = refusal(evidence, policy)

    assert error.fields == ("measurement",)
    (violation,) = error.violations
    assert violation.value == OTHER_MEASUREMENT.hex()
    assert MEASUREMENT.hex() in violation.expected
    assert f"measurement: got {OTHER_MEASUREMENT.hex()}" in str(error)


def test_simulated_evidence_is_refused_when_the_policy_does_not_allow_simulation(sim_dir, policy):
    evidence = provider(sim_dir).evidence(NONCE_DATA)

    error = refusal(evidence, with_(policy, allow_simulation=False))

    assert error.fields == ("allow_simulation",)
    assert "simulation gives no confidentiality" in error.violations[0].expected


def test_simulated_evidence_is_refused_by_a_policy_without_any_simulation_table(sim_dir):
    evidence = provider(sim_dir).evidence(NONCE_DATA)
    hardware_only = Policy(measurements=(MEASUREMENT.hex(),))

    error = refusal(evidence, hardware_only)

    assert error.fields == ("allow_simulation",)


def test_evidence_under_another_simulation_root_is_refused(sim_dir, policy, tmp_path):
    other_dir = init_sim_dir(tmp_path / "other", now=T0)
    evidence = provider(other_dir).evidence(NONCE_DATA)

    with pytest.raises(EvidenceInvalid, match="policy trusts only") as info:
        verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=T0)
    assert other_dir.root_sha256 in str(info.value)
    assert sim_dir.root_sha256 in str(info.value)


def test_security_version_below_the_minimum_is_refused(sim_dir, policy):
    evidence = provider(sim_dir, svn=2).evidence(NONCE_DATA)

    error = refusal(evidence, with_(policy, min_security_version=3))

    assert error.fields == ("security_version",)
    assert error.violations[0].value == "2"
    assert ">= 3" in error.violations[0].expected


def test_security_version_at_the_minimum_is_accepted(sim_dir, policy):
    evidence = provider(sim_dir, svn=3).evidence(NONCE_DATA)
    strict = with_(policy, min_security_version=3)
    assert verify_evidence("sim", evidence, strict, expected_report_data=NONCE_DATA, now=T0)


def test_debug_evidence_is_refused_unless_the_policy_allows_debug(sim_dir, policy):
    evidence = provider(sim_dir, debug=True).evidence(NONCE_DATA)

    error = refusal(evidence, policy)
    assert error.fields == ("debug",)
    assert error.violations[0].value.startswith("true")

    relaxed = with_(policy, debug_allowed=True)
    claims = verify_evidence("sim", evidence, relaxed, expected_report_data=NONCE_DATA, now=T0)
    assert claims.debug is True


def test_stale_evidence_is_refused(sim_dir, policy):
    evidence = provider(sim_dir, at=T0).evidence(NONCE_DATA)
    later = T0 + timedelta(seconds=policy.max_evidence_age_seconds + 1)

    error = refusal(evidence, policy, now=later)

    assert error.fields == ("issued_at",)
    assert "stale" in error.violations[0].value
    assert "max_evidence_age_seconds = 300" in error.violations[0].expected


def test_evidence_exactly_as_old_as_the_maximum_age_is_accepted(sim_dir, policy):
    evidence = provider(sim_dir, at=T0).evidence(NONCE_DATA)
    edge = T0 + timedelta(seconds=policy.max_evidence_age_seconds)
    assert verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=edge)


def test_evidence_from_the_future_beyond_the_allowed_clock_skew_is_refused(sim_dir, policy):
    future = T0 + timedelta(seconds=policy.max_clock_skew_seconds + 1)
    evidence = provider(sim_dir, at=future).evidence(NONCE_DATA)

    error = refusal(evidence, policy, now=T0)

    assert error.fields == ("issued_at",)
    assert "future" in error.violations[0].value
    assert "max_clock_skew_seconds = 60" in error.violations[0].expected


def test_evidence_slightly_ahead_within_the_clock_skew_is_accepted(sim_dir, policy):
    ahead = T0 + timedelta(seconds=policy.max_clock_skew_seconds)
    evidence = provider(sim_dir, at=ahead).evidence(NONCE_DATA)
    assert verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=T0)


def test_evidence_answering_another_nonce_is_refused_as_a_replay(sim_dir, policy):
    old_answer = provider(sim_dir).evidence(report_data_for(b"nonce-of-yesterday"))

    error = refusal(old_answer, policy, expected=report_data_for(b"nonce-2"))

    assert error.fields == ("report_data",)
    assert error.violations[0].value == report_data_for(b"nonce-of-yesterday").hex()
    assert report_data_for(b"nonce-2").hex() in error.violations[0].expected


def test_a_verifier_that_supplies_no_nonce_is_refused_when_the_policy_requires_one(sim_dir, policy):
    evidence = provider(sim_dir).evidence(NONCE_DATA)

    error = refusal(evidence, policy, expected=None)

    assert error.fields == ("report_data",)
    assert "nonce_required = true" in error.violations[0].expected


def test_without_nonce_requirement_fresh_evidence_is_accepted_on_age_alone(sim_dir, policy):
    evidence = provider(sim_dir).evidence(NONCE_DATA)
    cached_mode = with_(policy, nonce_required=False)
    assert verify_evidence("sim", evidence, cached_mode, expected_report_data=None, now=T0)


def test_all_violations_are_reported_at_once_one_per_line(sim_dir, policy):
    evidence = provider(sim_dir, measurement=OTHER_MEASUREMENT, debug=True, svn=1).evidence(
        report_data_for(b"old nonce")
    )
    strict = with_(policy, allow_simulation=False, min_security_version=5)

    error = refusal(evidence, strict, now=T0 + timedelta(hours=1))

    assert error.fields == (
        "allow_simulation",
        "measurement",
        "security_version",
        "debug",
        "issued_at",
        "report_data",
    )
    lines = str(error).splitlines()
    assert lines[0] == "evidence refused by policy (6 violations):"
    assert len(lines) == 7
    for line, violation in zip(lines[1:], error.violations):
        assert line == f"  - {violation.field}: got {violation.value}; expected {violation.expected}"


# --- authenticity -------------------------------------------------------------------------


def test_flipping_any_single_byte_of_the_evidence_raises_a_typed_attestation_error(sim_dir, policy):
    evidence = provider(sim_dir).evidence(NONCE_DATA)
    outcomes = set()

    for position in range(len(evidence)):
        for mask in (0x01, 0x80, 0xFF):
            mutated = bytearray(evidence)
            mutated[position] ^= mask
            with pytest.raises(AttestationError) as info:
                verify_evidence(
                    "sim", bytes(mutated), policy, expected_report_data=NONCE_DATA, now=T0
                )
            outcomes.add(type(info.value))

    # Authenticity failures, not policy judgements of forged content.
    assert outcomes <= {EvidenceMalformed, EvidenceInvalid}


def test_truncating_the_evidence_at_any_length_is_malformed_or_invalid(sim_dir, policy):
    evidence = provider(sim_dir).evidence(NONCE_DATA)

    for length in range(len(evidence)):
        with pytest.raises((EvidenceMalformed, EvidenceInvalid)):
            verify_evidence(
                "sim", evidence[:length], policy, expected_report_data=NONCE_DATA, now=T0
            )


def test_trailing_bytes_after_the_evidence_are_malformed(sim_dir, policy):
    evidence = provider(sim_dir).evidence(NONCE_DATA)
    with pytest.raises(EvidenceMalformed):
        verify_evidence("sim", evidence + b"\x00", policy, expected_report_data=NONCE_DATA, now=T0)


def test_an_expired_attestation_certificate_fails_and_passes_inside_its_validity():
    authority = FakeSimAuthority(now=T0, leaf_not_after=T0 + timedelta(days=1))
    policy = Policy(
        measurements=(MEASUREMENT.hex(),), allow_simulation=True, sim_root_sha256=authority.root_sha256
    )

    inside = T0 + timedelta(hours=23)
    evidence = authority.evidence(NONCE_DATA, measurement=MEASUREMENT, issued_at=inside)
    assert verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=inside)

    after = T0 + timedelta(days=1, seconds=1)
    evidence = authority.evidence(NONCE_DATA, measurement=MEASUREMENT, issued_at=after)
    with pytest.raises(EvidenceInvalid, match="attestation certificate .* is expired"):
        verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=after)


def test_a_not_yet_valid_attestation_certificate_fails():
    authority = FakeSimAuthority(now=T0, leaf_not_before=T0 + timedelta(hours=1))
    policy = Policy(
        measurements=(MEASUREMENT.hex(),), allow_simulation=True, sim_root_sha256=authority.root_sha256
    )
    evidence = authority.evidence(NONCE_DATA, measurement=MEASUREMENT)
    with pytest.raises(EvidenceInvalid, match="not yet valid"):
        verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=T0)


def test_a_simulation_directory_past_its_validity_no_longer_verifies(tmp_path):
    sim_dir = init_sim_dir(tmp_path / "short", now=T0, days=1)
    policy = Policy(
        measurements=(MEASUREMENT.hex(),), allow_simulation=True, sim_root_sha256=sim_dir.root_sha256
    )
    late = T0 + timedelta(days=2)
    evidence = provider(sim_dir, at=late).evidence(NONCE_DATA)
    with pytest.raises(EvidenceInvalid, match="expired"):
        verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=late)


def test_an_attestation_certificate_from_an_impostor_root_with_the_same_name_is_refused():
    trusted = FakeSimAuthority(now=T0)
    impostor = FakeSimAuthority(now=T0)  # same subject names, different keys
    policy = Policy(
        measurements=(MEASUREMENT.hex(),), allow_simulation=True, sim_root_sha256=trusted.root_sha256
    )
    forged = impostor.evidence(
        NONCE_DATA, measurement=MEASUREMENT, chain=(impostor.leaf, trusted.root)
    )
    with pytest.raises(EvidenceInvalid, match="does not validate"):
        verify_evidence("sim", forged, policy, expected_report_data=NONCE_DATA, now=T0)


def test_evidence_signed_by_a_key_other_than_the_certified_one_is_refused():
    authority = FakeSimAuthority(now=T0)
    policy = Policy(
        measurements=(MEASUREMENT.hex(),), allow_simulation=True, sim_root_sha256=authority.root_sha256
    )
    forged = authority.evidence(
        NONCE_DATA, measurement=MEASUREMENT, signing_key=ec.generate_private_key(ec.SECP256R1())
    )
    with pytest.raises(EvidenceInvalid, match="signature does not verify"):
        verify_evidence("sim", forged, policy, expected_report_data=NONCE_DATA, now=T0)


def test_evidence_signed_directly_by_the_root_is_refused():
    authority = FakeSimAuthority(now=T0)
    policy = Policy(
        measurements=(MEASUREMENT.hex(),), allow_simulation=True, sim_root_sha256=authority.root_sha256
    )
    forged = authority.evidence(
        NONCE_DATA,
        measurement=MEASUREMENT,
        chain=(authority.root, authority.root),
        signing_key=authority.root_key,
    )
    with pytest.raises(EvidenceInvalid):
        verify_evidence("sim", forged, policy, expected_report_data=NONCE_DATA, now=T0)


def test_an_attestation_key_on_another_curve_is_refused():
    authority = FakeSimAuthority(now=T0, leaf_curve=ec.SECP384R1())
    policy = Policy(
        measurements=(MEASUREMENT.hex(),), allow_simulation=True, sim_root_sha256=authority.root_sha256
    )
    evidence = authority.evidence(NONCE_DATA, measurement=MEASUREMENT)
    with pytest.raises(EvidenceInvalid, match="P-256"):
        verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=T0)


# --- the front door's own contract ------------------------------------------------------------


def test_an_unknown_platform_is_refused_with_the_supported_ones_listed(sim_dir, policy):
    evidence = provider(sim_dir).evidence(NONCE_DATA)
    with pytest.raises(UnsupportedPlatform, match="unsupported attestation platform 'quantum'; supported: sim, sgx"):
        verify_evidence("quantum", evidence, policy, expected_report_data=NONCE_DATA, now=T0)


@pytest.mark.parametrize("evidence", [b"", b"\x00" * 64, b"not msgpack at all", "a str", None])
def test_garbage_evidence_is_malformed(policy, evidence):
    with pytest.raises(EvidenceMalformed):
        verify_evidence("sim", evidence, policy, expected_report_data=NONCE_DATA, now=T0)


def test_a_naive_clock_is_a_programming_error(sim_dir, policy):
    evidence = provider(sim_dir).evidence(NONCE_DATA)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_evidence(
            "sim", evidence, policy, expected_report_data=NONCE_DATA, now=datetime(2026, 3, 1, 12)
        )

"""The error tree: what derives from what, and what a refusal message looks like."""

from __future__ import annotations

import pickle

import pytest

from attestation import errors
from attestation.errors import (
    AttestationError,
    EvidenceInvalid,
    EvidenceMalformed,
    PolicyError,
    PolicyViolation,
    SimDirError,
    UnsealError,
    UnsupportedPlatform,
    Violation,
)


@pytest.mark.parametrize(
    "error", [EvidenceMalformed, EvidenceInvalid, PolicyViolation, UnsupportedPlatform, PolicyError, SimDirError]
)
def test_every_attestation_failure_is_an_attestation_error(error):
    assert issubclass(error, AttestationError)


def test_an_unseal_failure_is_not_mistaken_for_an_evidence_judgement():
    assert not issubclass(UnsealError, AttestationError)


def test_the_tree_is_drawn_at_the_top_of_the_module():
    for name in ("AttestationError", "EvidenceMalformed", "EvidenceInvalid", "PolicyViolation",
                 "PolicyError", "SimDirError", "UnsealError", "UnsupportedPlatform"):
        assert name in errors.__doc__.split("Decisions:")[0]


def test_a_violation_reads_as_field_value_expectation():
    violation = Violation("security_version", "1", ">= 2 (policy min_security_version)")
    assert str(violation) == "security_version: got 1; expected >= 2 (policy min_security_version)"
    with pytest.raises(AttributeError):
        violation.value = "2"  # type: ignore[misc]


def test_a_policy_violation_lists_every_violation_one_per_line():
    error = PolicyViolation([Violation("a", "1", "2"), Violation("b", "3", "4")])
    assert str(error).splitlines() == [
        "evidence refused by policy (2 violations):",
        "  - a: got 1; expected 2",
        "  - b: got 3; expected 4",
    ]
    assert error.fields == ("a", "b")
    assert isinstance(error.violations, tuple)


def test_a_refusal_without_a_reason_is_a_bug():
    with pytest.raises(ValueError):
        PolicyViolation([])


def test_structured_errors_survive_pickling():
    violation = PolicyViolation([Violation("debug", "true", "false")])
    assert pickle.loads(pickle.dumps(violation)).violations == violation.violations
    unsupported = pickle.loads(pickle.dumps(UnsupportedPlatform("tpm", ("sim",))))
    assert (unsupported.platform, unsupported.supported) == ("tpm", ("sim",))
    assert str(pickle.loads(pickle.dumps(UnsealError()))) == str(UnsealError())

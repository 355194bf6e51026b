"""Judge verified SEV-SNP evidence against an ``[snp]`` policy table: every violation at once.

Runs only on :class:`~attestation.platforms.Verified` evidence from
:func:`attestation.snp.verify.verify_report`. Each :class:`Violation` names the field
(``snp.<field>``), the value the report has and what the policy expects. The checks:

- ``snp.measurement``, ``snp.host_data``, ``snp.id_key_digest``, ``snp.author_key_digest``:
  the value is listed (when the policy lists any);
- ``snp.policy.debug``, ``snp.policy.migrate_ma``, ``snp.policy.smt``: the guest POLICY bits
  19, 18, 16 are set only if ``debug_allowed``, ``migration_agent_allowed``, ``smt_allowed``;
- ``snp.vmpl``: listed (``vmpl`` defaults to ``[0]``); ``snp.guest_svn``: at least ``min_guest_svn``;
- ``snp.reported_tcb.<component>``: at least ``min_tcb.<component>``, per component
  (``fmc`` exists on Turin only and is not checked on other products);
- ``snp.launch_tcb.<component>``: LAUNCH_TCB at least ``min_launch_tcb.<component>`` (by
  default the ``min_tcb`` minimums: a guest launched on older firmware and hot-updated since is
  not the guest the minimums describe);
- ``snp.signing_key``: in ``allowed_signing_keys``; ``snp.product``: in ``products`` if given;
- ``snp.collateral``: the chain's revocation was not evaluated (no CRL from its ARK) while
  ``require_collateral`` (default true), or a CRL used is past its nextUpdate by more than
  ``collateral_grace_seconds`` (:mod:`attestation.collateral_rules`, judged at ``inputs.now``).
"""

from __future__ import annotations

from typing import Any

from attestation.collateral_rules import collateral_violations, rules_of
from attestation.errors import Violation
from attestation.platforms import VerificationInputs, Verified
from attestation.snp.abi import decode_tcb
from attestation.snp.policy import SnpPolicy
from attestation.snp.verify import SnpEvidence

__all__ = ["violations"]


def _one_of(values: tuple[str, ...]) -> str:
    return f"one of [{', '.join(values)}]"


def violations(verified: Verified, section: SnpPolicy, inputs: VerificationInputs | None = None) -> list[Violation]:
    """Every way ``verified`` fails ``section`` (empty list: accepted). ``inputs.now`` dates the
    collateral freshness judgement (SEV-SNP evidence itself carries no time to age)."""
    if inputs is None:
        raise TypeError("violations() needs the VerificationInputs (for `now`) to judge collateral freshness")
    if not isinstance(section, SnpPolicy):
        raise TypeError(f"section must be an SnpPolicy, not {type(section).__name__}")
    evidence: Any = verified.report
    if verified.platform != "snp" or not isinstance(evidence, SnpEvidence):
        raise TypeError("verified is not SEV-SNP evidence from attestation.snp.verify")
    report = evidence.report
    found: list[Violation] = []

    for key in ("measurement", "host_data", "id_key_digest", "author_key_digest"):
        value: bytes = getattr(report, key)
        if not section.allows(key, value):
            found.append(Violation(f"snp.{key}", value.hex(), _one_of(getattr(section, key))))

    policy = report.policy
    if policy.debug and not section.debug_allowed:
        found.append(Violation("snp.policy.debug", "true (guest POLICY bit 19: the host may decrypt and debug the VM)",
                               "false ([snp] debug_allowed = false)"))
    if policy.migrate_ma and not section.migration_agent_allowed:
        found.append(Violation("snp.policy.migrate_ma",
                               "true (guest POLICY bit 18: a migration agent may be associated with the VM)",
                               "false ([snp] migration_agent_allowed = false)"))
    if policy.smt and not section.smt_allowed:
        found.append(Violation("snp.policy.smt", "true (guest POLICY bit 16: the VM may run with SMT enabled)",
                               "false ([snp] smt_allowed = false)"))

    if report.vmpl not in section.vmpl:
        found.append(Violation("snp.vmpl", str(report.vmpl),
                               f"{_one_of(tuple(map(str, section.vmpl)))} ([snp] vmpl, default [0])"))
    if report.guest_svn < section.min_guest_svn:
        found.append(Violation("snp.guest_svn", str(report.guest_svn), f">= {section.min_guest_svn} ([snp] min_guest_svn)"))

    tcb = evidence.reported_tcb.as_dict()
    for component, minimum in section.min_tcb.items():
        if component not in tcb:  # fmc on a product without an FMC
            continue
        if tcb[component] < minimum:
            found.append(Violation(f"snp.reported_tcb.{component}", str(tcb[component]),
                                   f">= {minimum} ([snp] min_tcb.{component})"))

    launch = decode_tcb(report.launch_tcb, evidence.product).as_dict()
    for component, minimum in (section.min_launch_tcb or {}).items():
        if section.min_tcb.get(component) == minimum and tcb.get(component, minimum) < minimum:
            continue  # the same minimum is already reported as failed by REPORTED_TCB
        if component in launch and launch[component] < minimum:
            found.append(Violation(f"snp.launch_tcb.{component}", str(launch[component]),
                                   f">= {minimum} ([snp] min_launch_tcb.{component}, default min_tcb)"))

    if evidence.signing_key not in section.allowed_signing_keys:
        found.append(Violation("snp.signing_key", evidence.signing_key, _one_of(section.allowed_signing_keys)))
    if section.products and evidence.product not in section.products:
        found.append(Violation("snp.product", evidence.product, _one_of(section.products)))
    found.extend(collateral_violations("snp", verified, rules_of(section), inputs.now))
    return found

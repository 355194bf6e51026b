"""`enclaveq evidence verify`: check a piece of TEE evidence offline, as a human or a script would.

Reads the evidence file (raw bytes, base64 or hex, detected) and extra certificates through
:mod:`attestation.evidence_files`, and SGX, TDX and SEV-SNP collateral as every verifying
command does (--collateral DIR, else the default cache:
:func:`enclaveq.cli.collateral.collateral_source_for`), runs the same front door the producer
uses, and prints the result as text or as one JSON object. Exit codes: 0 verified (and the
policy, if given, holds), 1 invalid, expired or violating, 2 usage error.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from attestation.claims import Claims
from attestation.errors import AttestationError, EvidenceInvalid, EvidenceMalformed, PolicyError, PolicyViolation
from attestation.evidence_files import decode_evidence, load_certificates as _load_certificate_files, load_collateral
from attestation.policy import Policy, load_policy
from attestation.registry import ALL_PLATFORMS

from .collateral import CACHE_DIRS_HELP, collateral_source_for

__all__ = ["evidence_group", "decode_evidence", "load_certificates", "load_collateral", "run_verify"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def load_certificates(paths: tuple[Path, ...]) -> tuple[x509.Certificate, ...]:
    """:func:`attestation.evidence_files.load_certificates`, a bad file being a usage error (--cert)."""
    try:
        return _load_certificate_files(paths)
    except EvidenceMalformed as exc:
        raise click.BadParameter(str(exc), param_hint="--cert") from None


def _error(code: str, field: str | None, message: str) -> dict[str, Any]:
    return {"code": code, "field": field, "message": message}


def run_verify(evidence: bytes, platform: str, *, certs: tuple[x509.Certificate, ...], collateral: dict[str, Any],
               policy: Policy | None, report_data: bytes | None,
               now: datetime) -> tuple[Claims | None, list[dict[str, Any]]]:
    """Verify and (if a policy is given) validate; return the claims and every error found."""
    from attestation.platforms import VerificationInputs
    from attestation.verify import claims_of, verify_evidence, verify_hardware

    try:
        if policy is not None:
            if report_data is None and policy.nonce_required:
                # Offline there is no nonce of ours to check: say so instead of failing every policy.
                policy = dataclasses.replace(policy, nonce_required=False)
            return verify_evidence(platform, evidence, policy, expected_report_data=report_data, now=now,
                                   certs=certs, collateral=collateral), []
        if platform == "sim":
            raise click.UsageError("simulated evidence needs --policy (it pins the simulation root)")
        claims = claims_of(verify_hardware(platform, evidence,
                                           VerificationInputs(now=now, extra_certs=certs, collateral=collateral)))
        if report_data is not None and claims.report_data != report_data:
            return claims, [_error("report_data", "report_data",
                                   f"{claims.report_data.hex()}; expected {report_data.hex()}")]
        return claims, []
    except PolicyViolation as exc:
        return None, [_error("policy", v.field, f"{v.value}; expected {v.expected}") for v in exc.violations]
    except EvidenceMalformed as exc:
        return None, [_error("malformed", None, str(exc))]
    except EvidenceInvalid as exc:
        return None, [_error("invalid", None, str(exc))]
    except AttestationError as exc:
        return None, [_error("error", None, str(exc))]


@click.group("evidence")
def evidence_group() -> None:
    """Verify TEE attestation evidence offline (SGX, TDX, SEV-SNP, Nitro, simulation)."""


@evidence_group.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--platform", required=True, type=click.Choice(ALL_PLATFORMS),
              help="Evidence format: sgx (DCAP quote v3), tdx (quote v4/v5), snp (attestation report), "
                   "nitro (attestation document), sim (enclaveq simulation).")
@click.option("--cert", "cert_paths", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Extra certificate (DER or PEM, several per PEM file): the SNP VCEK/VLEK, ASK/ARK, or chain "
                   "certificates. Repeat as needed.")
@click.option("--collateral", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of collateral: Intel TCB Info / QE Identity JSON and CRLs, or CRLs for SNP, as "
                   "`enclaveq collateral fetch` writes it or flat. Nothing is fetched from the network. Default: "
                   f"the collateral cache ({CACHE_DIRS_HELP}) if it exists, else none.")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also judge the evidence against this policy (TOML).")
@click.option("--report-data", metavar="HEX", help="Check that the evidence binds exactly these report data bytes.")
@click.option("--at", "at", metavar="ISO8601", help="Verification time (default: now). Certificates are checked at it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def verify_command(file: Path, platform: str, cert_paths: tuple[Path, ...], collateral: Path | None,
                   policy_path: Path | None, report_data: str | None, at: str | None, as_json: bool) -> None:
    """Verify one piece of evidence: signatures, certificate chain to the pinned vendor root,
    revocation and TCB when there is collateral (--collateral, else the default cache), then the
    policy if one is given.

    FILE may hold raw bytes, base64 or hex text; the format is detected. Exit 0 when the
    evidence verifies (and the policy holds), 1 when it is invalid, expired or violates the
    policy, 2 on a usage error. Bytes after the signed structure are reported as
    trailing_bytes: no signature covers them.

    \b
    Example:
      enclaveq evidence verify report.bin --platform snp --cert vcek.der --cert ask_ark.pem --json
    """
    try:
        now = datetime.fromisoformat(at.replace("Z", "+00:00")) if at else datetime.now(UTC)
    except ValueError:
        raise click.BadParameter(f"{at!r} is not an ISO 8601 time", param_hint="--at") from None
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    try:
        expected = bytes.fromhex(report_data) if report_data else None
    except ValueError:
        raise click.BadParameter("must be hex", param_hint="--report-data") from None
    try:
        policy = load_policy(policy_path) if policy_path else None
    except PolicyError as exc:
        raise click.BadParameter(str(exc), param_hint="--policy") from None
    evidence, encoding = decode_evidence(file.read_bytes())
    certs = load_certificates(tuple(cert_paths))
    errors: list[dict[str, Any]] = []
    try:
        coll, certs = _collateral(platform, collateral, now, certs)
    except AttestationError as exc:
        coll, errors = {}, [_error("collateral", None, str(exc))]
    claims, found = run_verify(evidence, platform, certs=certs, collateral=coll, policy=policy,
                               report_data=expected, now=now) if not errors else (None, [])
    errors.extend(found)
    verified = claims is not None and not errors
    doc = {
        "verified": verified,
        "platform": platform,
        "encoding": encoding,
        "measurement": claims.measurement.hex() if claims else None,
        "report_data": claims.report_data.hex() if claims else None,
        "debug": claims.debug if claims else None,
        "claims": claims.to_json().get("claims", {}) if claims else {},
        "trailing_bytes": claims.trailing_bytes if claims else None,
        "chain": [{"subject": c.subject, "not_before": c.to_json()["not_before"], "not_after": c.to_json()["not_after"]}
                  for c in (claims.chain if claims else ())],
        "errors": errors,
        "verified_at": now.isoformat().replace("+00:00", "Z"),
    }
    if claims is not None and claims.tcb_status is not None:
        doc["tcb_status"] = claims.tcb_status
        doc["advisory_ids"] = list(claims.advisory_ids)
    if claims is not None and claims.platform != "sim":
        doc["tcb_evaluated"] = claims.tcb_evaluated
        doc["collateral"] = [use.to_json() for use in claims.collateral]
    if policy is not None and expected is None:
        doc["notes"] = ["report data binding not checked: pass --report-data to check it"]
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        _print_text(doc)
    sys.exit(EXIT_OK if verified else EXIT_REFUSED)


def _collateral(platform: str, directory: Path | None, now: datetime, certs: tuple[x509.Certificate, ...]
                ) -> tuple[dict[str, Any], tuple[x509.Certificate, ...]]:
    """The collateral to verify with, and ``certs`` with any the collateral directory caches after
    them. SGX, TDX and SEV-SNP: from --collateral DIR, else the default cache, read as every other
    command reads it (the layout `collateral fetch` writes, or a flat directory). Other platforms
    (Nitro: CRLs) read only an explicit --collateral DIR, flat, as before."""
    from attestation.collateral_source import FAMILY

    if platform not in FAMILY:
        return load_collateral(platform, directory, now), certs
    source = collateral_source_for(directory)
    if source is None:
        return {}, certs
    options = source.verify_options(platform, now)
    return dict(options["collateral"]), (*certs, *options.get("certs", ()))


def _print_text(doc: dict[str, Any]) -> None:
    status = "VERIFIED" if doc["verified"] else "NOT VERIFIED"
    click.echo(f"{status}: {doc['platform']} evidence ({doc['encoding']}) at {doc['verified_at']}")
    if doc["measurement"]:
        click.echo(f"  measurement     {doc['measurement']}")
        click.echo(f"  report_data     {doc['report_data']}")
        click.echo(f"  debug           {doc['debug']}")
        if doc.get("tcb_status"):
            click.echo(f"  tcb_status      {doc['tcb_status']} {' '.join(doc['advisory_ids'])}")
        if "tcb_evaluated" in doc:
            click.echo(f"  tcb_evaluated   {doc['tcb_evaluated']}")
        for use in doc.get("collateral", []):
            click.echo(f"  collateral      {use['kind']} by {use['issuer']}, next update {use['next_update']}, "
                       f"{use['age_seconds'] / 3600:.1f} h old")
        if doc["trailing_bytes"]:
            click.echo(f"  trailing_bytes  {doc['trailing_bytes']} (outside every signature)")
        for cert in doc["chain"]:
            click.echo(f"  cert            {cert['subject']} [{cert['not_before']} .. {cert['not_after']}]")
    for err in doc["errors"]:
        where = f" {err['field']}:" if err["field"] else ""
        click.echo(f"  error ({err['code']}){where} {err['message']}", err=not doc["verified"])
    for note in doc.get("notes", []):
        click.echo(f"  note: {note}")

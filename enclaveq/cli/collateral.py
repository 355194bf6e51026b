"""`enclaveq collateral fetch|show`, and the `--collateral DIR` option every verifying command shares.

Collateral (Intel TCB Info, QE Identity and CRLs; AMD KDS CRLs and certificates) is what the
TCB of SGX, TDX and SEV-SNP evidence is judged with (docs/collateral.md). `collateral fetch`
downloads it from Intel PCS / AMD KDS (or a mirror: --pcs-url, --kds-url), verifies every
document and writes it into a cache directory (default :func:`default_cache_dir`);
`collateral show` lists what a cache holds and when each document goes stale. Commands that
verify evidence (attest, run, submit, model upload|list|delete, pool rotate|status, pipeline
create|list|delete, publish, subscribe, worker, evidence verify) read the directory given with
--collateral, else the default cache directory (:func:`default_cache_dir`) if it exists, else none.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from datetime import datetime, UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .exits import InputError

if TYPE_CHECKING:
    from attestation.claims import CollateralUse
    from attestation.collateral_source import CollateralDir

__all__ = ["collateral_group", "collateral_option", "collateral_source_for", "describe_collateral_use",
           "COLLATERAL_HELP"]

F = TypeVar("F", bound=Callable[..., Any])

CACHE_DIRS_HELP = ("$ENCLAVEQ_COLLATERAL_DIR, else $XDG_CACHE_HOME/enclaveq/collateral, else "
                   "~/.cache/enclaveq/collateral")
COLLATERAL_HELP = ("Directory of attestation collateral (Intel TCB Info / QE Identity / CRLs, AMD CRLs) to judge "
                   "the TEE's TCB with, e.g. filled by `enclaveq collateral fetch`. Default: the collateral cache "
                   f"({CACHE_DIRS_HELP}) if it exists, else none.")
PRODUCTS = ("Milan", "Genoa", "Turin")
_FMSPC = re.compile(r"[0-9a-fA-F]{12}")


def describe_collateral_use(use: CollateralUse) -> str:
    """One line for a collateral document a verification used: what, by whom, until when, how old."""
    return f"{use.kind} by {use.issuer}, next update {_when(use.next_update)}, {use.age_seconds / 3600:.1f} h old"


def collateral_option(fn: F) -> F:
    """``--collateral DIR`` (one definition for every command that verifies evidence)."""
    return click.option("--collateral", "collateral_dir", default=None, metavar="DIR",
                        type=click.Path(exists=True, file_okay=False, path_type=Path), help=COLLATERAL_HELP)(fn)


def collateral_source_for(explicit: Path | None) -> CollateralDir | None:
    """The collateral a command uses: ``explicit`` (--collateral), else the default cache
    directory if it exists, else None."""
    from attestation.collateral_source import CollateralDir, default_cache_dir

    if explicit is not None:
        return CollateralDir(explicit)
    cache = default_cache_dir()
    return CollateralDir(cache) if cache.is_dir() else None


@click.group("collateral")
def collateral_group() -> None:
    """Fetch and inspect attestation collateral (Intel PCS, AMD KDS) for TCB evaluation.

    \b
    Examples:
      enclaveq collateral fetch --platform tdx --evidence quote.bin
      enclaveq collateral fetch --platform snp --product Genoa --out ./collateral
      enclaveq collateral show
    """


def _read_evidence(path: Path) -> bytes:
    from attestation.evidence_files import decode_evidence

    try:
        return decode_evidence(path.read_bytes())[0]
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or type(exc).__name__}") from None


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


def _collateral_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--pcs-url / --kds-url: https://, or http:// to the loopback only (as the fetcher allows), else a
    usage error (exit 2) before anything is requested."""
    from attestation.collateral_fetch import CollateralFetchError, check_url

    if value is not None:
        try:
            check_url(value)
        except CollateralFetchError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


@collateral_group.command("fetch")
@click.option("--platform", required=True, type=click.Choice(["sgx", "tdx", "snp"]),
              help="Whose collateral: Intel SGX or TDX (PCS), or AMD SEV-SNP (KDS).")
@click.option("--fmspc", metavar="HEX", help="SGX/TDX: the platform's FMSPC (12 hex digits), from its PCK certificate.")
@click.option("--evidence", "evidence_path", metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Evidence to fetch for (raw, hex or base64): an SGX/TDX quote gives the FMSPC; an SEV-SNP "
                   "report (v3+) the product line, and its chip ID and TCB the VCEK to fetch.")
@click.option("--product", type=click.Choice(PRODUCTS), help="SEV-SNP product line (else from --evidence).")
@click.option("--out", "out", metavar="DIR", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Collateral directory to write (default: the collateral cache, {CACHE_DIRS_HELP}). Existing "
                   "documents of the same name are replaced.")
@click.option("--pcs-url", metavar="URL", default=None, callback=_collateral_url,
              help="Intel PCS base URL, or a PCCS / mirror speaking PCS v4 (default "
                   "https://api.trustedservices.intel.com). https://, or http:// to localhost only.")
@click.option("--kds-url", metavar="URL", default=None, callback=_collateral_url,
              help="AMD KDS base URL or a mirror (default https://kdsintf.amd.com). https://, or http:// to "
                   "localhost only.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=15.0, show_default=True,
              help="Seconds to wait for each response.")
def fetch_command(platform: str, fmspc: str | None, evidence_path: Path | None, product: str | None,
                  out: Path | None, pcs_url: str | None, kds_url: str | None, timeout: float) -> None:
    """Download collateral, verify every document, and write it into a collateral directory.

    SGX/TDX (Intel PCS): TCB Info for the FMSPC and the QE (TD_QE) Identity, each with its
    issuer chain, the PCK Platform and Processor CA CRLs and the Intel SGX Root CA CRL.
    SEV-SNP (AMD KDS): the product's VCEK and VLEK cert chains and CRLs, and with --evidence
    the VCEK of the report's chip at its reported TCB. Nothing is written unless everything
    fetched verifies against the pinned vendor roots. Verifiers reuse what is written until
    its nextUpdate; on an offline machine, copy the directory over (docs/collateral.md).

    Exit 0 when written; 1 when a download fails or a document does not verify; 2 on a usage
    error.

    \b
    Examples:
      enclaveq collateral fetch --platform sgx --fmspc 00906ED50000
      enclaveq collateral fetch --platform tdx --evidence quote.bin --out ./collateral
      enclaveq collateral fetch --platform snp --evidence report.bin
      enclaveq collateral fetch --platform snp --product Milan --kds-url https://kds-mirror.example
    """
    from attestation.collateral_fetch import (fetch_intel, fetch_snp, fmspc_of_quote, loopback_or_https_get,
                                              snp_target_of_report)
    from attestation.collateral_source import default_cache_dir
    from attestation.errors import EvidenceMalformed
    from attestation.intel.fetch import PCS_BASE_URL
    from attestation.snp.kds import KDS_BASE_URL

    now = datetime.now(UTC)
    out = out if out is not None else default_cache_dir()
    http_get = loopback_or_https_get(timeout=timeout)
    evidence = _read_evidence(evidence_path) if evidence_path is not None else None
    if platform in ("sgx", "tdx"):
        if product is not None:
            raise click.UsageError("--product is for --platform snp")
        wanted: bytes | None = None
        if fmspc is not None:
            if not _FMSPC.fullmatch(fmspc):
                raise click.BadParameter("must be 12 hex digits (6 bytes)", param_hint="--fmspc")
            wanted = bytes.fromhex(fmspc)
        if evidence is not None:
            try:
                found = fmspc_of_quote(platform, evidence)
            except EvidenceMalformed as exc:
                raise InputError(f"{evidence_path}: not a {platform.upper()} quote with a PCK certificate: {exc}") \
                    from None
            if wanted is not None and wanted != found:
                raise click.UsageError(f"--fmspc {fmspc} differs from the quote's FMSPC {found.hex()}")
            wanted = found
        if wanted is None:
            raise click.UsageError("--platform sgx/tdx needs --fmspc HEX or --evidence QUOTE")
        written = fetch_intel(out, kind=platform, fmspc=wanted, now=now, http_get=http_get,
                              pcs_url=pcs_url or PCS_BASE_URL)
    else:
        if fmspc is not None:
            raise click.UsageError("--fmspc is for --platform sgx or tdx")
        vcek_for = None
        if evidence is not None:
            try:
                target = snp_target_of_report(evidence)
            except EvidenceMalformed as exc:
                raise InputError(f"{evidence_path}: not an SEV-SNP report: {exc}") from None
            if product is not None and target.product is not None and product != target.product:
                raise click.UsageError(f"--product {product} differs from the report's product {target.product}")
            product = product or target.product
            if target.signing_key == "vcek" and any(target.chip_id) and target.tcb is not None:
                vcek_for = (target.chip_id, target.tcb)
            else:
                click.echo("note: the report is not VCEK-signed or masks its chip ID: no VCEK to fetch", err=True)
        if product is None:
            raise click.UsageError("--platform snp needs --product (or --evidence with a version 3+ report)")
        written = fetch_snp(out, product=product, now=now, http_get=http_get, kds_url=kds_url or KDS_BASE_URL,
                            vcek_for=vcek_for)
    for doc in written:
        click.echo(f"{doc.kind:<12} {doc.path}\n             issuer {doc.issuer}\n"
                   f"             nextUpdate {_when(doc.next_update)}")
    click.echo(f"fetched {len(written)} document(s) into {out}", err=True)


@collateral_group.command("show")
@click.option("--dir", "directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Collateral directory (default: the collateral cache).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show_command(directory: Path | None, as_json: bool) -> None:
    """List the documents a collateral directory holds and when each goes stale.

    Stale documents (past their nextUpdate; certificates: past their validity) are marked
    STALE: fetch again. Documents are listed, not verified: verification happens when a
    command uses them.

    \b
    Examples:
      enclaveq collateral show
      enclaveq collateral show --dir ./collateral --json
    """
    from attestation.collateral_source import default_cache_dir, describe_directory

    directory = directory if directory is not None else default_cache_dir()
    now = datetime.now(UTC)
    docs = describe_directory(directory)
    if as_json:
        click.echo(json.dumps({"directory": str(directory), "documents": [
            {"path": str(d.path), "kind": d.kind, "detail": d.detail, "next_update": _when(d.next_update)
             if d.next_update else None, "stale": d.stale(now)} for d in docs]}, indent=2))
        return
    if not docs:
        click.echo(f"no collateral in {directory} (fill it with `enclaveq collateral fetch`)", err=True)
        return
    click.echo(f"collateral in {directory}:")
    for d in docs:
        mark = "  STALE" if d.stale(now) else ""
        click.echo(f"  {d.kind:<12} {_relative(d.path, directory)}  {d.detail}\n"
                   f"               nextUpdate {_when(d.next_update)}{mark}")


def _relative(path: Path, directory: Path) -> str:
    try:
        return str(path.relative_to(directory))
    except ValueError:
        return str(path)


def with_collateral_option(fn: Callable[..., None]) -> Callable[..., None]:
    """:func:`collateral_option`, its value kept in the context for :func:`collateral_of_command`."""
    @collateral_option
    @functools.wraps(fn)
    def wrapper(*args: Any, collateral_dir: Path | None = None, **kwargs: Any) -> None:
        click.get_current_context().meta["enclaveq.collateral"] = collateral_dir
        fn(*args, **kwargs)
    return wrapper


def collateral_of_command() -> CollateralDir | None:
    """The collateral of the running command: its --collateral, else the default cache if it exists."""
    ctx = click.get_current_context(silent=True)
    explicit = ctx.meta.get("enclaveq.collateral") if ctx is not None else None
    return collateral_source_for(explicit)

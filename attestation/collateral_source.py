"""A directory of attestation collateral that verifiers reuse until it goes stale.

Collateral is what a verifier needs besides the evidence to judge a TEE's TCB and revocation:
Intel's TCB Info and QE Identity (with their issuer chains) and CRLs for SGX and TDX, AMD's KDS
CRLs (and, optionally, cached VCEKs and cert chains) for SEV-SNP. ``enclaveq collateral fetch``
(:mod:`attestation.collateral_fetch`) fills a directory; :class:`CollateralDir` reads it for
whoever verifies: ``enclaveq attest|run|submit|model upload|pool rotate --collateral DIR``, the
SDK's ``AsyncClient(collateral=DIR)`` and a worker's ``--collateral DIR`` (join verification).

Layout (one subdirectory per platform family; docs/collateral.md)::

    DIR/intel/                        SGX and TDX (one directory: the loader keeps several documents
      tcb_info-sgx-<fmspc>.json         and picks the one whose FMSPC and kind fit the quote)
      tcb_info-tdx-<fmspc>.json       each with its issuer chain embedded ("TCB-Info-Issuer-Chain")
      qe_identity-sgx.json            QE identity ("SGX-Enclave-Identity-Issuer-Chain" embedded)
      qe_identity-tdx.json            TD_QE identity
      pck_crl-platform.der            PCK Platform CA CRL
      pck_crl-processor.der           PCK Processor CA CRL
      root_ca_crl.der                 Intel SGX Root CA CRL
    DIR/snp/<Milan|Genoa|Turin>/      SEV-SNP, per product line
      crl-vcek.der, crl-vlek.der      the ARK's CRLs (KDS /vcek|vlek/v1/<product>/crl)
      cert_chain-vcek.pem, -vlek.pem  ASK+ARK, ASVK+ARK (KDS cert_chain)
      vcek-<hwid>-<tcb>.der           VCEKs fetched for a chip at a TCB (optional)

Each platform reads its family's subdirectory; if that subdirectory does not exist, it reads
``DIR`` itself (a flat directory of files, as ``enclaveq evidence verify --collateral`` takes),
so a user's own directory works too. A missing or empty directory is no collateral (``{}``).

Reuse: what a platform loaded is kept in memory and handed out again until the earliest
``nextUpdate`` among the documents and CRLs it loaded, or until a file in the directory changes
(the cache key holds every file's name, size and modification time), whichever comes first;
then it is read (and verified) again. So a long-running producer or worker picks up collateral
that ``enclaveq collateral fetch`` refreshed, without a restart.

Every document is verified when loaded (Intel: signatures and issuer chains to the pinned root,
as :func:`attestation.intel.collateral.load_collateral` does); a file that cannot be read or
parsed is an :class:`~attestation.errors.EvidenceMalformed` naming it. Nothing here touches the
network.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from .errors import AttestationError, EvidenceInvalid, EvidenceMalformed
from .trust import TrustAnchors

__all__ = ["CACHE_ENV", "FAMILY", "CollateralDir", "CachedDocument", "default_cache_dir", "describe_directory",
           "load_snp_directory", "with_collateral"]

CACHE_ENV = "ENCLAVEQ_COLLATERAL_DIR"
# Platform -> the subdirectory of a collateral directory its documents live in.
FAMILY: dict[str, str] = {"sgx": "intel", "tdx": "intel", "snp": "snp"}
MAX_FILE = 16 * 1024 * 1024
_CERT_SUFFIXES = {".pem", ".der", ".cer", ".crt"}
_KNOWN_SUFFIXES = {".crl", *_CERT_SUFFIXES}


def default_cache_dir() -> Path:
    """``$ENCLAVEQ_COLLATERAL_DIR``, else ``$XDG_CACHE_HOME/enclaveq/collateral``, else
    ``~/.cache/enclaveq/collateral``. Where ``enclaveq collateral fetch`` writes by default and
    what every command reads when no ``--collateral`` is given (if it exists)."""
    explicit = os.environ.get(CACHE_ENV, "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "enclaveq" / "collateral"


def _default_trust() -> TrustAnchors:
    # Looked up at each load, not bound at import: the pinned vendor roots.
    from . import trust

    return trust.DEFAULT_TRUST


def _platform_dirs(root: Path, platform: str) -> list[Path]:
    """The directories ``platform`` reads: its family's subdirectory (SNP: and each product's
    directory in it), or ``root`` itself when there is no such subdirectory."""
    family = FAMILY.get(platform)
    if family is None:
        return []
    sub = root / family
    if sub.is_dir() and not sub.is_symlink():
        if platform == "snp":
            products = sorted(p for p in sub.iterdir() if p.is_dir() and not p.is_symlink()
                              and not p.name.startswith("."))
            return [sub, *products]
        return [sub]
    return [root] if root.is_dir() else []


def _listing(dirs: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """Name, size and mtime of every regular file in ``dirs``: the cache key."""
    entries: list[tuple[str, int, int]] = []
    for directory in dirs:
        try:
            children = sorted(directory.iterdir())
        except OSError:
            continue
        for path in children:
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file():
                entries.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(entries)


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE:
            raise EvidenceMalformed(f"collateral file {path} is larger than {MAX_FILE} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise EvidenceMalformed(f"collateral file {path} cannot be read ({exc.strerror or type(exc).__name__})") \
            from None


def _crls_in(data: bytes) -> list[x509.CertificateRevocationList] | None:
    """The CRL(s) in a file (DER, PEM, base64 or hex text), or None if it holds none."""
    from .intel.collateral import load_crl

    if data.count(b"-----BEGIN X509 CRL-----") > 1:
        try:
            return [load_crl(block) for block in
                    re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", data, re.S)]
        except EvidenceMalformed:
            return None
    try:
        return [load_crl(data)]
    except EvidenceMalformed:
        return None


def _certs_in(data: bytes) -> list[x509.Certificate] | None:
    from .snp.kds import load_certificates

    try:
        return list(load_certificates(data))
    except EvidenceMalformed:
        return None


@dataclass(frozen=True)
class SnpFiles:
    """What a directory of SEV-SNP collateral holds."""

    crls: tuple[x509.CertificateRevocationList, ...]
    certs: tuple[x509.Certificate, ...]


def load_snp_directory(dirs: list[Path], *, strict: bool) -> SnpFiles:
    """CRLs and certificates (VCEKs, ASK/ASVK/ARK chains) from the files of ``dirs``, recognised
    by content. ``strict`` (the ``snp/`` layout): a file with a CRL or certificate suffix that is
    neither is :class:`EvidenceMalformed` naming it; otherwise (a flat directory that may hold
    other platforms' files) it is skipped."""
    crls: list[x509.CertificateRevocationList] = []
    certs: list[x509.Certificate] = []
    for directory in dirs:
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in _KNOWN_SUFFIXES:
                continue
            data = _read(path)
            found_crls = _crls_in(data)
            if found_crls:
                crls.extend(found_crls)
                continue
            found_certs = _certs_in(data) if path.suffix.lower() in _CERT_SUFFIXES else None
            if found_certs:
                certs.extend(found_certs)
                continue
            if strict or path.suffix.lower() == ".crl":
                raise EvidenceMalformed(f"collateral file {path}: neither a CRL nor a certificate")
    return SnpFiles(tuple(crls), tuple(certs))


@dataclass(frozen=True)
class _Loaded:
    key: tuple[Any, ...]
    collateral: Mapping[str, Any]
    certs: tuple[x509.Certificate, ...]
    valid_until: datetime | None      # earliest nextUpdate loaded (None: nothing that expires)
    loaded_at: datetime


def _earliest(*dates: datetime | None) -> datetime | None:
    present = [d for d in dates if d is not None]
    return min(present) if present else None


class CollateralDir:
    """A collateral directory, read lazily per platform and reused until stale (module docstring).

    ``trust`` pins the roots collateral is verified against (default: the vendors'; tests pass
    fakes). Thread-safe: a producer's event loop and a worker's threads may share one.
    """

    def __init__(self, path: str | os.PathLike[str], *, trust: TrustAnchors | None = None) -> None:
        self.path = Path(path).expanduser()
        self.trust = trust
        self._cache: dict[str, _Loaded] = {}
        self._lock = threading.Lock()
        self.loads = 0          # how many times a platform's files were read and verified (tests, metrics)

    def __repr__(self) -> str:
        return f"CollateralDir({str(self.path)!r})"

    def _trust(self) -> TrustAnchors:
        return self.trust if self.trust is not None else _default_trust()

    def for_platform(self, platform: str, now: datetime) -> Mapping[str, Any]:
        """The ``collateral`` mapping :func:`attestation.verify.verify_evidence` takes for
        ``platform`` at ``now``: ``{"intel": IntelCollateral, "crls": (...)}`` for SGX and TDX,
        ``{"crls": (...)}`` for SEV-SNP, ``{}`` when the directory holds nothing for it."""
        return self._loaded(platform, now).collateral

    def certificates(self, platform: str, now: datetime) -> tuple[x509.Certificate, ...]:
        """Cached certificates for ``platform`` (SEV-SNP: VCEKs and KDS cert chains), to pass as
        ``certs``: the verifier uses them only when the evidence's own do not complete the chain."""
        return self._loaded(platform, now).certs

    def verify_options(self, platform: str, now: datetime) -> dict[str, Any]:
        """Keyword arguments for ``verify_evidence``: ``collateral`` and (when any) ``certs``."""
        loaded = self._loaded(platform, now)
        options: dict[str, Any] = {"collateral": loaded.collateral}
        if loaded.certs:
            options["certs"] = loaded.certs
        return options

    def _loaded(self, platform: str, now: datetime) -> _Loaded:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        dirs = _platform_dirs(self.path, platform)
        key = (platform, tuple(map(str, dirs)), _listing(dirs))
        with self._lock:
            hit = self._cache.get(platform)
            if hit is not None and hit.key == key and hit.loaded_at <= now and (
                    hit.valid_until is None or now < hit.valid_until):
                return hit
        loaded = self._load(platform, dirs, key, now)
        with self._lock:
            self._cache[platform] = loaded
            self.loads += 1
        return loaded

    def _load(self, platform: str, dirs: list[Path], key: tuple[Any, ...], now: datetime) -> _Loaded:
        if not dirs or not key[2]:
            return _Loaded(key, {}, (), None, now)
        if platform in ("sgx", "tdx"):
            return self._load_intel(dirs[0], key, now)
        strict = dirs[0] != self.path
        try:
            files = load_snp_directory(dirs, strict=strict)
        except OSError as exc:
            raise EvidenceMalformed(f"collateral directory {dirs[0]} cannot be read "
                                    f"({exc.strerror or type(exc).__name__})") from None
        until = _earliest(*(c.next_update_utc for c in files.crls))
        collateral: dict[str, Any] = {"crls": files.crls} if files.crls else {}
        return _Loaded(key, collateral, files.certs, until, now)

    def _load_intel(self, directory: Path, key: tuple[Any, ...], now: datetime) -> _Loaded:
        from .intel.collateral import load_collateral as load_intel

        try:
            intel = load_intel(directory, now=now, trust=self._trust())
        except OSError as exc:
            raise EvidenceMalformed(f"collateral directory {directory} cannot be read "
                                    f"({exc.strerror or type(exc).__name__})") from None
        except (EvidenceMalformed, EvidenceInvalid) as exc:
            # The Intel loader names the file; say in which directory.
            raise type(exc)(f"collateral in {directory}: {exc}") from None
        collateral: dict[str, Any] = {}
        if intel.all_tcb_infos() or intel.all_qe_identities():
            collateral["intel"] = intel
        if intel.crls:
            collateral["crls"] = tuple(intel.crls)
        until = _earliest(*(d.next_update for d in intel.all_tcb_infos()),
                          *(d.next_update for d in intel.all_qe_identities()),
                          *(c.next_update_utc for c in intel.crls))
        return _Loaded(key, collateral, (), until, now)


# --------------------------------------------------------------------------------------------
# What a cache holds (`enclaveq collateral show`)


@dataclass(frozen=True)
class CachedDocument:
    """One document in a collateral directory, described without verifying it."""

    path: Path
    kind: str                        # "TCB Info", "QE Identity", "CRL", "certificate", "unreadable" ...
    detail: str                      # FMSPC and kind, identity id, CRL issuer, certificate subject
    next_update: datetime | None     # when it goes stale (certificates: not after)

    def stale(self, now: datetime) -> bool:
        return self.next_update is not None and now >= self.next_update


def _describe_file(path: Path) -> CachedDocument | None:
    import json

    from .intel.collateral import parse_qe_identity, parse_tcb_info

    try:
        data = _read(path)
    except AttestationError as exc:
        return CachedDocument(path, "unreadable", str(exc), None)
    stripped = data.strip()
    if stripped[:1] == b"{":
        try:
            whole = json.loads(stripped)
            if isinstance(whole, dict) and "tcbInfo" in whole:
                info = parse_tcb_info(data)
                return CachedDocument(path, "TCB Info", f"{info.id} FMSPC {info.fmspc.hex()}", info.next_update)
            if isinstance(whole, dict) and "enclaveIdentity" in whole:
                ident = parse_qe_identity(data)
                return CachedDocument(path, "QE Identity", ident.id, ident.next_update)
        except (ValueError, AttestationError) as exc:
            return CachedDocument(path, "unreadable", str(exc).splitlines()[0], None)
        return None
    if path.suffix.lower() not in _KNOWN_SUFFIXES:
        return None
    crls = _crls_in(data)
    if crls:
        crl = crls[0]
        return CachedDocument(path, "CRL", crl.issuer.rfc4514_string(), crl.next_update_utc)
    certs = _certs_in(data)
    if certs:
        subjects = ", ".join(c.subject.rfc4514_string() for c in certs)
        return CachedDocument(path, "certificate" if len(certs) == 1 else "certificates", subjects,
                              min(c.not_valid_after_utc for c in certs))
    return CachedDocument(path, "unreadable", "neither a CRL, a certificate nor collateral JSON", None)


def describe_directory(directory: Path) -> list[CachedDocument]:
    """Every collateral document under ``directory`` (its ``intel/`` and ``snp/<product>/``
    subdirectories and the directory itself), with when each goes stale. Not verified: this
    is an inventory; verification happens when a verifier loads them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    dirs = [directory]
    for family in sorted(set(FAMILY.values())):
        sub = directory / family
        if sub.is_dir() and not sub.is_symlink():
            dirs.append(sub)
            dirs.extend(sorted(p for p in sub.iterdir() if p.is_dir() and not p.is_symlink()))
    found: list[CachedDocument] = []
    for each in dirs:
        for path in sorted(each.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            described = _describe_file(path)
            if described is not None:
                found.append(described)
    return found


def with_collateral(source: CollateralDir | None, platform: str, now: datetime,
                    options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (keyword arguments for ``verify_evidence``) with ``source``'s collateral for
    ``platform`` at ``now`` added: its ``collateral`` replaces any given, its certificates come
    after any ``certs`` given (the caller's own are tried first)."""
    merged = dict(options)
    if source is None:
        return merged
    for key, value in source.verify_options(platform, now).items():
        merged[key] = (*merged.get("certs", ()), *value) if key == "certs" else value
    return merged

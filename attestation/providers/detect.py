"""Which TEE is this worker in, and the evidence provider for a ``--tee`` choice.

:func:`detect_tee` looks, in this order, for

1. Linux configfs-tsm (``/sys/kernel/config/tsm/report``) with provider ``tdx_guest`` ->
   "tdx" or ``sev_guest`` -> "snp" (asking the provider means creating and removing one report
   entry: configfs-tsm has no other way to tell);
2. Gramine's ``/dev/attestation`` with ``attestation_type`` "dcap" -> "sgx";
3. the Nitro Secure Module ``/dev/nsm`` -> "nitro" (whose provider then says it is not
   supported in this build);

and returns None when none is there. It never answers "sim": simulation is only ever chosen
explicitly, and ``provider_for("auto")`` refuses with :class:`NoTeeDetected` rather than
falling back to it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .configfs_tsm import PROVIDER_PLATFORMS, TSM_REPORT_DIR, ConfigfsTsmProvider, probe_provider_name
from .errors import NoTeeDetected, ProviderFailed, ProviderUnavailable
from .fileops import FileOps
from .gramine import ATTESTATION_DIR, GramineSgxProvider, gramine_attestation_type
from .nitro_nsm import NSM_DEVICE, NitroNsmProvider

__all__ = ["REAL_TEES", "TEE_CHOICES", "detect_tee", "provider_for"]

log = logging.getLogger("enclaveq.providers")

REAL_TEES = ("sgx", "tdx", "snp", "nitro")
TEE_CHOICES = ("auto", "sim", *REAL_TEES)


def detect_tee(root: Path = Path("/"), *, ops: FileOps | None = None) -> str | None:
    """"tdx", "snp", "sgx" or "nitro" when this machine is inside that TEE, else None.

    ``ProviderFailed`` when an interface is present but the kernel refuses to say what it is
    (e.g. permission denied on configfs-tsm): better than a misleading "nothing found".
    """
    root = Path(root)
    if (root / TSM_REPORT_DIR).is_dir():
        try:
            name = probe_provider_name(root, ops=ops)
        except ProviderUnavailable as exc:
            log.debug("configfs-tsm: %s", exc)
        else:
            if name in PROVIDER_PLATFORMS:
                return PROVIDER_PLATFORMS[name]
            log.warning("configfs-tsm provider %r is not supported; ignoring it", name)
    try:
        if gramine_attestation_type(root, ops=ops) == "dcap":
            return "sgx"
    except ProviderFailed as exc:
        log.warning("Gramine attestation interface: %s", exc)
    if (root / NSM_DEVICE).exists():
        return "nitro"
    return None


def _nothing_detected(root: Path) -> str:
    return (
        "no TEE detected: looked for configfs-tsm reports in "
        f"{root / TSM_REPORT_DIR} (Intel TDX, AMD SEV-SNP guests), Gramine's {root / ATTESTATION_DIR} "
        f"with attestation_type 'dcap' (Intel SGX) and {root / NSM_DEVICE} (AWS Nitro Enclaves). "
        "--tee auto never falls back to simulation; to run the clearly labelled simulation, "
        "pass --tee sim --sim-dir DIR (create DIR with `enclaveq sim init --dir DIR`)"
    )


def provider_for(
    tee: str,
    *,
    root: Path = Path("/"),
    sim_dir: Path | None = None,
    measurement: bytes | None = None,
    ops: FileOps | None = None,
):
    """The evidence provider for ``tee`` (one of :data:`TEE_CHOICES`).

    "auto" resolves through :func:`detect_tee` (``NoTeeDetected`` if nothing is found); "sim"
    needs ``sim_dir`` and ``measurement``; every other choice ignores them. Providers check
    their interface when built, so errors (:mod:`attestation.providers.errors`) surface here,
    at worker start, not at the first challenge.
    """
    root = Path(root)
    if tee == "auto":
        detected = detect_tee(root, ops=ops)
        if detected is None:
            raise NoTeeDetected(_nothing_detected(root))
        log.info("detected TEE: %s", detected)
        tee = detected
    if tee == "sim":
        if sim_dir is None or measurement is None:
            raise ValueError("the simulated provider needs sim_dir and measurement")
        from attestation.sim.provider import SimProvider

        return SimProvider(sim_dir, measurement)
    if tee in ("tdx", "snp"):
        return ConfigfsTsmProvider(root=root, platform=tee, ops=ops)
    if tee == "sgx":
        return GramineSgxProvider(root=root, ops=ops)
    if tee == "nitro":
        return NitroNsmProvider(root=root)
    raise ValueError(f"unknown TEE {tee!r}; choose one of {', '.join(TEE_CHOICES)}")

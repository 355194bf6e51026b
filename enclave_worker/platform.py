"""Builds a worker's platform identity: evidence provider, sealing key, measurement, join policy.

- :func:`sim_identity`: the clearly labelled simulation (evidence signed by a sim directory's
  key, sealing key derived from its platform secret: sealed state survives restarts).
- :func:`tee_identity`: a real TEE (``sgx``, ``tdx``, ``snp``, ``nitro`` or ``auto``), with
  evidence from :mod:`attestation.providers`.

Whom a pool admits (both): a worker admits to its pool, and accepts pool keys from, exactly the
identity it has itself -- its own measurement on genuine hardware (or, simulated, on its own
simulation root). The rule is code, so it is part of what a producer pins: trusting a
measurement means trusting every worker of the pool, and the pool is "every worker running
exactly this image". On a real TEE the identity is read once at start from a source the host
cannot substitute (:mod:`attestation.providers.self_identity`: SGX's own EREPORT via Gramine,
TDX's TDREPORT, the SNP report, the Nitro document) and turned into a ``[platform]`` policy
table (:func:`tee_join_policy`); debug TEEs are never admitted. If that source is missing, the
worker runs without joining (one worker per pool, as before) and says so.

Sealing inside real TEEs (:func:`platform_sealing_key`):

- SGX under Gramine: EGETKEY's seal key (MRENCLAVE policy, ``/dev/attestation/keys``);
- SEV-SNP: a key the AMD secure processor derives for this launch image (MSG_KEY_REQ through
  ``/dev/sev-guest``, :mod:`attestation.providers.snp_derived_key`);
- TDX and Nitro: no hardware sealing key. :func:`tee_identity` uses an EPHEMERAL random key held
  only in memory: a restarted worker gets the pool key and models again from a live member of
  its pool (mutual attestation); if no member is alive, the pool is founded anew. It logs this
  as a warning at every start.

Either key is stretched with HKDF-SHA256 and bound to the measured configuration digest; the
AEAD recipe is the simulation's (:mod:`attestation.sim.sealing`: AES-256-GCM, fresh nonce per
blob).

On a real TEE the measurement a producer's policy pins is the one the hardware reports (SGX
MRENCLAVE, TDX MRTD/RTMRs, SNP launch measurement, Nitro PCRs). ``WorkerIdentity.measurement``
still carries the software measurement of :func:`enclave_worker.measurement.measure_worker`
(informational there), and ``config_digest`` -- which every statement binds into the report
data -- is the digest of the worker's measured configuration, exactly as in the simulation.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, UTC
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from attestation.collateral_source import CollateralDir, with_collateral
from attestation.errors import AttestationError
from attestation.policy import Policy, policy_from_mapping
from attestation.sim import sealing
from attestation.sim.provider import SimProvider
from attestation.providers import ProviderError, provider_for
from attestation.providers.errors import EvidenceMismatch
from attestation.providers.fileops import FileOps
from attestation.providers.self_identity import COLLATERAL_PLATFORMS, SelfIdentity, join_table, self_identity

from .config import DEFAULT_WORKER_CONFIG, WorkerConfig
from .errors import WorkerStartupError
from .measurement import measure_worker
from .identity import WorkerIdentity

log = logging.getLogger("enclaveq.worker")

# Evidence between pool members is bound to a fresh nonce; a signed time (Nitro, sim) must also
# be this recent.
JOIN_MAX_EVIDENCE_AGE_SECONDS = 60


def sim_identity(sim_dir: Path, config: WorkerConfig = DEFAULT_WORKER_CONFIG) -> WorkerIdentity:
    measurement = measure_worker(config.measured())
    try:
        provider = SimProvider(Path(sim_dir), measurement.value)
        key = sealing.sealing_key(Path(sim_dir), measurement.value)
    except Exception as exc:
        hint = "" if "sim init" in str(exc) else f" Create one with `enclaveq sim init --dir {sim_dir}`."
        raise WorkerStartupError(f"simulation directory {sim_dir} is not usable: {exc}.{hint}") from None
    log.warning("SIMULATED TEE: this worker's evidence is signed by a local simulation key; "
                "it gives no confidentiality against whoever runs this machine")
    return WorkerIdentity(provider=provider, sealing_key=key, seal=sealing.seal, unseal=sealing.unseal,
                          measurement=measurement.value, config_digest=measurement.config_digest,
                          join_policy=self_admission_policy(measurement.value, provider.root_sha256))


def self_admission_policy(measurement: bytes, sim_root_sha256: str) -> Policy:
    """The simulated worker's join policy: admit, and trust keys from, exactly this worker's code and
    measured configuration on this simulation root. It is code, hence part of the measurement:
    a producer that pins the measurement also pins whom the pool admits."""
    return Policy(measurements=(measurement.hex(),), allow_simulation=True, sim_root_sha256=sim_root_sha256,
                  max_evidence_age_seconds=JOIN_MAX_EVIDENCE_AGE_SECONDS)


def tee_join_policy(identity: SelfIdentity, *, collateral: bool = False) -> Policy:
    """A real-TEE worker's join policy: admit, and trust keys from, exactly this TEE's identity.

    The worker's code decides whom it admits, so a pool is "every worker running exactly this
    image on genuine hardware" -- the same rule as the simulation's :func:`self_admission_policy`,
    with the hardware's identity instead of the software measurement. ``identity.table`` pins,
    per platform (:mod:`attestation.providers.self_identity`):

    - SGX: MRENCLAVE, MRSIGNER, ISVPRODID and at least this ISVSVN;
    - TDX: MRTD, RTMR0-3, MRCONFIGID, MROWNER, MROWNERCONFIG and TD_ATTRIBUTES (so every worker
      runs the same firmware, kernel, command line and application, with the same launch
      configuration);
    - SEV-SNP: the launch MEASUREMENT, the VMPL (and the ID block's key digests when one was
      used); guest policy: no debug, no migration agent;
    - Nitro: PCR0, PCR1, PCR2 (and PCR8 for a signed image).

    Debug TEEs are never admitted (``debug_allowed = false`` everywhere), not even copies of a
    debug worker. The chain must end at the pinned vendor roots of the verifier's
    ``join_verify_options`` (AMD, Intel, AWS by default).

    ``collateral``: whether peers' TCB must be judged with collateral (``--collateral DIR``,
    docs/collateral.md): then the platform's ``require_collateral`` default holds (a worker
    without collateral refuses every peer). False only under ``--join-without-collateral``: the
    table sets ``require_collateral = false`` explicitly
    (:func:`attestation.providers.self_identity.join_table`) and peers' TCB is not evaluated.
    """
    table = join_table(identity, collateral=collateral)
    return policy_from_mapping({"max_evidence_age_seconds": JOIN_MAX_EVIDENCE_AGE_SECONDS,
                                identity.platform: table})


EPHEMERAL_SEALING_WARNING = (
    "EPHEMERAL SEALING KEY: this TEE has no hardware sealing key enclaveq can use (TDX and Nitro have "
    "none; SGX seals with EGETKEY under Gramine, SEV-SNP with a key its firmware derives); this worker "
    "seals its pool key and uploaded models under a random key that dies with the process. After a "
    "restart it gets them again from a live member of its pool (mutual attestation); if no member is "
    "alive, the pool is founded anew: producers must attest again and re-upload models"
)

NO_COLLATERAL_WARNING = (
    "NO COLLATERAL (--join-without-collateral): joiners' and members' {platform} TCB is not evaluated "
    "(no Intel TCB Info / AMD CRLs to judge it with; their measurements and vendor signatures still are). "
    "Pass --collateral DIR (filled by `enclaveq collateral fetch`) to evaluate it"
)

NO_COLLATERAL_REFUSAL = (
    "NO COLLATERAL: this worker admits no other {platform} worker and joins none, since without Intel "
    "TCB Info / AMD CRLs it cannot tell a revoked or out-of-date TCB from a good one. Pass --collateral DIR "
    "(filled by `enclaveq collateral fetch`), or --join-without-collateral to judge peers by their "
    "measurements and vendor signatures alone"
)

JOIN_UNAVAILABLE_WARNING = (
    "JOINING UNAVAILABLE: this worker could not read its own TEE identity from a source the host "
    "cannot substitute ({reason}), so it admits no other worker and joins no pool: one worker per "
    "pool, and a second one on the same pool refuses to start"
)


def tee_identity(tee: str, config: WorkerConfig = DEFAULT_WORKER_CONFIG, *, root: Path = Path("/"),
                 ops: FileOps | None = None, join_verify_options: Mapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.time, collateral: CollateralDir | None = None,
                 join_without_collateral: bool = False) -> WorkerIdentity:
    """The identity of a worker inside a real TEE: ``tee`` is "auto", "sgx", "tdx", "snp" or "nitro".

    ``WorkerStartupError`` (with the provider's explanation) when the TEE is missing, refuses,
    or is not supported, and when the host hands this worker a quote of another TEE.
    ``root``/``ops`` let tests use a fake TEE tree (:mod:`attestation.providers.fakes`);
    ``join_verify_options`` are the keyword arguments for
    :func:`attestation.verify.verify_evidence` when checking a peer (e.g. ``trust=`` fake roots in
    tests); empty: the vendors' pinned roots. ``clock`` dates the self-check. ``collateral`` (a
    :class:`~attestation.collateral_source.CollateralDir`, ``--collateral DIR``) is what peers'
    TCB is judged with, read at each check. Without it the join policy still requires collateral,
    so the worker admits no peer and joins none (fail closed, :data:`NO_COLLATERAL_REFUSAL`),
    unless ``join_without_collateral`` (``--join-without-collateral``) waives it explicitly: then
    peers' TCB is not evaluated and the worker warns once (:data:`NO_COLLATERAL_WARNING`).
    """
    if tee == "sim":
        raise ValueError("the simulation's identity comes from sim_identity(sim_dir)")
    measurement = measure_worker(config.measured())
    options = dict(join_verify_options or {})
    try:
        provider = provider_for(tee, root=root, ops=ops)
    except ProviderError as exc:
        raise WorkerStartupError(str(exc)) from None
    log.info("TEE %s: evidence from %s", provider.platform, type(provider).__name__)
    own = own_identity(provider, root=root, ops=ops)
    join_policy = None
    if own is not None:
        waived = collateral is None and join_without_collateral
        join_policy = tee_join_policy(own, collateral=not waived)
        refusing = collateral is None and not waived and own.platform in COLLATERAL_PLATFORMS
        if collateral is None and own.platform in COLLATERAL_PLATFORMS:
            log.warning((NO_COLLATERAL_WARNING if waived else NO_COLLATERAL_REFUSAL).format(
                platform=own.platform.upper()))
        now = datetime.fromtimestamp(clock(), UTC)
        if not refusing:  # refusing, the warning above says why every copy of itself is refused
            check_self_admission(own, join_policy, with_collateral(collateral, own.platform, now, options), now=now)
    key = platform_sealing_key(provider, measurement.config_digest, root=root, ops=ops,
                               snp_vmpl=own.vmpl if own is not None else None)
    persistent = key is not None
    if key is None:
        log.warning("%s%s", EPHEMERAL_SEALING_WARNING, "" if join_policy is not None else
                    ". This worker cannot join a pool (JOINING UNAVAILABLE above), so for it every restart "
                    "founds the pool anew")
        key = os.urandom(sealing.KEY_SIZE)
    return WorkerIdentity(provider=provider, sealing_key=key, seal=sealing.seal,
                          unseal=sealing.unseal, measurement=measurement.value,
                          config_digest=measurement.config_digest, persistent_sealing=persistent,
                          join_policy=join_policy, join_verify_options=options, collateral=collateral)


def own_identity(provider: Any, *, root: Path = Path("/"), ops: FileOps | None = None) -> SelfIdentity | None:
    """This TEE's identity (:func:`attestation.providers.self_identity.self_identity`), or None --
    with :data:`JOIN_UNAVAILABLE_WARNING` -- when it cannot be read. A quote of another TEE
    (:class:`EvidenceMismatch`) is a ``WorkerStartupError``: the host is substituting quotes."""
    try:
        own = self_identity(provider, root=root, ops=ops)
    except EvidenceMismatch as exc:
        raise WorkerStartupError(str(exc)) from None
    except ProviderError as exc:
        log.warning(JOIN_UNAVAILABLE_WARNING.format(reason=exc))
        return None
    pins = ", ".join(f"{k} {v[:16]}..." if len(v) > 20 else f"{k} {v}" for k, v in own.details.items())
    log.info("join policy: admit exactly this %s identity (%s), read from %s", own.platform.upper(), pins, own.source)
    if own.debug:
        log.warning("this %s TEE runs in DEBUG mode: its pool admits no other worker (debug TEEs are never "
                    "admitted) and producers should refuse it", own.platform.upper())
    return own


def check_self_admission(own: SelfIdentity, policy: Policy, options: Mapping[str, Any], *, now: datetime) -> bool:
    """Would this worker admit a copy of itself? Verifies its own evidence against its join policy
    with the peers' verification options; warns (and returns False) if not -- a pool of such
    workers cannot grow: every join would be refused the same way."""
    from attestation.verify import verify_evidence

    try:
        verify_evidence(own.platform, own.evidence, policy, expected_report_data=own.report_data, now=now,
                        **options)
    except AttestationError as exc:
        log.warning("this worker's own evidence does not pass its join policy, so it would refuse every copy of "
                    "itself and they would refuse it: %s", str(exc).splitlines()[0])
        return False
    return True


def _stretch(platform_key: bytes, label: bytes, config_digest: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=sealing.KEY_SIZE, salt=None,
                info=label + config_digest).derive(platform_key)


def platform_sealing_key(provider: object, config_digest: bytes, *, root: Path = Path("/"),
                         ops: FileOps | None = None, snp_vmpl: int | None = None) -> bytes | None:
    """A sealing key the platform re-derives after a restart, or None where none exists.

    SGX under Gramine: EGETKEY's seal key bound to MRENCLAVE (so only this exact enclave, on this
    CPU, can unseal). SEV-SNP: the firmware's derived key (MSG_KEY_REQ, VCEK root) mixing in the
    launch measurement, guest policy, family and image ID, at ``snp_vmpl`` (the VMPL this guest's
    reports are requested at; default 0): only this launch image on this chip re-derives it.
    Both are stretched with HKDF-SHA256 and bound to the measured config digest. TDX and Nitro
    have no such key (None): their workers get pool keys from a live member after a restart.
    A platform key that cannot be obtained is a warning and None (the caller seals ephemerally).
    """
    from attestation.providers.gramine import GramineSgxProvider, gramine_sealing_key

    platform = getattr(provider, "platform", None)
    if isinstance(provider, GramineSgxProvider):
        try:
            egetkey = gramine_sealing_key("mrenclave", root=root, ops=ops)
        except ProviderError as exc:
            log.warning("no SGX sealing key from Gramine (%s)", exc)
            return None
        log.info("sealing with the SGX seal key (EGETKEY, MRENCLAVE policy) from Gramine")
        return _stretch(egetkey, b"enclaveq/sgx/sealing/v1", config_digest)
    if platform == "snp":
        from attestation.providers.snp_derived_key import DerivedKeyRequest, snp_derived_key

        request = DerivedKeyRequest(vmpl=snp_vmpl or 0)
        try:
            derived = snp_derived_key(request, root=root, ops=ops)
        except ProviderError as exc:
            log.warning("no SEV-SNP sealing key from the firmware (%s)", exc)
            return None
        log.info("sealing with the SEV-SNP firmware's derived key (MSG_KEY_REQ: VCEK root; measurement, guest "
                 "policy, family and image ID; VMPL %d)", request.vmpl)
        return _stretch(derived, b"enclaveq/snp/sealing/v1", config_digest)
    return None

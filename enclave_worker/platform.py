"""Builds a worker's platform identity: evidence provider, sealing key, measurement.

- :func:`sim_identity`: the clearly labelled simulation (evidence signed by a sim directory's
  key, sealing key derived from its platform secret: sealed state survives restarts).
- :func:`tee_identity`: a real TEE (``sgx``, ``tdx``, ``snp``, ``nitro`` or ``auto``), with
  evidence from :mod:`attestation.providers`.

Sealing inside real TEEs: SGX under Gramine seals with EGETKEY's seal key (MRENCLAVE policy,
read from ``/dev/attestation/keys/_sgx_mrenclave``), so its sealed state survives restarts. The
other TEEs have no platform sealing here yet (issue 4); :func:`tee_identity` then uses an
EPHEMERAL random sealing key, held only in the worker's memory: whatever the worker seals (the
pool key, uploaded models) cannot be opened after a restart, so every restart founds the pool
anew (producers must attest again and upload their models again). It logs this as a warning at
every start. The AEAD recipe is the same as the simulation's (:mod:`attestation.sim.sealing`:
AES-256-GCM, fresh nonce per blob); only the key differs.

On a real TEE the measurement a producer's policy pins is the one the hardware reports (SGX
MRENCLAVE, TDX MRTD/RTMRs, SNP launch measurement, Nitro PCRs). ``WorkerIdentity.measurement``
still carries the software measurement of :func:`enclave_worker.measurement.measure_worker`
(informational there), and ``config_digest`` -- which every statement binds into the report
data -- is the digest of the worker's measured configuration, exactly as in the simulation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from attestation.policy import Policy
from attestation.sim import sealing
from attestation.sim.provider import SimProvider
from attestation.providers import ProviderError, provider_for
from attestation.providers.fileops import FileOps

from .config import DEFAULT_WORKER_CONFIG, WorkerConfig
from .errors import WorkerStartupError
from .measurement import measure_worker
from .worker import WorkerIdentity

log = logging.getLogger("enclaveq.worker")


def sim_identity(sim_dir: Path, config: WorkerConfig = DEFAULT_WORKER_CONFIG) -> WorkerIdentity:
    measurement = measure_worker(config.measured())
    try:
        provider = SimProvider(Path(sim_dir), measurement.value)
        key = sealing.sealing_key(Path(sim_dir), measurement.value)
    except Exception as exc:
        raise WorkerStartupError(f"simulation directory {sim_dir} is not usable: {exc}. "
                                 f"Create one with `enclaveq sim init --dir {sim_dir}`.") from None
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
                  max_evidence_age_seconds=60)


EPHEMERAL_SEALING_WARNING = (
    "EPHEMERAL SEALING KEY: this TEE has no platform sealing in enclaveq yet (only SGX under Gramine "
    "has; TDX, SEV-SNP and Nitro come with issue 4); this worker "
    "seals its pool key and uploaded models under a random key that dies with the process, so "
    "after a restart the pool is founded anew: producers must attest again and re-upload models"
)


def tee_identity(tee: str, config: WorkerConfig = DEFAULT_WORKER_CONFIG, *, root: Path = Path("/"),
                 ops: FileOps | None = None) -> WorkerIdentity:
    """The identity of a worker inside a real TEE: ``tee`` is "auto", "sgx", "tdx", "snp" or "nitro".

    ``WorkerStartupError`` (with the provider's explanation) when the TEE is missing, refuses,
    or is not supported. ``root``/``ops`` let tests use a fake TEE tree
    (:mod:`attestation.providers.fakes`).
    """
    if tee == "sim":
        raise ValueError("the simulation's identity comes from sim_identity(sim_dir)")
    measurement = measure_worker(config.measured())
    try:
        provider = provider_for(tee, root=root, ops=ops)
    except ProviderError as exc:
        raise WorkerStartupError(str(exc)) from None
    log.info("TEE %s: evidence from %s", provider.platform, type(provider).__name__)
    key = platform_sealing_key(provider, measurement.config_digest, root=root, ops=ops)
    persistent = key is not None
    if not persistent:
        log.warning(EPHEMERAL_SEALING_WARNING)
        key = os.urandom(sealing.KEY_SIZE)
    return WorkerIdentity(provider=provider, sealing_key=key, seal=sealing.seal,
                          unseal=sealing.unseal, measurement=measurement.value,
                          config_digest=measurement.config_digest, persistent_sealing=persistent)


def platform_sealing_key(provider: object, config_digest: bytes, *, root: Path = Path("/"),
                         ops: FileOps | None = None) -> bytes | None:
    """A sealing key the platform re-derives after a restart, or None where none exists yet.

    SGX under Gramine: EGETKEY's seal key bound to MRENCLAVE (so only this exact enclave, on this
    CPU, can unseal), stretched with HKDF-SHA256 and bound to the measured config digest. TDX,
    SEV-SNP and Nitro have no such key here yet (issue 4: SNP's MSG_KEY_REQ, or keys from a pool
    member after a mutual-attestation join).
    """
    from attestation.providers.gramine import GramineSgxProvider, gramine_sealing_key

    if not isinstance(provider, GramineSgxProvider):
        return None
    try:
        egetkey = gramine_sealing_key("mrenclave", root=root, ops=ops)
    except ProviderError as exc:
        log.warning("no SGX sealing key from Gramine (%s)", exc)
        return None
    log.info("sealing with the SGX seal key (EGETKEY, MRENCLAVE policy) from Gramine")
    return HKDF(algorithm=hashes.SHA256(), length=sealing.KEY_SIZE, salt=None,
                info=b"enclaveq/sgx/sealing/v1" + config_digest).derive(egetkey)

"""Builds a worker's platform identity: evidence provider, sealing key, measurement.

Only the simulated TEE exists so far; real providers (configfs-tsm, Gramine, Nitro NSM) plug in
here by returning the same ``WorkerIdentity``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from attestation.sim import sealing
from attestation.sim.provider import SimProvider

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
                          measurement=measurement.value, config_digest=measurement.config_digest)

"""Simulated TEE: evidence format (``abi``), authenticity checks (``verify``), the in-worker
provider, the simulation directory (``init``/``simdir``) and sealing.

Simulation gives NO confidentiality: the host holds the attestation key and the platform
secret. A policy must opt in (``[simulation] allow = true``) and every acceptance is logged.
"""

from attestation.sim.init import init_sim_dir
from attestation.sim.provider import SimProvider
from attestation.sim.sealing import seal, sealing_key, unseal
from attestation.sim.simdir import SimDir, open_sim_dir

__all__ = ["SimDir", "SimProvider", "init_sim_dir", "open_sim_dir", "seal", "sealing_key", "unseal"]

"""The simulated evidence provider: what a worker calls instead of a TEE's quoting interface.

Inside a real TEE the hardware measures the code and signs reports; here the worker states its
own measurement (computed by :func:`enclave_worker.measurement.measure_worker`) and signs with
the attestation key of a simulation directory. The evidence then travels the exact same path as
hardware evidence, and a verifier accepts it only under a policy that opts in to simulation.
"""

from __future__ import annotations

import os
from datetime import datetime, UTC
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.sim.abi import (
    MEASUREMENT_SIZE,
    REPORT_DATA_SIZE,
    SimReport,
    encode_evidence,
    encode_report,
)
from attestation.sim.simdir import SimDir, open_sim_dir

__all__ = ["SimProvider"]

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SimProvider:
    """Produces simulated evidence for one measurement.

    The simulation directory is loaded and checked once, here (:class:`SimDirError` if it is
    missing or corrupt), so a misconfigured worker fails at start, not on its first challenge.
    ``clock`` returns an aware datetime; tests inject a fixed one.
    """

    platform = "sim"

    def __init__(
        self,
        sim_dir: str | os.PathLike[str] | SimDir,
        measurement: bytes,
        *,
        debug: bool = False,
        svn: int = 0,
        clock: Clock = _utc_now,
    ) -> None:
        if type(measurement) is not bytes or len(measurement) != MEASUREMENT_SIZE:
            raise ValueError(f"measurement must be {MEASUREMENT_SIZE} bytes")
        # Fail now on bad arguments rather than inside .evidence().
        SimReport(
            measurement=measurement,
            debug=debug,
            security_version=svn,
            report_data=bytes(REPORT_DATA_SIZE),
            issued_at_ms=0,
        )
        loaded = open_sim_dir(sim_dir)
        self._key = loaded.attestation_key
        self._chain = (loaded.attestation_cert, loaded.root)
        self._measurement = measurement
        self._debug = debug
        self._svn = svn
        self._clock = clock
        self.root_sha256: str = loaded.sim_dir.root_sha256

    @property
    def measurement(self) -> bytes:
        return self._measurement

    def evidence(self, report_data: bytes) -> bytes:
        """Signed simulated evidence binding ``report_data`` (exactly 64 bytes)."""
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
        report = SimReport(
            measurement=self._measurement,
            debug=self._debug,
            security_version=self._svn,
            report_data=bytes(report_data),
            issued_at_ms=SimReport.ms_from_datetime(self._clock()),
        )
        body = encode_report(report)
        signature = self._key.sign(body, ec.ECDSA(hashes.SHA256()))
        return encode_evidence(body, self._chain, signature)

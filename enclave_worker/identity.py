"""What a worker needs from its platform: evidence, sealing, its measurement and join policy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class EvidenceProvider(Protocol):
    platform: str

    def evidence(self, report_data: bytes) -> bytes: ...


@dataclass(frozen=True)
class WorkerIdentity:
    """What the worker needs from its platform: evidence, a sealing key, its measurement."""

    provider: EvidenceProvider
    sealing_key: bytes
    seal: Callable[[bytes, bytes, bytes], bytes]
    unseal: Callable[[bytes, bytes, bytes], bytes]
    measurement: bytes
    config_digest: bytes
    # False when the sealing key dies with the process (real TEEs without platform sealing yet):
    # sealed state on disk can then never be reopened, and the worker says so.
    persistent_sealing: bool = True
    # Whom this worker admits to its pool, and trusts to hand it pool keys (mutual attestation).
    # It is part of the measured code: the default rule admits exactly this worker's measurement
    # on this worker's platform root. None: joining is not available (one worker per pool).
    join_policy: Any = None
    # Extra keyword arguments for verify_evidence when checking a peer against the join policy
    # (trust=... pinned roots, collateral=...). Empty: the vendors' pinned roots.
    join_verify_options: Mapping[str, Any] = field(default_factory=dict)
    # Where peers' collateral comes from (an attestation.collateral_source.CollateralDir: Intel
    # TCB Info, AMD CRLs ...), read at each peer check; None: peers' TCB is not evaluated.
    collateral: Any = None

    @property
    def can_join(self) -> bool:
        """Whether this worker shares a pool with others (it has a join policy)."""
        return self.join_policy is not None

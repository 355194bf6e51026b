"""Which TEE platforms exist and where their code lives.

Platforms are imported lazily by name (``attestation.<name>`` exposing ``PLATFORM``), so the
policy loader and the verifier share one list without importing every verifier up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import UnsupportedPlatform

if TYPE_CHECKING:  # only for the annotation: the registry itself imports no platform code
    from .platforms import Platform

HARDWARE_PLATFORMS: tuple[str, ...] = ("sgx", "tdx", "snp", "nitro")
ALL_PLATFORMS: tuple[str, ...] = ("sim",) + HARDWARE_PLATFORMS


def platform(name: str) -> Platform:
    """The ``Platform`` object of a hardware platform (``attestation.<name>.PLATFORM``)."""
    if name not in HARDWARE_PLATFORMS:
        raise UnsupportedPlatform(str(name), ALL_PLATFORMS)
    try:
        module = importlib.import_module(f"attestation.{name}")
    except ModuleNotFoundError as exc:  # pragma: no cover - a broken installation
        raise UnsupportedPlatform(str(name), ALL_PLATFORMS) from exc
    plat: Platform | None = getattr(module, "PLATFORM", None)
    if plat is None:
        raise UnsupportedPlatform(str(name), ALL_PLATFORMS)
    return plat

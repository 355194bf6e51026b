"""What every example shares: its connection options, the attestation summary it prints, a timer.

Each example is run as ``python examples/NAME.py --broker URL --pool P --policy FILE`` (Python puts
examples/ on sys.path, so they import this module by name) against a running pool: the README's
processes or the compose stack. tests/test_examples.py calls their ``main(argv)`` in-process.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from enclaveq import Claims

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def connection_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every example takes; the example adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=DEFAULT_BROKER, help=f"broker URL (default {DEFAULT_BROKER})")
    parser.add_argument("--pool", required=True, help="the worker pool's name")
    parser.add_argument("--policy", type=Path, required=True, help="the policy file the pool must satisfy")
    parser.add_argument("--owner-key", type=Path, default=None,
                        help="the owner key that signs the uploads (default: a key for this run only)")
    parser.add_argument("--keep-models", action="store_true",
                        help="leave the uploaded models on the pool (default: delete them at the end)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any one call may take (default 120)")
    return parser


def attested(claims: Claims | None) -> str:
    """One line on what the pool's evidence proved, as the demo prints it."""
    if claims is None:  # the SDK connects (and attests) before it returns a client
        raise RuntimeError("the client has no verified claims")
    kind = "SIMULATED TEE: no confidentiality" if claims.simulated else "hardware TEE"
    return (f"attested: platform {claims.platform} ({kind}), measurement {claims.measurement.hex()[:16]}…, "
            f"security version {claims.security_version}, debug={claims.debug}")


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` is the block's wall time in seconds."""
    box: list[float] = []
    started = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - started)

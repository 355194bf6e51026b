"""`python -m enclaveq` is the `enclaveq` command (used by tests that run workers as processes)."""

from .cli import main

main()

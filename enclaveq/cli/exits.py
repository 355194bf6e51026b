"""Exit codes, and the one place where an error becomes one line on stderr and an exit code.

Every command may let the library's typed errors propagate: :func:`run_reporting_errors` maps
them here, so no user sees a traceback for a wrong URL, a bad policy file, an unreachable broker
or Ctrl-C. Anything not listed is a genuine bug and keeps its traceback. ``--debug`` (or
``ENCLAVEQ_DEBUG=1``) also prints the traceback of every error, before its one line, and keeps
its exit code: here, and where a command reports a failure itself (:func:`show_traceback_if_debug`).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence

import click

from attestation.errors import AttestationError, PolicyError
from broker_adapters.errors import BrokerError, UnsupportedBrokerURL
from enclave_worker.errors import WorkerStartupError
from producer_sdk.errors import EnclaveqError
from protocol.errors import KeyFileError, ProtocolError

from .owner_key import OwnerKeyError

EXIT_OK = 0
EXIT_FAILED = 1       # the operation failed: verification refused, a job failed, the broker refused
EXIT_USAGE = 2        # usage or input error: a bad option, URL, policy, key or input file
EXIT_REFUSED = 3      # a worker refused to start
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it

DEBUG_ENV = "ENCLAVEQ_DEBUG"

# Input mistakes: the user can fix them by changing what they gave.
_USAGE_ERRORS: tuple[type[BaseException], ...] = (PolicyError, KeyFileError, UnsupportedBrokerURL, OwnerKeyError)
# The operation ran and failed: refused evidence, a failed job, an unreachable or refusing broker.
_FAILURES: tuple[type[BaseException], ...] = (EnclaveqError, AttestationError, BrokerError, ProtocolError)


class InputError(click.ClickException):
    """A file or directory the user named cannot be used: one line, exit 2 (usage or input error)."""

    exit_code = EXIT_USAGE


class Interrupted(KeyboardInterrupt):
    """Ctrl-C that the command already reported in its own words (what it kept, how to resume):
    :func:`run_reporting_errors` exits 130 without adding a second "interrupted" line."""


def debug_wanted(argv: Sequence[str]) -> bool:
    """Whether tracebacks are wanted: ``--debug`` before the command, or ``ENCLAVEQ_DEBUG=1``."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def debug_requested() -> bool:
    """Whether the running command was asked for tracebacks: ``enclaveq --debug`` in its click
    context (also under click's test runner, whose arguments are not ``sys.argv``), else
    :func:`debug_wanted` of the command line."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return debug_wanted(sys.argv[1:])


def show_traceback_if_debug() -> None:
    """Under ``--debug``: the traceback of the exception being handled, on stderr. For a command
    that says a failure in one line of its own (and exits with its code) from an ``except``
    block; outside one there is no traceback to show."""
    if sys.exc_info()[1] is not None and debug_requested():
        click.echo(traceback.format_exc().rstrip("\n"), err=True)


def exit_code_of(exc: BaseException) -> int:
    if isinstance(exc, _USAGE_ERRORS):
        return EXIT_USAGE
    if isinstance(exc, WorkerStartupError):
        return EXIT_REFUSED
    if isinstance(exc, OSError) and exc.filename is not None:
        return EXIT_USAGE  # a file or directory the user named cannot be read or written
    return EXIT_FAILED


def describe(exc: BaseException) -> str:
    """One line (a policy refusal may add its violations below it) naming what is wrong."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    text = str(exc).strip() or type(exc).__name__
    return text


def reportable(exc: BaseException) -> bool:
    """Errors that are the user's situation, not a bug in enclaveq."""
    return isinstance(exc, (*_USAGE_ERRORS, *_FAILURES, WorkerStartupError)) or (
        isinstance(exc, OSError) and (exc.filename is not None or isinstance(exc, ConnectionError)))


def _critical_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.CRITICAL


def run_reporting_errors(command: click.Command, *, debug: bool) -> None:
    """Run ``command`` as the console entry point; exit with the documented codes."""
    if not debug:
        # The AMQP client logs each failed connection attempt with its traceback; enclaveq says
        # what failed in one line of its own (and the worker logs outages under enclaveq.*).
        # aiomqtt's "mqtt" logger likewise warns on every failed MQTT connection attempt; aiomqtt
        # sets that logger's level when it is imported (later), so a filter is what silences it.
        for noisy in ("aiormq", "aio_pika", "mqtt"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
            logging.getLogger(noisy).addFilter(_critical_only)
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as exc:  # usage errors: click's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as stop:
        if debug:
            raise
        # click turns Ctrl-C into Abort (raised from the KeyboardInterrupt): a command that
        # already said what it kept raised Interrupted, and is not reported twice.
        if not isinstance(stop, Interrupted) and not isinstance(stop.__cause__, Interrupted):
            click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if not reportable(exc):
            raise
        if debug:  # the traceback, then the same line and exit code as without --debug
            click.echo(traceback.format_exc().rstrip("\n"), err=True)
        click.echo(f"error: {describe(exc)}", err=True)
        sys.exit(exit_code_of(exc))
    sys.exit(EXIT_OK)

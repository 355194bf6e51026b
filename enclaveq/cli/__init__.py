"""The `enclaveq` command: the application layer over the library packages.

Every command lives here, not in the libraries (attestation, broker_adapters, enclave_worker,
producer_sdk, protocol import nothing from enclaveq):

  __init__.py   the `cli` group, `enclaveq demo`, and `main` (the console entry point)
  sim.py        `enclaveq sim init`, `enclaveq policy init`
  worker.py     `enclaveq worker`
  producer.py   `enclaveq attest`, `model upload|list|delete`, `run`, `submit`, `pool rotate`
  owner_key.py  which owner key `model upload|delete` use: --owner-key, $ENCLAVEQ_OWNER_KEY or the default file
  keys.py       `enclaveq keys generate|show`
  pipeline.py   `enclaveq pipeline init|create|list|delete`, `publish`, `subscribe`
  evidence.py   `enclaveq evidence verify`
  collateral.py `enclaveq collateral fetch|show`, and the --collateral option of the verifying commands
  params.py     parameter types checked when the command line is read (broker URLs)
  exits.py      the exit codes, and the one place errors become one line and an exit code

Exit codes (README, "Exit codes"): 0 success; 1 the operation failed (verification refused, a job
failed, the broker refused); 2 usage or input error; 3 a worker refused to start; 130 interrupted.
No traceback reaches a user except for a genuine bug; ``--debug`` (or ``ENCLAVEQ_DEBUG=1``) shows
the traceback of any error.
"""

from __future__ import annotations

import sys

import click

from .collateral import collateral_group
from .evidence import evidence_group
from .exits import debug_wanted, run_reporting_errors
from .keys import keys_group
from .pipeline import pipeline_group, publish_command, subscribe_command
from .producer import attest_command, model_group, pool_group, run_command, submit_command
from .sim import policy_cli, sim_cli
from .worker import worker_command

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="enclaveq")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also: ENCLAVEQ_DEBUG=1).")
def cli(debug: bool) -> None:
    """enclaveq: confidential ONNX inference as an asynchronous job system.

    Producers verify attestation evidence of a worker pool against their policy, then send
    models and jobs sealed to the pool's attested key through RabbitMQ, an MQTT 5 broker
    (mqtt://) or the embedded memory broker. The broker, host and operator see only ciphertext.

    \b
    Start here:
      enclaveq demo                     the whole flow in one process
      enclaveq sim init --dir ./sim     a simulated TEE for local use
      enclaveq worker --help            run a worker
      enclaveq pipeline --help          event-driven pipelines: publish events, results to recipients
    """


@cli.command("demo")
def demo_command() -> None:
    """Run the whole confidential flow in one process (memory broker, simulated TEE, real model)."""
    from ..demo import main as demo_main

    sys.exit(demo_main())


cli.add_command(sim_cli)
cli.add_command(policy_cli)
cli.add_command(evidence_group)
cli.add_command(collateral_group)
cli.add_command(worker_command)
cli.add_command(attest_command)
cli.add_command(model_group)
cli.add_command(run_command)
cli.add_command(submit_command)
cli.add_command(pool_group)
cli.add_command(keys_group)
cli.add_command(pipeline_group)
cli.add_command(publish_command)
cli.add_command(subscribe_command)


def main() -> None:
    run_reporting_errors(cli, debug=debug_wanted(sys.argv[1:]))

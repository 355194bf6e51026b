"""The compose stack's `demo` service: the confidential flow against the stack's two pools.

Attests the RabbitMQ pool against the policy the `init` service wrote, uploads Magika's
content-type model (from its wheel) sealed to the pool, runs a batch of confidential documents
through it and checks every result against onnxruntime run here directly. Then, over MQTT 5,
creates the document pipeline (raw bytes -> Magika -> label) on the Mosquitto pool, publishes
the same documents as sealed events, reads the results as their recipient and checks them
against the chain run directly. Prints each thing it verified; exit 0, or 1 on any failure.

It leaves nothing behind: at the end it deletes the pipeline and every model it uploaded (it
owns them, under a key of its own made for this run and then forgotten), so that the host's
`enclaveq model upload` of the same stock model, as the README's "Run the stack" shows, is not
refused as not_owner. A model it found already on the pool (uploaded by someone else) it uses
and leaves alone.

compose starts it once every worker reports ready (admitted to its pool, see healthcheck.py); run
on its own (`docker compose run --rm demo`), it retries the first attestation of each pool for up
to --wait seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from enclaveq import AsyncClient, EnclaveqError, NotOwner
from enclaveq.bundled_model import SAMPLE_DOCUMENTS, magika_model
from protocol import crypto
from protocol.ownership import generate_signing_key

SIMULATION = ("SIMULATION: the workers' evidence is signed by a key in the stack's `sim` volume; "
              "whoever runs the stack can read everything. This shows the protocol, not confidentiality.")


def ok(text: str) -> None:
    print(f"  ok  {text}", flush=True)


async def attested(broker: str, pool: str, policy: Path, wait: float, **kwargs) -> AsyncClient:
    """A connected client, retrying while the pool has no admitted worker yet."""
    deadline = time.monotonic() + wait
    while True:
        client = AsyncClient(broker, pool, str(policy), timeout=60, **kwargs)
        try:
            await client.connect()
            return client
        except EnclaveqError as exc:
            await client.close()
            if time.monotonic() > deadline:
                raise
            print(f"  ..  pool {pool!r} not ready yet ({type(exc).__name__}); retrying", flush=True)
            await asyncio.sleep(2)


async def jobs_over_rabbitmq(args: argparse.Namespace) -> None:
    model = magika_model()
    names = list(SAMPLE_DOCUMENTS)
    inputs = [{model.input_name: model.features(SAMPLE_DOCUMENTS[name])} for name in names]
    client = await attested(args.broker, args.pool, args.policy, args.wait, owner_key=generate_signing_key())
    try:
        claims = client.claims
        assert claims is not None
        ok(f"pool {args.pool!r} on RabbitMQ attested: platform {claims.platform} (simulated={claims.simulated}), "
           f"measurement {claims.measurement.hex()[:16]}… pinned by the policy, fresh nonce bound")
        model_bytes = model.path.read_bytes()
        uploaded = False
        try:
            model_id = await client.upload_model(model_bytes)
            uploaded = True
            ok(f"Magika's model uploaded sealed to the pool key: model id {model_id[:16]}…")
        except NotOwner:  # uploaded before, by another owner key (you, from the host): use it, leave it
            model_id = hashlib.sha256(model_bytes).hexdigest()
            ok(f"Magika's model is already on the pool (another owner uploaded it): model id {model_id[:16]}…")
        try:
            results: dict[int, np.ndarray] = {}
            started = time.perf_counter()
            async for result in client.submit(model_id, inputs):
                if result.error is not None:
                    raise result.error
                assert result.outputs is not None
                results[result.index] = result.outputs[model.output_name]
            ok(f"{len(inputs)} confidential documents classified in {time.perf_counter() - started:.2f}s over "
               "RabbitMQ")
        finally:
            if uploaded:  # even after a failure: never leave the model owned by a key nobody has
                await client.delete_model(model_id)
                ok(f"Magika's model deleted from every worker of {args.pool!r} with the demo's owner key, so "
                   "you can upload it from the host")
    finally:
        await client.close()
    direct = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    for index, name in enumerate(names):
        expected = direct.run(None, inputs[index])[0]
        if not np.array_equal(expected, results[index]):
            raise SystemExit(f"FAILED: {name}: the enclave's result differs from onnxruntime run directly")
        label, score = model.label(results[index])
        print(f"        {name:<18} {label:<10} {score:.3f}")
    ok("every result equals onnxruntime run directly on the same input")


async def publish_and_receive(args: argparse.Namespace, pipeline: str, recipient: Any) -> tuple[dict, dict, dict]:
    """Publish the sample documents as sealed events; the results, read as their recipient."""
    from enclaveq import AsyncEventPublisher, AsyncResultSubscriber
    from enclaveq.pipeline_examples import magika_event

    events = {name: {"content": magika_event(data)} for name, data in SAMPLE_DOCUMENTS.items()}
    async with AsyncResultSubscriber(args.mqtt_broker, args.mqtt_pool, str(args.policy), pipeline,
                                     recipient) as subscriber:
        async with AsyncEventPublisher(args.mqtt_broker, args.mqtt_pool, str(args.policy), pipeline) as publisher:
            ids = {await publisher.publish(inputs): name for name, inputs in events.items()}
        ok(f"{len(ids)} sealed events published fire-and-forget over MQTT 5")
        got: dict[str, Any] = {}
        while len(got) < len(ids):
            result = await subscriber.receive(timeout=60)
            if result.event_id in ids:
                got[result.event_id] = result
    return got, ids, events


async def pipeline_over_mqtt(args: argparse.Namespace) -> None:
    from enclaveq.pipeline_examples import run_directly, write_example
    from protocol.pipeline import load_pipeline_toml

    recipient = crypto.generate_private_key()
    with tempfile.TemporaryDirectory(prefix="enclaveq-demo-") as scratch:
        toml = write_example("document", Path(scratch) / "document", [crypto.public_bytes(recipient).hex()])
        spec, _ = load_pipeline_toml(toml)
        client = await attested(args.mqtt_broker, args.mqtt_pool, args.policy, args.wait,
                                owner_key=generate_signing_key())
        try:
            held = {m.model_id for m in await client.list_models()}
            pipeline = await client.create_pipeline(toml)
            ours = [m for m in dict.fromkeys(spec.model_ids) if m not in held]  # create_pipeline uploaded these
            try:
                ok(f"pool {args.mqtt_pool!r} on Mosquitto attested; document pipeline {pipeline[:16]}… created "
                   "(raw bytes -> Magika features -> Magika -> label, all inside the enclave)")
                got, ids, events = await publish_and_receive(args, pipeline, recipient)
            finally:  # even after a failure: never leave what only the demo's forgotten key could delete
                await client.delete_pipeline(pipeline)
                for model_id in ours:
                    await client.delete_model(model_id)
                ok(f"the pipeline and the {len(ours)} stage models it uploaded deleted from {args.mqtt_pool!r}")
        finally:
            await client.close()
        for event_id, result in got.items():
            name = ids[event_id]
            expected = run_directly(toml, events[name])
            for output, value in expected.items():
                if not np.array_equal(np.asarray(value), np.asarray(result.outputs[output])):
                    raise SystemExit(f"FAILED: {name}: pipeline output {output!r} differs from the chain run directly")
            label = np.asarray(result.outputs["label"]).reshape(-1)[0]
            print(f"        {name:<18} {label}")
        ok("every result opened with the recipient key, came from the attested pool and equals the chain run "
           "directly")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", required=True, help="AMQP URL of the stack's RabbitMQ")
    parser.add_argument("--pool", required=True, help="the RabbitMQ pool")
    parser.add_argument("--mqtt-broker", help="MQTT URL of the stack's Mosquitto (omit: no pipeline part)")
    parser.add_argument("--mqtt-pool", default="events", help="the Mosquitto pool")
    parser.add_argument("--policy", required=True, type=Path, help="the policy the init service wrote")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for each pool to attest")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while not args.policy.exists():  # init writes it; never wait forever
        if time.monotonic() > deadline:
            print(f"FAILED: no policy at {args.policy}", file=sys.stderr)
            return 1
        await asyncio.sleep(1)
    print("enclaveq compose demo")
    print(f"  !!  {SIMULATION}")
    try:
        await jobs_over_rabbitmq(args)
        if args.mqtt_broker:
            await pipeline_over_mqtt(args)
    except EnclaveqError as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("demo passed: every job and event was verified")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

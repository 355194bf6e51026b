"""P1 / P10 on MQTT: models, inputs, outputs and error messages cross Mosquitto only as ciphertext.

A spy -- a plain aiomqtt client, MQTT 5, its own client id, clean session -- subscribes to `#` at
QoS 1 for the whole flow. `#` matches every publish to a non-`$` topic, including the jobs topic
the workers consume through `$share/...`, the control channel, the reply topics and the dead
letters. The test runs a whole flow (attest, upload a model, a batch, an error, a key rotation
and a job under the new key) and searches every captured payload, topic name and MQTT 5
property value (user properties, correlation data, response topic) for the plaintext bytes of
the model, the inputs, the outputs and the error message. A canary published in clear proves
the capture works.

The broker is a private Mosquitto: a `#` subscriber on the shared one would see other tests'
traffic, and would make every publish there routable (no more "no matching subscribers"), which
changes what the workers of tests running alongside observe. The private broker, and every
session and retained message of the pool, goes when the test ends.
"""

from __future__ import annotations

import numpy as np
import pytest

from broker_adapters import Message
from producer_sdk import AsyncClient
from producer_sdk.errors import BadInput

from .support import mlp_model, running_worker, wait_until, windows


async def test_mqtt_carries_no_plaintext_model_input_output_or_error(private_mosquitto, pool, tee, mqtt_spy,
                                                                    lone_founder):
    spy = mqtt_spy
    url = private_mosquitto.url
    model = mlp_model(seed=5)
    rng = np.random.default_rng(99)
    inputs = [{"x": rng.standard_normal((8, 4)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}
              for _ in range(6)]
    outputs: list[dict[str, np.ndarray]] = []
    # The founder's requests for members reach only the spy (see lone_founder).
    async with running_worker(tee, url, pool) as worker:
        async with AsyncClient(url, pool, tee.policy(), timeout=60) as client:
            model_id = await client.upload_model(model)
            # Three jobs in one frame (submit's default), two one message each.
            for part, frames in ((inputs[:3], None), (inputs[3:5], False)):
                async for result in client.submit(model_id, part, frames=frames):
                    assert result.outputs is not None, result.error
                    outputs.append(result.outputs)
            with pytest.raises(BadInput) as refused:
                await client.run(model_id, {"x": inputs[0]["x"]})
            # The new epoch key travels to the members on the control channel; a job sealed to it follows.
            epoch, _ = await client.rotate_pool(grace_seconds=60)
            assert epoch == 2 and worker.keyring.epoch == 2
            outputs.append(await client.run(model_id, inputs[5]))
            assert client.statement is not None and client.statement.epoch == 2
            # Published last, in clear. Mosquitto queues a publish to every matching subscriber as
            # it routes it, so the spy had every reply above queued before the client got it, and
            # the canary after them: once the canary is in, the whole flow is.
            canary = b"CANARY-plaintext-" + rng.bytes(16)
            broker, core = client._broker, client._core
            assert broker is not None and core is not None
            await broker.publish_reply(core.reply_to, Message(body=canary))
            await wait_until(lambda: spy.saw(lambda c: c.payload == canary),
                             "the spy saw no canary: the test would prove nothing")

    captured = list(spy.captured)
    carried = b"\n".join(value for c in captured for value in c.values())
    topics = {c.topic for c in captured}
    # What the workers consume through `$share/...` and the control channel reached the spy too.
    assert {f"enclaveq/{pool}/jobs", f"enclaveq/{pool}/control"} <= topics
    assert sum(c.topic == f"enclaveq/{pool}/jobs" for c in captured) >= 5  # 1 frame, 2 + 2 jobs
    assert any(c.properties for c in captured), "no MQTT 5 property captured: the test would prove nothing"
    secrets = {"model": model, "error message": str(refused.value).split(": ", 1)[1].encode()}
    for i, job in enumerate(inputs):
        for name, value in job.items():
            secrets[f"input {i} {name}"] = value.tobytes()
    for i, output in enumerate(outputs):
        secrets[f"output {i} logits"] = output["logits"].tobytes()
    for what, data in secrets.items():
        for window in windows(data):
            # Hex too: the adapter writes bytes headers into user properties as hex text.
            for form in (window, window.hex().encode()):
                assert form not in carried, f"plaintext of the {what} crossed Mosquitto"

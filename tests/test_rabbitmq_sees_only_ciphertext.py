"""P1 / P10 on a real broker: models, inputs, outputs and error messages cross RabbitMQ only as
ciphertext.

RabbitMQ's firehose tracer (`rabbitmqctl trace_on`) copies every message published and
delivered in the vhost to the `amq.rabbitmq.trace` exchange. The test binds a queue to it,
runs a whole flow (attest, upload a model, run jobs, receive results, provoke an error), and
searches every captured body and header for the plaintext bytes of the model, the inputs and
the outputs. A canary published in clear proves the capture works.
"""

from __future__ import annotations


import numpy as np
import pytest

from broker_adapters import Message
from producer_sdk import AsyncClient
from producer_sdk.errors import BadInput

from .support import mlp_model, running_worker, wait_until, windows



async def test_rabbitmq_carries_no_plaintext_model_input_output_or_error(rabbitmq_url, pool, tee, firehose):
    model = mlp_model(seed=5)
    rng = np.random.default_rng(99)
    inputs = [{"x": rng.standard_normal((8, 4)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}
              for _ in range(5)]
    outputs = []
    async with running_worker(tee, rabbitmq_url, pool):
        async with AsyncClient(rabbitmq_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(model)
            # Three jobs in one frame (submit's default), two one message each.
            for part, frames in ((inputs[:3], None), (inputs[3:], False)):
                async for result in client.submit(model_id, part, frames=frames):
                    outputs.append(result.outputs)
            with pytest.raises(BadInput) as refused:
                await client.run(model_id, {"x": inputs[0]["x"]})
            # Published last, in clear: the tracer copies messages as RabbitMQ routes and delivers
            # them, so once the canary's copy is in, the copies of the whole flow above are too.
            canary = b"CANARY-plaintext-" + rng.bytes(16)
            await client._broker.publish_reply(client._core.reply_to, Message(body=canary))
            await wait_until(lambda: any(canary in body for body in firehose),
                             "the firehose capture saw nothing: the test would prove nothing")

    carried = b"\n".join(firehose)
    assert canary in carried, "the firehose capture saw nothing: the test would prove nothing"
    assert len(firehose) > 20
    secrets = {"model": model, "error message": str(refused.value).split(": ", 1)[1].encode()}
    for i, job in enumerate(inputs):
        for name, value in job.items():
            secrets[f"input {i} {name}"] = value.tobytes()
    for i, result in enumerate(outputs):
        secrets[f"output {i} logits"] = result["logits"].tobytes()
    for what, data in secrets.items():
        for window in windows(data):
            assert window not in carried, f"plaintext of the {what} crossed RabbitMQ"

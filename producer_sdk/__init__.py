"""The producer SDK: attest a pool, upload models, run jobs, all sealed end to end.

    from producer_sdk import Client
    with Client("amqp://guest:guest@127.0.0.1:5672/", "my-pool", "policy.toml") as client:
        model_id = client.upload_model("model.onnx")
        outputs = client.run(model_id, {"x": array})

Pipelines: ``Client.create_pipeline("pipeline.toml")``, then ``EventPublisher`` publishes events
and ``ResultSubscriber`` reads the results sealed to a recipient key (their asyncio twins:
``AsyncEventPublisher``, ``AsyncResultSubscriber``).
"""

from .async_client import AsyncClient, JobResult
from .client import Client
from .errors import *  # noqa: F401,F403  (the error tree is part of the public API)
from .errors import __doc__ as _errors_doc  # noqa: F401
from .events import AsyncEventPublisher, EventPublisher
from .framing import FrameSettings
from .journal import BatchJournal
from .results import AsyncResultSubscriber, ResultSubscriber

__all__ = ["AsyncClient", "AsyncEventPublisher", "AsyncResultSubscriber", "BatchJournal", "Client", "EventPublisher",
           "FrameSettings", "JobResult", "ResultSubscriber"]

"""enclaveq: confidential ONNX inference as an asynchronous job system.

The public Python API is what this package exports (``__all__``); everything else may change::

    import numpy as np
    from enclaveq import Client

    with Client("amqp://guest:guest@127.0.0.1:5672/", "my-pool", "policy.toml") as client:
        print(client.claims)                      # verified before anything was sent
        model_id = client.upload_model("model.onnx")
        outputs = client.run(model_id, {"x": np.ones((1, 4), np.float32)})

``AsyncClient`` has the same methods for asyncio.

Pipelines (docs/pipelines.md): an owner creates one from a pipeline.toml, devices publish events
fire-and-forget, and only the listed recipients read the results::

    from enclaveq import Client, EventPublisher, ResultSubscriber

    with Client(BROKER, "my-pool", "policy.toml") as client:
        pipeline = client.create_pipeline("pipeline.toml")
    with EventPublisher(BROKER, "my-pool", "policy.toml", pipeline) as publisher:
        publisher.publish("Hello, my dog is cute")
    with ResultSubscriber(BROKER, "my-pool", "policy.toml", pipeline, key="recipient.key") as results:
        for result in results:
            print(result.event_id, result.outputs)

``AsyncEventPublisher`` and ``AsyncResultSubscriber`` are their asyncio twins. The system itself lives in the sibling library
packages (``attestation``, ``broker_adapters``, ``enclave_worker``, ``producer_sdk``,
``protocol``), which never import this one; this package adds the command line and the demo.

Errors a producer sees::

    EnclaveqError                  every error the SDK raises (see producer_sdk.errors for the tree)
     ├── BrokerUnreachable, AttestationFailed (└── NoWorkerAnswered, EpochRollback), JobTimeout, ClientClosed
     ├── BatchJournalError                         (a resumable batch's journal: damaged, another batch's)
     ├── EventTopicError, InboxNotFound            (publishers, subscribers)
     └── JobError (code = the worker's error code; event_id for events)
          └── UnknownModel, ModelRejected, BadInput, Oversized, JobExpired, RequestTampered,
              RotationRefused, NotOwner, NotAllowed, BadSignature, UnknownPipeline,
              PipelineRejected, WorkerFailure
    PolicyError                    a policy file or object is unusable (load_policy, Client(policy=...))
    KeyFileError                   a key file is missing, unreadable or not the kind of key expected
    PipelineError                  a pipeline.toml breaks a rule (the SDK raises PipelineRejected)
"""

from importlib import metadata as _metadata

from attestation.claims import Claims
from attestation.errors import PolicyError
from attestation.policy import Policy, load_policy
from producer_sdk import (
    AsyncClient, AsyncEventPublisher, AsyncResultSubscriber, BatchJournal, Client, EventPublisher, FrameSettings,
    JobResult, ResultSubscriber,
)
from producer_sdk.errors import (
    AttestationFailed,
    BadInput,
    BadSignature,
    BatchJournalError,
    BrokerUnreachable,
    ClientClosed,
    EnclaveqError,
    EpochRollback,
    EventTopicError,
    InboxNotFound,
    JobError,
    JobExpired,
    JobTimeout,
    ModelRejected,
    NoWorkerAnswered,
    NotAllowed,
    NotOwner,
    Oversized,
    PipelineRejected,
    RequestTampered,
    RotationRefused,
    UnknownModel,
    UnknownPipeline,
    WorkerFailure,
)
from producer_sdk.results import generate_recipient_key, load_recipient_key, recipient_public_key, save_recipient_key
from protocol.bodies import MemberStatus, ModelInfo, PipelineInfo
from protocol.errors import KeyFileError
from protocol.pipeline import PipelineError, PipelineSpec, load_pipeline_toml
from protocol.results import PipelineResult
from protocol.ownership import generate_signing_key, load_signing_key, parse_public_key, public_key_bytes, save_signing_key

try:
    __version__ = _metadata.version("enclaveq")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "__version__",
    # clients
    "AsyncClient",
    "Client",
    "BatchJournal",
    "FrameSettings",
    "JobResult",
    "ModelInfo",
    "MemberStatus",
    # pipelines: definitions, publishers, recipients
    "PipelineSpec",
    "PipelineInfo",
    "PipelineResult",
    "load_pipeline_toml",
    "EventPublisher",
    "AsyncEventPublisher",
    "ResultSubscriber",
    "AsyncResultSubscriber",
    # attestation policy
    "Claims",
    "Policy",
    "load_policy",
    # Ed25519 keys: owner keys sign uploads and deletes, producer keys prove who runs a job
    "generate_signing_key",
    "load_signing_key",
    "save_signing_key",
    "public_key_bytes",
    "parse_public_key",
    # X25519 recipient keys: results are sealed to them
    "generate_recipient_key",
    "load_recipient_key",
    "save_recipient_key",
    "recipient_public_key",
    # errors
    "EnclaveqError",
    "BatchJournalError",
    "BrokerUnreachable",
    "AttestationFailed",
    "NoWorkerAnswered",
    "EpochRollback",
    "JobError",
    "UnknownModel",
    "ModelRejected",
    "BadInput",
    "Oversized",
    "JobExpired",
    "RequestTampered",
    "RotationRefused",
    "NotOwner",
    "NotAllowed",
    "BadSignature",
    "UnknownPipeline",
    "PipelineRejected",
    "WorkerFailure",
    "EventTopicError",
    "InboxNotFound",
    "JobTimeout",
    "ClientClosed",
    "PolicyError",
    "KeyFileError",
    "PipelineError",
]

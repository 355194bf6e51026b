"""enclaveq: confidential ONNX inference as an asynchronous job system.

The public Python API is what this package exports (``__all__``); everything else may change::

    import numpy as np
    from enclaveq import Client

    with Client("amqp://guest:guest@127.0.0.1:5672/", "my-pool", "policy.toml") as client:
        print(client.claims)                      # verified before anything was sent
        model_id = client.upload_model("model.onnx")
        outputs = client.run(model_id, {"x": np.ones((1, 4), np.float32)})

``AsyncClient`` has the same methods for asyncio. The system itself lives in the sibling library
packages (``attestation``, ``broker_adapters``, ``enclave_worker``, ``producer_sdk``,
``protocol``), which never import this one; this package adds the command line and the demo.

Errors a producer sees::

    EnclaveqError                  every error the SDK raises (see producer_sdk.errors for the tree)
     ├── BrokerUnreachable, AttestationFailed (└── NoWorkerAnswered, EpochRollback), JobTimeout, ClientClosed
     └── JobError (code = the worker's error code)
          └── UnknownModel, ModelRejected, BadInput, Oversized, JobExpired, RequestTampered,
              RotationRefused, NotOwner, NotAllowed, BadSignature, WorkerFailure
    PolicyError                    a policy file or object is unusable (load_policy, Client(policy=...))
    KeyFileError                   a key file is missing, unreadable or not an Ed25519 key
"""

from importlib import metadata as _metadata

from attestation.claims import Claims
from attestation.errors import PolicyError
from attestation.policy import Policy, load_policy
from producer_sdk import AsyncClient, Client, JobResult
from producer_sdk.errors import (
    AttestationFailed,
    BadInput,
    BadSignature,
    BrokerUnreachable,
    ClientClosed,
    EnclaveqError,
    EpochRollback,
    JobError,
    JobExpired,
    JobTimeout,
    ModelRejected,
    NoWorkerAnswered,
    NotAllowed,
    NotOwner,
    Oversized,
    RequestTampered,
    RotationRefused,
    UnknownModel,
    WorkerFailure,
)
from protocol.bodies import ModelInfo
from protocol.errors import KeyFileError
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
    "JobResult",
    "ModelInfo",
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
    # errors
    "EnclaveqError",
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
    "WorkerFailure",
    "JobTimeout",
    "ClientClosed",
    "PolicyError",
    "KeyFileError",
]

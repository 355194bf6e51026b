"""Shared fixtures: which real brokers and vectors are available, and how to treat their absence.

Without ENCLAVEQ_REQUIRE_BROKERS / ENCLAVEQ_VECTORS a missing RabbitMQ, Mosquitto or vector
folder skips the tests that need it, with the reason. With them (as `.ci/run` sets) the same
absence is a failure, so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

RABBITMQ_URL = os.environ.get("ENCLAVEQ_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
MOSQUITTO_URL = os.environ.get("ENCLAVEQ_MQTT_URL", "mqtt://127.0.0.1:1883/")
REQUIRE_BROKERS = os.environ.get("ENCLAVEQ_REQUIRE_BROKERS") == "1"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _need(available: bool, what: str) -> None:
    if available:
        return
    if REQUIRE_BROKERS:
        pytest.fail(f"{what} is required (ENCLAVEQ_REQUIRE_BROKERS=1) but not reachable")
    pytest.skip(f"{what} not reachable; set ENCLAVEQ_REQUIRE_BROKERS=1 to make this a failure")


@pytest.fixture
def rabbitmq_url() -> str:
    _need(_listening("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672")
    return RABBITMQ_URL


@pytest.fixture
def mosquitto_url() -> str:
    _need(_listening("127.0.0.1", 1883), "Mosquitto on 127.0.0.1:1883")
    return MOSQUITTO_URL


@pytest.fixture
def vectors_dir() -> Path:
    configured = os.environ.get("ENCLAVEQ_VECTORS")
    path = Path(configured) if configured else Path(__file__).resolve().parents[1] / ".." / "shared" / "vectors"
    if path.is_dir():
        return path.resolve()
    if configured:
        pytest.fail(f"ENCLAVEQ_VECTORS={configured} is not a directory")
    pytest.skip("attestation vectors not found; set ENCLAVEQ_VECTORS=../shared/vectors")


@pytest.fixture
def unique_name() -> str:
    """A pool or queue name no other test run (or CI run on the same brokers) will use."""
    return f"t-{uuid.uuid4().hex[:12]}"

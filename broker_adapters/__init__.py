"""Broker adapters: one async contract (``base``), one adapter per broker, picked by URL.

``open_broker(url)`` is the only constructor the rest of enclaveq needs::

    async with open_broker("amqp://guest:guest@127.0.0.1/") as broker:
        await broker.declare_pool("resnet")

Schemes: ``memory://NAME`` (in-process, shared by every adapter opened with the same NAME in
this process, across event loops; ``memory://`` is NAME "default"), ``amqp://`` and
``amqps://`` (RabbitMQ 3.10+), ``mqtt://`` and ``mqtts://`` (MQTT 5, written against Mosquitto 2.0).
"""

from __future__ import annotations

from .base import BrokerAdapter, Delivery, Handler, HeaderValue, Message, PoolLock, PoolSettings, Subscription
from .urls import check_broker_url, redact_url
from .errors import (
    BrokerError,
    BrokerUnavailable,
    PoolBusy,
    PublishFailed,
    PublishRefused,
    PublishTimeout,
    QueueNotFound,
    Unroutable,
    UnsupportedBrokerURL,
)


def open_broker(url: str) -> BrokerAdapter:
    """Return an unconnected adapter for ``url``; use it as ``async with open_broker(url)``."""
    scheme = check_broker_url(url)
    if scheme == "memory":
        from .memory import MemoryBroker

        name = url.split("://", 1)[1].strip("/") or "default"
        return MemoryBroker(url, name)
    if scheme in ("amqp", "amqps"):
        from .amqp import AmqpBroker

        return AmqpBroker(url)
    from .mqtt import MqttBroker

    return MqttBroker(url)


__all__ = [
    "open_broker",
    "redact_url",
    "check_broker_url",
    "BrokerAdapter",
    "Delivery",
    "Handler",
    "HeaderValue",
    "Message",
    "PoolLock",
    "PoolSettings",
    "Subscription",
    "BrokerError",
    "BrokerUnavailable",
    "PoolBusy",
    "PublishFailed",
    "PublishRefused",
    "PublishTimeout",
    "QueueNotFound",
    "Unroutable",
    "UnsupportedBrokerURL",
]

"""A spy on every MQTT topic: what a broker operator (or anyone allowed to subscribe to `#`) sees.

``Spy`` keeps every PUBLISH it receives -- topic, payload and every MQTT 5 property value -- so a
test can assert that no window of a plaintext appears anywhere on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiomqtt
from paho.mqtt.properties import Properties


@dataclass
class Captured:
    """One PUBLISH as the spy received it: the topic and every value it carried, as bytes."""

    topic: str
    payload: bytes
    properties: list[bytes] = field(default_factory=list)

    def values(self) -> list[bytes]:
        return [self.topic.encode(), self.payload, *self.properties]


def property_values(properties: Properties | None) -> list[bytes]:
    """Every MQTT 5 property value of a PUBLISH, whatever its name: strings UTF-8 encoded, binary
    data as is, each user property's key and value on its own."""
    if properties is None:
        return []
    values: list[bytes] = []
    for name in properties.names:
        attribute = name.replace(" ", "")
        if not hasattr(properties, attribute):
            continue
        value = getattr(properties, attribute)
        pairs = value if attribute == "UserProperty" else [value]
        for item in pairs:
            for part in item if isinstance(item, tuple) else (item,):
                values.append(part if isinstance(part, bytes) else str(part).encode())
    return values


class Spy:
    """A clean-session MQTT 5 client subscribed to `#` at QoS 1, keeping what it receives."""

    def __init__(self, host: str, port: int) -> None:
        self.client = aiomqtt.Client(host, port, identifier=f"spy-{uuid.uuid4().hex}",
                                     protocol=aiomqtt.ProtocolVersion.V5, clean_start=True)
        self.captured: list[Captured] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.client.__aenter__()
        # QoS 1: the broker keeps each message for the spy until the spy's client acknowledges it.
        await self.client.subscribe("#", qos=1)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            self.captured.append(Captured(message.topic.value, payload, property_values(message.properties)))

    def saw(self, predicate: Callable[[Captured], bool]) -> bool:
        return any(predicate(c) for c in self.captured)

    async def stop(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.unsubscribe("#")
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.client.__aexit__(None, None, None)

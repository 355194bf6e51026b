"""Broker URLs are shown only through one redactor, which hides the whole userinfo (P10)."""

from __future__ import annotations

import pytest

from broker_adapters import UnsupportedBrokerURL, open_broker, redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("amqp://guest:guest@127.0.0.1:5672/", "amqp://***@127.0.0.1:5672/"),
    ("amqp://guest:p@ssW0rd@host/", "amqp://***@host/"),          # a raw @ in the password
    ("amqps://u:p%40ss@host:5671/vhost?heartbeat=5", "amqps://***@host:5671/vhost?heartbeat=5"),
    ("mqtt://token@broker", "mqtt://***@broker"),                  # a user name alone can be a secret
    ("amqp://host/path@with-at", "amqp://host/path@with-at"),      # an @ after the authority is not userinfo
    ("memory://pool", "memory://pool"),
    ("not a url", "not a url"),
])
def test_the_whole_userinfo_is_hidden(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("secret", ["p@ssW0rd", "s3cr3t", "a:b@c"])
def test_no_part_of_a_password_survives(secret):
    assert secret not in redact_url(f"amqp://user:{secret}@host/") and "ssW0rd" not in redact_url(
        f"amqp://user:{secret}@host/")


async def test_a_connection_error_names_the_broker_without_its_password():
    broker = open_broker("amqp://guest:p@ssW0rd@127.0.0.1:1/")
    with pytest.raises(Exception) as caught:
        await broker.connect()
    assert "ssW0rd" not in str(caught.value) and "ssW0rd" not in repr(broker)


def test_an_unknown_scheme_is_refused_without_echoing_the_url():
    with pytest.raises(UnsupportedBrokerURL) as caught:
        open_broker("redis://user:hunter2@host/")
    assert "hunter2" not in str(caught.value)

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


# -- a RabbitMQ cluster given as a list of node URLs ---------------------------------------------

def test_every_password_of_a_node_list_is_hidden_even_one_holding_a_comma():
    urls = "amqp://u:p,w@node1:5672/,amqp://u:s@cr@node2:5673/, amqp://v:t%2C@node3:5674/"
    shown = redact_url(urls)
    assert shown == "amqp://***@node1:5672/,amqp://***@node2:5673/,amqp://***@node3:5674/"
    for secret in ("p,w", "s@cr", "t%2C"):
        assert secret not in shown


def test_a_node_list_splits_only_where_another_url_begins():
    from broker_adapters.urls import split_broker_urls

    assert split_broker_urls("amqp://u:p,w@a:1/,amqp://u:p@b:2/") == ["amqp://u:p,w@a:1/", "amqp://u:p@b:2/"]
    assert split_broker_urls("amqp://u:p@a:1/") == ["amqp://u:p@a:1/"]


@pytest.mark.parametrize("urls, says", [
    ("amqp://a:1/,mqtt://b:2/", "share one scheme"),
    ("mqtt://a:1/,mqtt://b:2/", "only AMQP takes a list"),
    ("amqp://u:secret@a:1/,amqp://u:secret@b:notaport/", "not a number"),
])
def test_a_bad_node_list_is_refused_without_echoing_a_password(urls, says):
    from broker_adapters import check_broker_url

    with pytest.raises(UnsupportedBrokerURL, match=says) as refused:
        check_broker_url(urls)
    assert "secret" not in str(refused.value)

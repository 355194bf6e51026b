"""``mqtts://`` with a user name, a password and a client certificate (issue 10).

The parser is I/O-free and refuses every malformed URL with one line that never shows the
userinfo; ``ssl_context()`` names the option, the path and the reason for any unusable file.
Against a private Mosquitto whose TLS listener wants both a client certificate and a password,
a job and its reply make the round trip, and each missing credential fails as
``BrokerUnavailable``. Certificates are made here with ``cryptography``: no network, no openssl.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker_adapters import BrokerUnavailable, Delivery, Message, UnsupportedBrokerURL, open_broker
from broker_adapters.mqtt_url import MqttEndpoint, parse_mqtt_url

from .conftest import _need
from .mosquitto import PrivateMosquitto, free_port
from .support import TIMEOUT

USER = "enclaveq-worker"
PASSWORD = "s3cr3t-PW"  # the string no error message may contain
CONNECT_TIMEOUT = 15.0  # a refused connection must fail well within this, never hang


# -- the parser ---------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "endpoint"), [
    ("mqtt://127.0.0.1/", MqttEndpoint("127.0.0.1", 1883)),
    ("mqtt://broker.example", MqttEndpoint("broker.example", 1883)),
    ("MQTT://user@broker:1884/", MqttEndpoint("broker", 1884, username="user")),
    ("mqtt://u%40x:p%3Aw%2F%3F%23%25@host/", MqttEndpoint("host", 1883, username="u@x", password="p:w/?#%")),
    ("mqtt://user:p@ss@host/", MqttEndpoint("host", 1883, username="user", password="p@ss")),  # as redact_url
    ("mqtt://user:@host/", MqttEndpoint("host", 1883, username="user", password="")),
    ("mqtt://[::1]:1999/", MqttEndpoint("::1", 1999)),
    ("mqtts://host/", MqttEndpoint("host", 8883, tls=True)),
    ("mqtts://user:pass@127.0.0.1:8883/?cafile=/etc/ca.pem&certfile=/c/client.pem&keyfile=/c/client.key",
     MqttEndpoint("127.0.0.1", 8883, username="user", password="pass", tls=True, cafile="/etc/ca.pem",
                  certfile="/c/client.pem", keyfile="/c/client.key")),
    ("mqtts://host?certfile=/c/both.pem", MqttEndpoint("host", 8883, tls=True, certfile="/c/both.pem")),
    ("mqtts://host/?cafile=/my%20certs/ca+1.pem", MqttEndpoint("host", 8883, tls=True, cafile="/my certs/ca+1.pem")),
])
def test_a_valid_url_names_the_endpoint(url, endpoint):
    parsed = parse_mqtt_url(url)
    assert parsed == endpoint
    assert (parsed.username, parsed.password) == (endpoint.username, endpoint.password)


@pytest.mark.parametrize(("url", "says"), [
    ("amqp://user:SECRET@host/", "mqtt:// or mqtts://"),
    ("user:SECRET@host", "mqtt:// or mqtts://"),
    ("mqtt:/user:SECRET@host", "mqtt:// or mqtts://"),
    ("mqtt://user:SECRET@host:88x3/", "port"),
    ("mqtt://user:SECRET@host:0/", "port"),
    ("mqtt://user:SECRET@host:65536/", "port"),
    ("mqtt://user:SECRET@host:+1883/", "port"),
    ("mqtt://user:SECRET/", "port"),  # host forgotten: the password parses as the port
    ("mqtt://user:SECRET@/", "no host"),
    ("mqtt://user:SECRET@ho st/", "whitespace"),
    ("mqtt://user:SECRET@host_name!/", "host"),
    ("mqtt://user:SECRET@::1/", "IPv6"),
    ("mqtt://user:SECRET@[::1/", "missing its ']'"),
    ("mqtt://user:SECRET@[::1]x/", "only :port"),
    ("mqtt://user:SECRET@[not-v6]/", "IPv6"),
    ("mqtt://:SECRET@host/", "user name"),
    ("mqtt://user:SECRET%ff@host/", "password"),
    ("mqtt://user:SECRET@host/vhost", "path"),
    ("mqtt://user:SECRET@host//", "path"),
    ("mqtt://user:SECRET@host/#frag", "fragment"),
    ("mqtt://user:SE/CRET@host/", "percent-encode"),  # a raw '/' in the password
    ("mqtt://user:SE?CRET@host/", "percent-encode"),
    ("mqtt://user:SE#CRET@host/", "percent-encode"),
    ("mqtts://user:SECRET@host/?ca_file=/ca.pem", "unknown query option 'ca_file'"),
    ("mqtts://user:SECRET@host/?tls_insecure=1", "unknown query option"),
    ("mqtts://user:SECRET@host/?cafile=/a.pem&cafile=/b.pem", "twice"),
    ("mqtts://user:SECRET@host/?cafile=", "no value"),
    ("mqtts://user:SECRET@host/?cafile", "no value"),
    ("mqtts://user:SECRET@host/?cafile=/a.pem&", "empty option"),
    ("mqtts://user:SECRET@host/?cafile=/a%00.pem", "NUL"),
    ("mqtt://user:SECRET@host/?cafile=/ca.pem", "mqtts://"),
    ("mqtts://user:SECRET@host/?keyfile=/client.key", "keyfile needs certfile"),
])
def test_a_bad_url_is_refused_in_one_line_without_the_userinfo(url, says):
    with pytest.raises(UnsupportedBrokerURL) as caught:
        parse_mqtt_url(url)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message
    assert "SECRET" not in message and "CRET" not in message and "user" not in message.replace("user name", "")


def test_the_endpoint_repr_shows_no_credentials():
    endpoint = parse_mqtt_url(f"mqtts://{USER}:{PASSWORD}@host/")
    assert PASSWORD not in repr(endpoint) and USER not in repr(endpoint)


def test_plain_mqtt_has_no_tls_context():
    assert parse_mqtt_url("mqtt://host/").ssl_context() is None


def test_mqtts_verifies_the_broker_against_the_system_cas_by_default():
    context = parse_mqtt_url("mqtts://host/").ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


# -- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA with its broker and client certificates, and a CA nobody trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    elsewhere_cert: Path  # from the right CA, for a host name that is not this broker's
    elsewhere_key: Path
    encrypted_key: Path  # the client key, with a passphrase


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, names: Sequence[x509.GeneralName] = (),
          usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None,
           passphrase: bytes | None = None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        assert key is not None
        encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                      else serialization.NoEncryption())
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           encryption))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key, client_key, elsewhere_key = (_key() for _ in range(5))
    ca = _cert("enclaveq test CA", ca_key, None, ca_key, ca=True)
    other = _cert("a CA nobody trusts", other_key, None, other_key, ca=True)
    here = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = _cert("localhost", server_key, ca, ca_key, names=here, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _cert(USER, client_key, ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    elsewhere = _cert("elsewhere.example", elsewhere_key, ca, ca_key, names=[x509.DNSName("elsewhere.example")],
                      usage=ExtendedKeyUsageOID.SERVER_AUTH)
    return Pki(
        ca=_write(d / "ca.pem", ca), server_cert=_write(d / "server.pem", server),
        server_key=_write(d / "server.key", key=server_key), client_cert=_write(d / "client.pem", client),
        client_key=_write(d / "client.key", key=client_key), other_ca=_write(d / "other-ca.pem", other),
        elsewhere_cert=_write(d / "elsewhere.pem", elsewhere),
        elsewhere_key=_write(d / "elsewhere.key", key=elsewhere_key),
        encrypted_key=_write(d / "client-encrypted.key", key=client_key, passphrase=b"passphrase"),
    )


def tls_url(port: int, *, password: str = PASSWORD, **files: Path) -> str:
    query = "&".join(f"{option}={path}" for option, path in files.items())
    return f"mqtts://{USER}:{password}@127.0.0.1:{port}/" + (f"?{query}" if query else "")


# -- ssl_context(): files -------------------------------------------------------------------


def test_a_complete_client_context_loads(pki):
    url = f"mqtts://h/?cafile={pki.ca}&certfile={pki.client_cert}&keyfile={pki.client_key}"
    assert isinstance(parse_mqtt_url(url).ssl_context(), ssl.SSLContext)


@pytest.mark.parametrize(("files", "says"), [
    ({"cafile": "missing.pem"}, "cafile {cafile} does not exist"),
    ({"cafile": "."}, "cafile {cafile} is a directory"),
    ({"cafile": "client.key"}, "cafile {cafile} holds no PEM certificate"),
    ({"certfile": "missing.pem"}, "certfile {certfile} does not exist"),
    ({"certfile": "client.key", "keyfile": "client.key"}, "certfile {certfile} holds no PEM certificate"),
    ({"certfile": "client.pem"}, "certfile {certfile} holds no PEM private key; give keyfile="),
    ({"certfile": "client.pem", "keyfile": "missing.key"}, "keyfile {keyfile} does not exist"),
    ({"certfile": "client.pem", "keyfile": "ca.pem"}, "keyfile {keyfile} is not a PEM private key"),
    ({"certfile": "client.pem", "keyfile": "server.key"},
     "keyfile {keyfile} does not match the certificate in certfile {certfile}"),
    ({"certfile": "client.pem", "keyfile": "client-encrypted.key"}, "keyfile {keyfile} holds an encrypted"),
])
def test_an_unusable_file_is_named_with_its_path_and_reason(pki, files, says):
    paths = {option: pki.ca.parent / name for option, name in files.items()}
    query = "&".join(f"{option}={path}" for option, path in paths.items())
    with pytest.raises(UnsupportedBrokerURL) as caught:
        parse_mqtt_url(f"mqtts://{USER}:{PASSWORD}@h/?{query}").ssl_context()
    message = str(caught.value)
    assert says.format(**paths) in message
    assert "\n" not in message and PASSWORD not in message


def test_a_file_the_worker_cannot_read_is_named(pki, tmp_path):
    unreadable = tmp_path / "ca.pem"
    unreadable.write_bytes(pki.ca.read_bytes())
    unreadable.chmod(0)
    if os.access(unreadable, os.R_OK):
        pytest.skip("running as a user that reads any file (root)")
    with pytest.raises(UnsupportedBrokerURL, match=f"cafile {unreadable} is not readable"):
        parse_mqtt_url(f"mqtts://h/?cafile={unreadable}").ssl_context()


# -- against a TLS Mosquitto that wants a password and a client certificate -----------------


@dataclass(frozen=True)
class TlsBroker:
    port: int  # the listener with the broker's own certificate
    elsewhere_port: int  # a listener presenting a certificate for another host name


@pytest.fixture
def tls_mosquitto(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki) -> Iterator[TlsBroker]:
    request.node.add_marker("mosquitto")
    mosquitto_passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    _need(Path(mosquitto).exists() and Path(mosquitto_passwd).exists(), "mosquitto and mosquitto_passwd",
          "not installed")
    passwords = tmp_path / "passwords"
    subprocess.run([mosquitto_passwd, "-b", "-c", str(passwords), USER, PASSWORD], check=True,
                   capture_output=True, timeout=30)
    port, elsewhere_port = free_port(), free_port()
    while elsewhere_port == port:  # two binds in a row may get the same ephemeral port
        elsewhere_port = free_port()

    def listener(at: int, cert: Path, key: Path) -> str:
        return (f"listener {at} 127.0.0.1\ncafile {pki.ca}\ncertfile {cert}\nkeyfile {key}\n"
                "require_certificate true\n")

    broker = PrivateMosquitto(
        tmp_path / "mosquitto",
        listener=listener(port, pki.server_cert, pki.server_key)
        + listener(elsewhere_port, pki.elsewhere_cert, pki.elsewhere_key)
        + f"password_file {passwords}\nallow_anonymous false\n",
        # (Started as root, PrivateMosquitto keeps Mosquitto root, so it reads the password file.)
    )
    # PrivateMosquitto picks its own port before it writes the config; ours is in the listener
    # text, so start() must wait for ours (see the report: a {port} placeholder would avoid this).
    broker.port = port
    broker.start()
    yield TlsBroker(port, elsewhere_port)
    broker.stop()


class Replies:
    """A reply handler that acks and hands over each reply, awaited with a bound."""

    def __init__(self) -> None:
        self._got: asyncio.Queue[Message] = asyncio.Queue()

    async def __call__(self, delivery: Delivery) -> None:
        self._got.put_nowait(delivery.message)
        await delivery.ack()

    async def next(self) -> Message:
        return await asyncio.wait_for(self._got.get(), TIMEOUT)


@pytest.fixture
async def tls_broker(tls_mosquitto: TlsBroker, pki: Pki) -> AsyncIterator:
    url = tls_url(tls_mosquitto.port, cafile=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
    async with open_broker(url) as broker:
        yield broker


async def test_a_job_and_its_reply_round_trip_over_mqtts_with_password_and_client_certificate(
        tls_broker, unique_name):
    pool, replies_name = unique_name, f"{unique_name}-replies"
    await tls_broker.declare_pool(pool)
    address = await tls_broker.declare_reply_queue(replies_name)

    async def worker(delivery: Delivery) -> None:
        job = delivery.message
        await tls_broker.publish_reply(job.reply_to, Message(body=b"sealed-result", correlation_id=job.correlation_id))
        await delivery.ack()

    replies = Replies()
    subs = [await tls_broker.consume_jobs(pool, worker), await tls_broker.consume_replies(replies_name, replies)]
    try:
        await tls_broker.publish_job(pool, Message(body=b"sealed-job", message_id="job-1", correlation_id="c-1",
                                                   reply_to=address))
        reply = await replies.next()
        assert (reply.correlation_id, reply.body) == ("c-1", b"sealed-result")
    finally:
        for sub in subs:
            await sub.cancel()
        await tls_broker.delete_reply_queue(replies_name)
        await tls_broker.delete_pool(pool)


async def refused(url: str) -> str:
    """The one-line ``BrokerUnavailable`` that connecting to ``url`` fails with, within a bound."""
    with pytest.raises(BrokerUnavailable) as caught:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            async with open_broker(url):
                pass
    message = str(caught.value)
    assert "\n" not in message and PASSWORD not in message and "wrong-password" not in message
    return message


async def test_a_wrong_password_is_refused(tls_mosquitto, pki):
    await refused(tls_url(tls_mosquitto.port, password="wrong-password", cafile=pki.ca,
                          certfile=pki.client_cert, keyfile=pki.client_key))


async def test_a_broker_certificate_from_another_ca_is_refused(tls_mosquitto, pki):
    message = await refused(tls_url(tls_mosquitto.port, cafile=pki.other_ca, certfile=pki.client_cert,
                                    keyfile=pki.client_key))
    assert "CERTIFICATE_VERIFY_FAILED" in message


async def test_a_broker_certificate_for_another_host_name_is_refused(tls_mosquitto, pki):
    message = await refused(tls_url(tls_mosquitto.elsewhere_port, cafile=pki.ca, certfile=pki.client_cert,
                                    keyfile=pki.client_key))
    assert "CERTIFICATE_VERIFY_FAILED" in message


async def test_a_client_without_a_certificate_is_refused(tls_mosquitto, pki):
    await refused(tls_url(tls_mosquitto.port, cafile=pki.ca))


async def test_a_client_without_a_certificate_is_told_why_at_once(tls_mosquitto, pki):
    loop = asyncio.get_running_loop()
    started = loop.time()
    message = await refused(tls_url(tls_mosquitto.port, cafile=pki.ca))
    assert loop.time() - started < 5.0
    assert "certificate required" in message

"""What an ``mqtt://`` or ``mqtts://`` URL says: host, port, credentials and TLS settings.

::

    mqtt://[user[:password]@]host[:port][/]                        port 1883, no TLS
    mqtts://[user[:password]@]host[:port][/][?cafile=..&certfile=..&keyfile=..]   port 8883

``parse_mqtt_url`` is I/O-free: it validates the URL and raises ``UnsupportedBrokerURL`` with one
line that never contains the userinfo (user names can be tokens, so neither part is echoed).
``MqttEndpoint.ssl_context()`` reads the certificate files and builds the context every
connection uses; TLS always verifies the broker's certificate and host name (no option turns
that off).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import unquote

from .errors import UnsupportedBrokerURL

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
TLS_OPTIONS = ("cafile", "certfile", "keyfile")

# A DNS name or an IPv4 address; IPv6 comes in brackets and is checked by ``ipaddress``.
_HOST = re.compile(r"[A-Za-z0-9._-]+")
_ALLOWED = ", ".join(TLS_OPTIONS)


@dataclass(frozen=True)
class MqttEndpoint:
    """Where and how to connect: ``ssl_context()`` is ``None`` for plain ``mqtt://``."""

    host: str
    port: int
    # Secrets stay out of repr(): an endpoint may end up in a log line or a traceback.
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context that verifies the broker (``cafile``, else the system CAs) and
        presents ``certfile``/``keyfile`` when given; at least TLS 1.2. Unusable files raise
        ``UnsupportedBrokerURL`` naming the option, the path and the reason."""
        if not self.tls:
            return None
        for option, path in (("cafile", self.cafile), ("certfile", self.certfile), ("keyfile", self.keyfile)):
            if path is not None:
                _check_readable(option, path)
        try:
            # create_default_context: CERT_REQUIRED and check_hostname; a cafile replaces the
            # system CAs rather than adding to them (a private CA pins the broker).
            context = ssl.create_default_context(cafile=self.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise _file_error("cafile", self.cafile or "", exc) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certfile is not None:
            self._load_client_certificate(context, self.certfile)
        return context

    def _load_client_certificate(self, context: ssl.SSLContext, certfile: str) -> None:
        try:
            # Parses only the certificates: tells "certfile is not a PEM certificate" apart from
            # key problems, which load_cert_chain reports alike as "PEM lib".
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=certfile)
        except (OSError, ssl.SSLError) as exc:
            raise _file_error("certfile", certfile, exc) from None
        try:
            # The callback answers OpenSSL's passphrase request: without it an encrypted key
            # makes OpenSSL prompt on the terminal, which hangs a worker started as a service.
            context.load_cert_chain(certfile, self.keyfile, password=_refuse_passphrase)
        except _EncryptedKey:
            option, path = ("keyfile", self.keyfile) if self.keyfile else ("certfile", certfile)
            raise UnsupportedBrokerURL(
                f"MQTT broker URL: {option} {path} holds an encrypted private key; "
                "give an unencrypted key (protected by file permissions)"
            ) from None
        except ssl.SSLError as exc:  # before OSError, of which it is a subclass
            if exc.reason == "KEY_VALUES_MISMATCH":
                where = f"keyfile {self.keyfile}" if self.keyfile else f"the key in certfile {certfile}"
                raise UnsupportedBrokerURL(
                    f"MQTT broker URL: {where} does not match the certificate in certfile {certfile}"
                ) from None
            if self.keyfile is None:
                raise UnsupportedBrokerURL(
                    f"MQTT broker URL: certfile {certfile} holds no PEM private key; give keyfile="
                ) from None
            raise UnsupportedBrokerURL(
                f"MQTT broker URL: keyfile {self.keyfile} is not a PEM private key ({_ssl_reason(exc)})"
            ) from None
        except OSError as exc:
            raise _file_error("keyfile", self.keyfile or certfile, exc) from None


class _EncryptedKey(Exception):
    pass


def _refuse_passphrase() -> str:
    raise _EncryptedKey


def _check_readable(option: str, path: str) -> None:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise _file_error(option, path, exc) from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.library or "OpenSSL error")


def _file_error(option: str, path: str, exc: OSError | ssl.SSLError) -> UnsupportedBrokerURL:
    """One line naming the option, its path (paths are not secret) and the reason."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            reason = "holds no PEM certificate"
        else:
            reason = f"is not usable PEM ({_ssl_reason(exc)})"
    elif isinstance(exc, FileNotFoundError):
        reason = "does not exist"
    elif isinstance(exc, IsADirectoryError):
        reason = "is a directory, not a file"
    elif isinstance(exc, PermissionError):
        reason = "is not readable (permission denied)"
    else:
        reason = f"cannot be read ({exc.strerror or type(exc).__name__})"
    return UnsupportedBrokerURL(f"MQTT broker URL: {option} {path} {reason}")


def _bad(what: str) -> UnsupportedBrokerURL:
    return UnsupportedBrokerURL(f"MQTT broker URL: {what}")


def _decode(text: str, what: str) -> str:
    try:
        # errors="strict": a bad escape must not turn into U+FFFD and a silently wrong secret.
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise _bad(f"the {what} is not percent-encoded UTF-8") from None


def _host_and_port(hostport: str, tls: bool) -> tuple[str, int]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise _bad("an [IPv6] host is missing its ']'")
        host, rest = hostport[1:end], hostport[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad("the host in [brackets] is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise _bad("only :port may follow an [IPv6] host")
        port_text = rest[1:] if rest else ""
    else:
        if hostport.count(":") > 1:
            raise _bad("an IPv6 host must be written in [brackets]")
        host, _, port_text = hostport.partition(":")
        if not host:
            raise _bad("the URL has no host")
        if not _HOST.fullmatch(host):
            raise _bad("the host is not a DNS name or an IP address")
    if not port_text:
        return host, DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    # Not echoed: with the host forgotten, "user:secret" parses as host "user", port "secret".
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise _bad("the port is not a number from 1 to 65535")
    return host, int(port_text)


def _tls_options(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    if not query:
        return options
    for item in query.split("&"):
        raw_key, sep, raw_value = item.partition("=")
        key = _decode(raw_key, "query option name")
        if not key:
            raise _bad("the query has an empty option (a stray '&' or '=')")
        if key not in TLS_OPTIONS:
            raise _bad(f"unknown query option {key[:40]!r} (allowed: {_ALLOWED})")
        if key in options:
            raise _bad(f"query option {key} is given twice")
        # unquote, not unquote_plus: '+' is a literal character in a file name.
        value = _decode(raw_value, f"value of {key}")
        if not sep or not value:
            raise _bad(f"query option {key} has no value (expected {key}=/path/to/file.pem)")
        if "\x00" in value:
            raise _bad(f"the value of {key} contains a NUL character")
        options[key] = value
    return options


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """The endpoint ``url`` names, or ``UnsupportedBrokerURL`` saying what is wrong with it."""
    if not isinstance(url, str):
        raise _bad("the URL must be a string")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("mqtt", "mqtts"):
        # Only a fixed text: whatever precedes "://" may be a user name typed without a scheme.
        raise _bad("it must start with mqtt:// or mqtts://")
    tls = scheme.lower() == "mqtts"
    # The authority ends at the first '/', '?' or '#' (as in redact_url). A raw '/', '?' or '#'
    # in a password ends it early and pushes the rest of the userinfo, '@' included, into the
    # path, query or fragment; refusing any '@' there keeps every part we echo secret-free.
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in tail:
        raise _bad("'@' after the host: percent-encode '/', '?', '#' and '@' in the user name and "
                   "password (%2F %3F %23 %40), and '@' in a query value")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise _bad("it contains whitespace or control characters")
    if "#" in tail:
        raise _bad("a fragment (#...) has no meaning here")
    path, _, query = tail.partition("?")
    if path not in ("", "/"):
        raise _bad(f"the path must be '/' or empty, not {path[:60]!r} (MQTT has no virtual hosts)")

    userinfo, at, hostport = authority.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        if not raw_user:
            raise _bad("the user name before '@' is empty")
        username = _decode(raw_user, "user name")
        password = _decode(raw_password, "password") if colon else None
        if "\x00" in username:
            raise _bad("the user name contains a NUL character")
    host, port = _host_and_port(hostport, tls)

    options = _tls_options(query)
    if options and not tls:
        raise _bad(f"{', '.join(options)} need mqtts:// (plain mqtt:// has no TLS)")
    if "keyfile" in options and "certfile" not in options:
        raise _bad("keyfile needs certfile (the client certificate it belongs to)")
    return MqttEndpoint(
        host=host, port=port, username=username, password=password, tls=tls,
        cafile=options.get("cafile"), certfile=options.get("certfile"), keyfile=options.get("keyfile"),
    )


__all__ = ["MqttEndpoint", "parse_mqtt_url", "DEFAULT_PORT", "DEFAULT_TLS_PORT", "TLS_OPTIONS"]

"""Errors raised while encoding, decoding, sealing, opening or signing enclaveq wire messages.

    ProtocolError
     ├── MalformedMessage        bytes that are not a well-formed message of the expected kind
     │    └── UnsupportedVersion a well-formed message of a version this code does not speak
     ├── OversizedMessage        a message, tensor or chunk above the configured limit, in bytes
     │                           or in structure (nesting, object count, container or string length)
     ├── TensorError             a tensor that cannot be represented (dtype, shape, byte count)
     ├── DecryptionFailed        "this ciphertext does not open" -- deliberately opaque
     ├── SignatureInvalid        a well-formed signed message whose signature does not verify
     └── KeyFileError            a key file (or key text) that is missing, unreadable or not the key expected

``DecryptionFailed`` never says *why* (wrong key, tampered header, tampered body, result moved
to another job): telling the difference would help an attacker and never helps a user.
``SignatureInvalid`` is just as terse, for the same reason. ``KeyFileError`` names the path,
never the file's contents (it may be somebody's private key).
No error message in this package ever contains payload bytes (P10).
"""


class ProtocolError(Exception):
    """Base of every protocol error."""


class MalformedMessage(ProtocolError):
    """The bytes do not decode to a valid message of the expected kind."""


class UnsupportedVersion(MalformedMessage):
    """The message declares a protocol version this implementation does not speak."""


class OversizedMessage(ProtocolError):
    """A message, tensor or chunk is larger than the limit in force: in bytes, or in structure
    (nested deeper, or holding more objects or longer containers or strings, than its kind
    allows; see protocol.limits)."""


class TensorError(ProtocolError):
    """A tensor has an unsupported dtype, or its shape and byte count disagree."""


class DecryptionFailed(ProtocolError):
    """The ciphertext does not open with the key at hand (tampered, wrong key, or moved)."""

    def __init__(self, message: str = "ciphertext does not open") -> None:
        super().__init__(message)


class SignatureInvalid(ProtocolError):
    """A well-formed signed message whose signature does not verify against the key it names."""


class KeyFileError(ProtocolError):
    """A key file (or key text) is missing, unreadable, or not the kind of key expected.

    Messages name the path and what was expected, never the file's contents."""

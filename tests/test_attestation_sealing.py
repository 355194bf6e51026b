"""Simulated sealing: keys bound to machine and measurement; blobs that only open untouched."""

from __future__ import annotations

import hashlib
from datetime import datetime, UTC

import pytest

from attestation.errors import SimDirError, UnsealError
from attestation.sim import init_sim_dir
from attestation.sim.sealing import seal, sealing_key, unseal

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
MEASUREMENT = hashlib.sha256(b"worker v1").digest()
UPGRADED = hashlib.sha256(b"worker v2").digest()
AAD = b"enclaveq/pool-epoch-keys/pool-a"


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    return init_sim_dir(tmp_path_factory.mktemp("sim"), now=T0)


@pytest.fixture(scope="module")
def key(sim_dir) -> bytes:
    return sealing_key(sim_dir, MEASUREMENT)


def test_the_same_measurement_on_the_same_machine_gets_the_same_key(sim_dir, key):
    assert len(key) == 32
    assert sealing_key(sim_dir.path, MEASUREMENT) == key
    assert sealing_key(str(sim_dir.path), MEASUREMENT) == key


def test_another_measurement_gets_an_unrelated_key(sim_dir, key):
    assert sealing_key(sim_dir, UPGRADED) != key


def test_another_machine_gets_an_unrelated_key(tmp_path, key):
    other = init_sim_dir(tmp_path / "other", now=T0)
    assert sealing_key(other, MEASUREMENT) != key


def test_the_key_depends_only_on_the_platform_secret_and_measurement(sim_dir, tmp_path, key):
    copy = init_sim_dir(tmp_path / "copy", now=T0)
    (copy.path / "platform-secret").write_bytes((sim_dir.path / "platform-secret").read_bytes())
    assert sealing_key(copy, MEASUREMENT) == key


def test_sealed_data_opens_with_the_same_key_and_context(key):
    blob = seal(key, b"epoch key material", AAD)
    assert unseal(key, blob, AAD) == b"epoch key material"
    assert b"epoch key material" not in blob


def test_every_seal_uses_a_fresh_nonce(key):
    assert seal(key, b"same", AAD) != seal(key, b"same", AAD)


def test_flipping_any_bit_position_of_a_sealed_blob_makes_it_fail_opaquely(key):
    blob = seal(key, b"secret model key", AAD)
    for position in range(len(blob)):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(UnsealError) as info:
            unseal(key, bytes(tampered), AAD)
        assert str(info.value) == "sealed data does not open (wrong key, wrong context, or tampered)"


def test_a_truncated_blob_does_not_open(key):
    blob = seal(key, b"secret", AAD)
    for length in range(len(blob)):
        with pytest.raises(UnsealError):
            unseal(key, blob[:length], AAD)


def test_another_context_or_key_does_not_open(sim_dir, key):
    blob = seal(key, b"secret", AAD)
    with pytest.raises(UnsealError):
        unseal(key, blob, b"enclaveq/pool-epoch-keys/pool-b")
    with pytest.raises(UnsealError):
        unseal(sealing_key(sim_dir, UPGRADED), blob, AAD)


def test_an_unknown_format_version_does_not_open(key):
    blob = bytearray(seal(key, b"secret", AAD))
    blob[0] = 2
    with pytest.raises(UnsealError):
        unseal(key, bytes(blob), AAD)


def test_a_measurement_of_the_wrong_size_is_a_programming_error(sim_dir):
    with pytest.raises(ValueError, match="32 bytes"):
        sealing_key(sim_dir, MEASUREMENT[:16])


def test_a_missing_or_corrupt_platform_secret_is_a_sim_dir_error(tmp_path):
    broken = init_sim_dir(tmp_path / "broken", now=T0)
    (broken.path / "platform-secret").write_bytes(b"short")
    with pytest.raises(SimDirError, match="corrupt"):
        sealing_key(broken, MEASUREMENT)
    (broken.path / "platform-secret").unlink()
    with pytest.raises(SimDirError, match="no platform-secret"):
        sealing_key(broken, MEASUREMENT)

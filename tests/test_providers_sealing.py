"""Sealing keys on real TEEs: SGX under Gramine seals with EGETKEY's key, so sealed state survives a
restart; TEEs without platform sealing get an ephemeral key and say so."""

from __future__ import annotations

import pytest

from attestation.providers import ProviderFailed, ProviderUnavailable
from attestation.providers.fakes import FakeGramine
from attestation.providers.gramine import gramine_sealing_key
from enclave_worker.errors import SealedStateError
from enclave_worker.platform import EPHEMERAL_SEALING_WARNING, tee_identity
from enclave_worker.sealed_state import PoolKeys, SealedState


def gramine_with_keys(tmp_path, mrenclave_key: bytes = b"\x11" * 16) -> FakeGramine:
    gramine = FakeGramine(tmp_path / "tee")
    keys = gramine.dir / "keys"
    keys.mkdir()
    (keys / "_sgx_mrenclave").write_bytes(mrenclave_key)
    (keys / "_sgx_mrsigner").write_bytes(b"\x22" * 16)
    return gramine


def sealed_state(identity, root):
    return SealedState(root, "pool", identity.sealing_key, identity.seal, identity.unseal)


def test_gramine_exposes_the_sgx_seal_key_per_policy(tmp_path):
    gramine = gramine_with_keys(tmp_path)
    assert gramine_sealing_key("mrenclave", root=gramine.root, ops=gramine) == b"\x11" * 16
    assert gramine_sealing_key("mrsigner", root=gramine.root, ops=gramine) == b"\x22" * 16
    with pytest.raises(ValueError):
        gramine_sealing_key("anything", root=gramine.root, ops=gramine)


def test_a_missing_or_malformed_seal_key_is_a_typed_error(tmp_path):
    gramine = FakeGramine(tmp_path / "tee")
    with pytest.raises(ProviderUnavailable):
        gramine_sealing_key(root=gramine.root, ops=gramine)
    (gramine.dir / "keys").mkdir()
    (gramine.dir / "keys" / "_sgx_mrenclave").write_bytes(b"short")
    with pytest.raises(ProviderFailed, match="16"):
        gramine_sealing_key(root=gramine.root, ops=gramine)


def test_an_sgx_worker_reopens_its_sealed_state_after_a_restart(tmp_path):
    gramine = gramine_with_keys(tmp_path)
    first = tee_identity("sgx", root=gramine.root, ops=gramine)
    assert first.persistent_sealing
    keys = PoolKeys(epoch=1, pool_private_key=b"\x01" * 32, identity_private_key=b"\x02" * 32)
    sealed_state(first, tmp_path / "state").save_pool_keys(keys)
    restarted = tee_identity("sgx", root=gramine.root, ops=gramine)
    assert sealed_state(restarted, tmp_path / "state").load_pool_keys() == keys


def test_another_enclave_cannot_unseal_it(tmp_path):
    my_gramine = gramine_with_keys(tmp_path / "a")
    mine = tee_identity("sgx", root=my_gramine.root, ops=my_gramine)
    sealed_state(mine, tmp_path / "state").save_pool_keys(PoolKeys(1, b"\x01" * 32, b"\x02" * 32))
    other_gramine = gramine_with_keys(tmp_path / "b", mrenclave_key=b"\x33" * 16)  # another MRENCLAVE
    other = tee_identity("sgx", root=other_gramine.root, ops=other_gramine)
    with pytest.raises(SealedStateError, match="does not unseal"):
        sealed_state(other, tmp_path / "state").load_pool_keys()


def test_without_a_platform_seal_key_the_worker_seals_ephemerally_and_warns(tmp_path, caplog):
    gramine = FakeGramine(tmp_path / "tee")  # a Gramine without /dev/attestation/keys
    identity = tee_identity("sgx", root=gramine.root, ops=gramine)
    assert identity.persistent_sealing is False
    assert EPHEMERAL_SEALING_WARNING in caplog.text


def test_tdx_and_nitro_have_no_platform_sealing_key(tmp_path):
    from enclave_worker.platform import platform_sealing_key

    for platform in ("tdx", "nitro"):
        provider = type("Provider", (), {"platform": platform})()
        assert platform_sealing_key(provider, b"\x01" * 32, root=tmp_path) is None

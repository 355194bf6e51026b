"""Simulation directories: what init creates, what it refuses, and how broken ones are caught."""

from __future__ import annotations

import hashlib
import stat
from datetime import datetime, UTC

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from attestation.errors import SimDirError
from attestation.sim import SimProvider, init_sim_dir, open_sim_dir
from attestation.sim.init import ROOT_COMMON_NAME

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
MEASUREMENT = hashlib.sha256(b"worker").digest()
FILES = {"root.pem", "attestation-key.pem", "attestation-cert.pem", "platform-secret"}


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_the_four_files_with_private_ones_readable_only_by_the_owner(tmp_path):
    sim_dir = init_sim_dir(tmp_path / "sim", now=T0)

    assert {p.name for p in (tmp_path / "sim").iterdir()} == FILES
    assert {p.name for p in sim_dir.files} == FILES
    assert mode(sim_dir.path / "attestation-key.pem") == 0o600
    assert mode(sim_dir.path / "platform-secret") == 0o600
    assert len((sim_dir.path / "platform-secret").read_bytes()) == 32


def test_the_root_is_a_labelled_self_signed_p256_ca_whose_fingerprint_is_returned(tmp_path):
    sim_dir = init_sim_dir(tmp_path / "sim", now=T0, days=30)
    root = x509.load_pem_x509_certificate((sim_dir.path / "root.pem").read_bytes())

    assert root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == ROOT_COMMON_NAME
    assert "no confidentiality" in ROOT_COMMON_NAME
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert root.fingerprint(hashes.SHA256()).hex() == sim_dir.root_sha256
    assert (root.not_valid_after_utc - T0).days == 30


def test_the_root_private_key_is_not_kept(tmp_path):
    sim_dir = init_sim_dir(tmp_path / "sim", now=T0)
    private_keys = [p for p in sim_dir.path.iterdir() if b"PRIVATE KEY" in p.read_bytes()]
    assert [p.name for p in private_keys] == ["attestation-key.pem"]
    loaded = open_sim_dir(sim_dir)
    # The one private key there is the attestation key, which is not the root's.
    assert loaded.attestation_key.public_key() != loaded.root.public_key()


def test_init_refuses_to_overwrite_an_existing_simulation_directory(tmp_path):
    first = init_sim_dir(tmp_path / "sim", now=T0)
    with pytest.raises(SimDirError, match="already holds a simulation directory"):
        init_sim_dir(tmp_path / "sim", now=T0)
    assert open_sim_dir(first).sim_dir.root_sha256 == first.root_sha256


def test_init_with_force_replaces_everything_and_changes_the_root(tmp_path):
    first = init_sim_dir(tmp_path / "sim", now=T0)
    secret = (first.path / "platform-secret").read_bytes()
    second = init_sim_dir(tmp_path / "sim", now=T0, force=True)
    assert second.root_sha256 != first.root_sha256
    assert (second.path / "platform-secret").read_bytes() != secret
    assert {p.name for p in second.path.iterdir()} == FILES


def test_init_refuses_a_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SimDirError, match="not a directory"):
        init_sim_dir(tmp_path / "file", now=T0)


def test_opening_a_missing_directory_says_how_to_create_one(tmp_path):
    with pytest.raises(SimDirError, match="enclaveq sim init"):
        open_sim_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("name", sorted(FILES))
def test_opening_a_directory_with_a_file_missing_names_it(tmp_path, name):
    sim_dir = init_sim_dir(tmp_path / "sim", now=T0)
    (sim_dir.path / name).unlink()
    with pytest.raises(SimDirError, match=name):
        open_sim_dir(sim_dir.path)


@pytest.mark.parametrize("name", ["root.pem", "attestation-cert.pem", "attestation-key.pem"])
def test_opening_a_directory_with_a_corrupt_pem_names_it(tmp_path, name):
    sim_dir = init_sim_dir(tmp_path / "sim", now=T0)
    (sim_dir.path / name).write_bytes(b"-----BEGIN NONSENSE-----\n")
    with pytest.raises(SimDirError, match=f"{name}.*corrupt"):
        open_sim_dir(sim_dir.path)


def test_a_key_from_another_directory_is_detected(tmp_path):
    one = init_sim_dir(tmp_path / "one", now=T0)
    two = init_sim_dir(tmp_path / "two", now=T0)
    (one.path / "attestation-key.pem").write_bytes((two.path / "attestation-key.pem").read_bytes())
    with pytest.raises(SimDirError, match="does not belong to"):
        open_sim_dir(one.path)


def test_a_root_from_another_directory_is_detected(tmp_path):
    one = init_sim_dir(tmp_path / "one", now=T0)
    two = init_sim_dir(tmp_path / "two", now=T0)
    (one.path / "root.pem").write_bytes((two.path / "root.pem").read_bytes())
    with pytest.raises(SimDirError, match="not issued by"):
        open_sim_dir(one.path)


def test_a_provider_fails_at_start_on_a_broken_directory_not_at_first_use(tmp_path):
    with pytest.raises(SimDirError):
        SimProvider(tmp_path / "nowhere", MEASUREMENT)


def test_a_provider_refuses_report_data_that_is_not_64_bytes(tmp_path):
    provider = SimProvider(init_sim_dir(tmp_path / "sim", now=T0), MEASUREMENT, clock=lambda: T0)
    for size in (0, 32, 63, 65):
        with pytest.raises(ValueError, match="64 bytes"):
            provider.evidence(bytes(size))


@pytest.mark.parametrize(
    "kwargs",
    [{"measurement": b"short"}, {"svn": -1}, {"svn": 2**32}, {"debug": "yes"}],
)
def test_a_provider_refuses_impossible_settings(tmp_path, kwargs):
    sim_dir = init_sim_dir(tmp_path / "sim", now=T0)
    arguments = {"measurement": MEASUREMENT, **kwargs}
    measurement = arguments.pop("measurement")
    with pytest.raises(ValueError):
        SimProvider(sim_dir, measurement, **arguments)


def test_init_needs_an_aware_clock_and_a_positive_validity(tmp_path):
    with pytest.raises(ValueError, match="timezone-aware"):
        init_sim_dir(tmp_path / "a", now=datetime(2026, 3, 1))
    with pytest.raises(ValueError, match="days"):
        init_sim_dir(tmp_path / "b", now=T0, days=0)

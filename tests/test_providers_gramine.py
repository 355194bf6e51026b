"""Gramine SGX provider against a fake /dev/attestation on a tmp tree (see fakes.FakeGramine)."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from attestation.providers import GramineSgxProvider, ProviderFailed, ProviderNotSupported, ProviderUnavailable
from attestation.providers.binding import bound_report_data
from attestation.providers.fakes import FakeGramine, fake_sgx_quote, fake_tdx_quote

REPORT_DATA = bytes(range(100, 164))


@pytest.fixture
def gramine(tmp_path) -> FakeGramine:
    return FakeGramine(tmp_path)


def test_the_quote_binds_the_report_data_written_to_user_report_data(gramine):
    p = GramineSgxProvider(root=gramine.root, ops=gramine)
    assert p.platform == "sgx"
    quote = p.evidence(REPORT_DATA)
    assert gramine.user_report_data == REPORT_DATA
    assert quote == fake_sgx_quote(REPORT_DATA)
    assert bound_report_data("sgx", quote) == REPORT_DATA


@pytest.mark.parametrize("version", [3, 4, 5])
def test_sgx_quote_versions_with_known_layouts_are_accepted(tmp_path, version):
    fake = FakeGramine(tmp_path, quote_fn=lambda rd: fake_sgx_quote(rd, version=version))
    assert bound_report_data("sgx", GramineSgxProvider(root=tmp_path, ops=fake).evidence(REPORT_DATA)) == REPORT_DATA


@pytest.mark.parametrize("bad", [b"", bytes(32), bytes(65), "x" * 64])
def test_report_data_of_the_wrong_size_is_refused(gramine, bad):
    with pytest.raises(ValueError, match="64 bytes"):
        GramineSgxProvider(root=gramine.root, ops=gramine).evidence(bad)
    assert gramine.quotes_made == 0


def test_outside_gramine_the_provider_is_unavailable(tmp_path):
    with pytest.raises(ProviderUnavailable, match="dev/attestation not found"):
        GramineSgxProvider(root=tmp_path)


def test_a_dev_attestation_without_attestation_type_is_unavailable(tmp_path):
    (tmp_path / "dev" / "attestation").mkdir(parents=True)
    with pytest.raises(ProviderUnavailable, match="attestation_type not found"):
        GramineSgxProvider(root=tmp_path)


@pytest.mark.parametrize("kind, error, message", [
    ("none", ProviderUnavailable, "remote attestation is off"),
    ("epid", ProviderNotSupported, "EPID"),
    ("maa", ProviderNotSupported, "only 'dcap'"),
])
def test_attestation_types_other_than_dcap_are_refused(tmp_path, kind, error, message):
    fake = FakeGramine(tmp_path, attestation_type=kind)
    with pytest.raises(error, match=message):
        GramineSgxProvider(root=tmp_path, ops=fake)


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES, errno.EAGAIN])
def test_a_failing_quote_read_is_a_failure(gramine, code):
    p = GramineSgxProvider(root=gramine.root, ops=gramine)
    gramine.quote_errors = [code]
    with pytest.raises(ProviderFailed, match=errno.errorcode[code]):
        p.evidence(REPORT_DATA)
    assert bound_report_data("sgx", p.evidence(REPORT_DATA)) == REPORT_DATA  # the next one works


def test_a_refused_user_report_data_write_is_a_failure(gramine, monkeypatch):
    p = GramineSgxProvider(root=gramine.root, ops=gramine)
    monkeypatch.setattr(gramine, "write", lambda path, data: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(ProviderFailed, match="refused .*user_report_data"):
        p.evidence(REPORT_DATA)


def test_a_missing_quote_file_is_a_failure(tmp_path):
    # Real OS calls on an ordinary tree: attestation_type says dcap but there is no quote file.
    directory = tmp_path / "dev" / "attestation"
    directory.mkdir(parents=True)
    (directory / "attestation_type").write_text("dcap")
    (directory / "user_report_data").write_bytes(bytes(64))
    p = GramineSgxProvider(root=tmp_path)
    with pytest.raises(ProviderFailed, match="ENOENT"):
        p.evidence(REPORT_DATA)
    assert (directory / "user_report_data").read_bytes() == REPORT_DATA


@pytest.mark.parametrize("quote, message", [
    (b"", "is empty"),
    (fake_sgx_quote(bytes(64)), "other report data"),
    (fake_tdx_quote(REPORT_DATA), r"tee_type is 0x00000081 \(TDX\)"),
    (fake_sgx_quote(REPORT_DATA, version=2), "version 2 has no known layout"),
    (fake_sgx_quote(REPORT_DATA)[:400], "ends before its report data"),
])
def test_unusable_quotes_are_refused(tmp_path, quote, message):
    fake = FakeGramine(tmp_path, quote_fn=lambda _rd: quote)
    with pytest.raises(ProviderFailed, match=message):
        GramineSgxProvider(root=tmp_path, ops=fake).evidence(REPORT_DATA)


def test_concurrent_threads_each_get_a_quote_for_their_own_report_data(gramine, monkeypatch):
    # user_report_data is one per enclave process: without the provider's lock, another thread
    # writing between our write and our quote read would hand us its quote.
    p = GramineSgxProvider(root=gramine.root, ops=gramine)
    real_write = gramine.write

    def slow_write(path, data):
        real_write(path, data)
        time.sleep(0.001)  # widen the window between the write and the quote read

    monkeypatch.setattr(gramine, "write", slow_write)
    results: dict[int, bytes] = {}

    def ask(i: int) -> None:
        data = bytes([i]) * 64
        for _ in range(20):
            assert bound_report_data("sgx", p.evidence(data)) == data
        results[i] = data

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and gramine.quotes_made == 160

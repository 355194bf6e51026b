"""configfs-tsm provider (TDX, SEV-SNP) against a fake kernel on a tmp tree.

The fake (attestation.providers.fakes.FakeTsmKernel) emulates the documented ABI: mkdir
populates attributes, writes bump `generation`, reading `outblob` generates the report. Its
limits are listed in its module; the real ABI is only exercised inside a real guest.
"""

from __future__ import annotations

import errno
import os

import pytest

from attestation.providers import (
    ConfigfsTsmProvider,
    ProviderFailed,
    ProviderNotSupported,
    ProviderUnavailable,
    parse_cert_table,
)
from attestation.providers.binding import bound_report_data
from attestation.providers.configfs_tsm import TSM_REPORT_DIR, probe_provider_name
from attestation.providers.fakes import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    FakeTsmKernel,
    cert_table,
    fake_snp_report,
    fake_tdx_quote,
)
from attestation.providers.fileops import OsFileOps

REPORT_DATA = bytes(range(64))


def no_sleep(_seconds: float) -> None:
    pass


def provider(kernel: FakeTsmKernel, **kwargs) -> ConfigfsTsmProvider:
    kwargs.setdefault("sleep", no_sleep)
    return ConfigfsTsmProvider(root=kernel.root, ops=kernel, **kwargs)


@pytest.fixture
def tdx(tmp_path) -> FakeTsmKernel:
    return FakeTsmKernel(tmp_path, provider="tdx_guest")


@pytest.fixture
def snp(tmp_path) -> FakeTsmKernel:
    return FakeTsmKernel(tmp_path, provider="sev_guest")


# -- happy paths ---------------------------------------------------------------------------
def test_tdx_evidence_is_the_quote_for_our_report_data(tdx):
    p = provider(tdx)
    assert p.platform == "tdx" and p.provider_name == "tdx_guest"
    quote = p.evidence(REPORT_DATA)
    assert quote == fake_tdx_quote(REPORT_DATA)
    assert bound_report_data("tdx", quote) == REPORT_DATA
    report = p.report(REPORT_DATA)
    assert report.provider == "tdx_guest" and report.platform == "tdx"
    assert report.auxblob is None  # TDX has no auxblob attribute
    assert report.generation == 1  # exactly our one inblob write


def test_snp_evidence_comes_with_the_hosts_certificate_table(snp):
    p = provider(snp)
    assert p.platform == "snp"
    report = p.report(REPORT_DATA)
    assert report.outblob == fake_snp_report(REPORT_DATA)
    entries = parse_cert_table(report.auxblob)
    assert [(e.name, e.data) for e in entries] == [("vcek", b"fake VCEK DER"), ("ask", b"fake ASK"), ("ark", b"fake ARK")]
    assert p.evidence(REPORT_DATA) == report.outblob + report.auxblob  # the verifier reads the table after the report


def test_snp_privlevel_is_written_and_counted_in_the_generation(snp):
    report = provider(snp, privlevel=2).report(REPORT_DATA)
    assert report.outblob[0x30] == 2      # the fake kernel put the VMPL into the report
    assert report.generation == 2         # privlevel + inblob


def test_each_request_uses_a_fresh_uniquely_named_entry_and_removes_it(tdx):
    p = provider(tdx)
    probes = len(tdx.entries_made)
    p.evidence(REPORT_DATA)
    p.evidence(REPORT_DATA)
    made = tdx.entries_made[probes:]
    assert len(made) == 2 and made[0] != made[1]
    assert all(name.startswith(f"enclaveq-{os.getpid()}-") for name in made)
    assert tdx.live_entries() == []


def test_a_bytearray_is_accepted(tdx):
    assert bound_report_data("tdx", provider(tdx).evidence(bytearray(REPORT_DATA))) == REPORT_DATA


def test_tdx_v5_quotes_are_accepted(tmp_path):
    kernel = FakeTsmKernel(tmp_path, provider="tdx_guest",
                           report_new=lambda _p, inblob, _l: (fake_tdx_quote(inblob, version=5), None))
    assert bound_report_data("tdx", provider(kernel).evidence(REPORT_DATA)) == REPORT_DATA


# -- refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65), "x" * 64, None])
def test_report_data_of_the_wrong_size_or_type_is_refused_before_touching_the_kernel(tdx, bad):
    p = provider(tdx)
    made = len(tdx.entries_made)
    with pytest.raises(ValueError, match="64 bytes"):
        p.evidence(bad)
    assert len(tdx.entries_made) == made


def test_missing_configfs_tsm_is_unavailable(tmp_path):
    with pytest.raises(ProviderUnavailable, match="tsm/report not found"):
        ConfigfsTsmProvider(root=tmp_path)


def test_configfs_without_a_registered_provider_is_unavailable(tmp_path):
    kernel = FakeTsmKernel(tmp_path, provider=None)
    with pytest.raises(ProviderUnavailable, match="no TSM provider is registered"):
        provider(kernel)


def test_a_plain_directory_is_not_mistaken_for_configfs(tmp_path):
    # Real OS calls on an ordinary directory: mkdir works but no attributes appear.
    (tmp_path / TSM_REPORT_DIR).mkdir(parents=True)
    with pytest.raises(ProviderUnavailable, match="no 'provider' attribute"):
        ConfigfsTsmProvider(root=tmp_path)
    assert list((tmp_path / TSM_REPORT_DIR).iterdir()) == []  # the probe entry was removed


def test_asking_for_the_other_platform_is_unavailable(tdx, snp):
    with pytest.raises(ProviderUnavailable, match="not an SNP guest"):
        provider(tdx, platform="snp")
    with pytest.raises(ProviderUnavailable, match="not a TDX guest"):
        provider(snp, platform="tdx")


def test_an_unknown_tsm_provider_is_not_supported(tmp_path):
    kernel = FakeTsmKernel(tmp_path, provider="arm_cca_guest")
    with pytest.raises(ProviderNotSupported, match="arm_cca_guest"):
        provider(kernel)
    assert kernel.live_entries() == []


def test_privlevel_is_refused_on_tdx_and_below_the_floor_on_snp(tmp_path, tdx):
    with pytest.raises(ProviderNotSupported, match="SEV-SNP option"):
        provider(tdx, privlevel=0)
    floor = FakeTsmKernel(tmp_path / "floor", provider="sev_guest", privlevel_floor=2)
    with pytest.raises(ProviderNotSupported, match="below this guest's privlevel_floor 2"):
        provider(floor, privlevel=1)
    with pytest.raises(ValueError):
        provider(floor, privlevel=4)


def test_permission_denied_on_mkdir_is_a_failure_with_advice(tdx, monkeypatch):
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(tdx, "mkdir", denied)
    with pytest.raises(ProviderFailed, match="run it as root"):
        provider(tdx)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOMEM, errno.EINVAL])
def test_a_kernel_error_on_outblob_is_a_failure_and_the_entry_is_removed(tdx, code):
    p = provider(tdx)
    tdx.outblob_errors = [code]
    with pytest.raises(ProviderFailed, match=errno.errorcode[code]):
        p.evidence(REPORT_DATA)
    assert tdx.live_entries() == []


def test_a_missing_outblob_attribute_is_a_failure(tdx, monkeypatch):
    p = provider(tdx)
    real_mkdir = tdx.mkdir

    def mkdir_without_outblob(path):
        real_mkdir(path)
        (path / "outblob").unlink()

    monkeypatch.setattr(tdx, "mkdir", mkdir_without_outblob)
    with pytest.raises(ProviderFailed, match="ENOENT"):
        p.evidence(REPORT_DATA)
    assert tdx.live_entries() == []


def test_a_busy_quoting_service_is_retried(tdx):
    p = provider(tdx)
    tdx.outblob_errors = [errno.EBUSY, errno.EAGAIN]
    assert bound_report_data("tdx", p.evidence(REPORT_DATA)) == REPORT_DATA
    assert tdx.live_entries() == []


def test_a_concurrent_writer_is_detected_by_generation_and_retried(tdx):
    p = provider(tdx)
    tdx.interfering_writes = 2
    quote = p.evidence(REPORT_DATA)
    assert bound_report_data("tdx", quote) == REPORT_DATA
    assert tdx.reports_generated == 3 and tdx.live_entries() == []


def test_a_silently_dropped_inblob_write_is_a_failure_not_evidence_for_nothing(tdx):
    # configfs commits inblob at close() and cannot report a failure there; in a fresh entry
    # the kernel then has no report data and refuses outblob with EINVAL.
    p = provider(tdx)
    tdx.drop_inblob_writes = 1
    with pytest.raises(ProviderFailed, match="EINVAL"):
        p.evidence(REPORT_DATA)


def test_a_writer_that_never_stops_exhausts_the_retries(tdx):
    sleeps: list[float] = []
    p = ConfigfsTsmProvider(root=tdx.root, ops=tdx, max_attempts=3, backoff=0.5, sleep=sleeps.append)
    tdx.interfering_writes = 10
    with pytest.raises(ProviderFailed, match="no consistent report after 3 attempts.*generation went from 0 to 2"):
        p.evidence(REPORT_DATA)
    assert sleeps == [0.5, 1.0]
    assert tdx.live_entries() == []


def test_evidence_for_other_report_data_is_refused(tmp_path):
    kernel = FakeTsmKernel(tmp_path, report_new=lambda _p, _i, _l: (fake_tdx_quote(bytes(64)), None))
    with pytest.raises(ProviderFailed, match="other report data"):
        provider(kernel).evidence(REPORT_DATA)


@pytest.mark.parametrize("outblob, message", [
    (b"", "is empty"),
    (b"\x04\x00" + bytes(20), "shorter than its 48-byte header"),
    (fake_tdx_quote(REPORT_DATA)[:600], "ends before its report data"),
    (b"\x03\x00\x02\x00" + bytes(44) + bytes(400), r"tee_type is 0x00000000 \(SGX\)"),
])
def test_unusable_outblobs_are_refused(tmp_path, outblob, message):
    kernel = FakeTsmKernel(tmp_path, report_new=lambda _p, _i, _l: (outblob, None))
    with pytest.raises(ProviderFailed, match=message):
        provider(kernel).evidence(REPORT_DATA)
    assert kernel.live_entries() == []


def test_a_failing_rmdir_is_logged_not_raised(tdx, monkeypatch, caplog):
    p = provider(tdx)
    monkeypatch.setattr(tdx, "rmdir", lambda path: (_ for _ in ()).throw(OSError(errno.EBUSY, "busy")))
    assert p.evidence(REPORT_DATA)
    assert "could not remove configfs-tsm report entry" in caplog.text


def test_probe_names_the_provider_and_leaves_nothing_behind(snp):
    assert probe_provider_name(snp.root, ops=snp) == "sev_guest"
    assert snp.live_entries() == []


# -- the SNP certificate table -------------------------------------------------------------
def test_cert_table_round_trip_and_unknown_guids():
    import uuid

    other = uuid.UUID("12345678-1234-5678-1234-567812345678")
    table = cert_table([(VCEK_GUID, b"v" * 1300), (other, b"o"), (ASK_GUID, b""), (ARK_GUID, b"r")])
    entries = parse_cert_table(table)
    assert [e.name for e in entries] == ["vcek", "unknown", "ask", "ark"]
    assert entries[0].data == b"v" * 1300 and entries[1].guid == other
    assert parse_cert_table(bytes(24)) == ()
    assert parse_cert_table(b"") == ()  # the host supplied no certificates


@pytest.mark.parametrize("table", [
    bytes(23),                                            # no terminator
    cert_table([(VCEK_GUID, b"x")])[:24],                 # entry without terminator
    VCEK_GUID.bytes + (100).to_bytes(4, "little") + (50).to_bytes(4, "little") + bytes(24),  # out of bounds
    VCEK_GUID.bytes + (0).to_bytes(4, "little") + (8).to_bytes(4, "little") + bytes(24),     # overlaps the table
])
def test_broken_cert_tables_are_refused(table):
    with pytest.raises(ProviderFailed):
        parse_cert_table(table)


# -- the real file operations on an ordinary directory -------------------------------------
def test_os_file_ops_never_create_attribute_files(tmp_path):
    ops = OsFileOps()
    with pytest.raises(FileNotFoundError):
        ops.write(tmp_path / "inblob", b"x")
    assert not (tmp_path / "inblob").exists()
    (tmp_path / "blob").write_bytes(b"a" * 100)
    assert ops.read(tmp_path / "blob", 100) == b"a" * 100
    with pytest.raises(OSError) as info:
        ops.read(tmp_path / "blob", 99)
    assert info.value.errno == errno.EFBIG
    ops.write(tmp_path / "blob", b"bb")
    assert (tmp_path / "blob").read_bytes() == b"bb" + b"a" * 98  # from offset 0, no truncation

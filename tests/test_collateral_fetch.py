"""`enclaveq collateral fetch|show` and the collateral directory verifiers reuse (issue 15, item 4).

Collateral comes from the fake PCS and KDS servers of tests/fake_collateral_servers.py on
127.0.0.1, signed by the fake Intel and AMD PKIs; verifiers trust those fake roots instead of
the vendors'. Never the real services.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, UTC
from pathlib import Path

import pytest
from click.testing import CliRunner

from attestation import trust as trust_module
from attestation import verify as verify_module
from attestation.collateral_fetch import (CollateralFetchError, fetch_intel, fetch_snp, loopback_or_https_get,
                                          write_atomic)
from attestation.collateral_source import (CACHE_ENV, CollateralDir, default_cache_dir, describe_directory,
                                           with_collateral)
from attestation.errors import EvidenceInvalid, EvidenceMalformed, PolicyViolation
from attestation.policy import policy_from_mapping
from attestation.snp.abi import decode_tcb
from attestation.testing.intel import FakeIntelPki, FakeQuotingEnclave, sgx_code_pin, tdx_code_pin
from attestation.testing.snp import FakeAmd
from attestation.trust import TrustAnchors
from attestation.verify import verify_evidence

from .fake_collateral_servers import DER, FakeKds, FakePcs, amd_crl

ROOT = Path(__file__).resolve().parents[1]
NONCE = b"\x42" * 64


@pytest.fixture(scope="module")
def intel():
    pki = FakeIntelPki(datetime.now(UTC))
    return pki, FakeQuotingEnclave(pki)


@pytest.fixture
def pcs(intel):
    with FakePcs(intel[0]) as server:
        yield server


@pytest.fixture
def kds(amd):
    with FakeKds(amd) as server:
        yield server


def http_get():
    return loopback_or_https_get(timeout=5)


def files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def fetch_both_intel(pki, pcs, out: Path) -> None:
    for kind in ("sgx", "tdx"):
        fetch_intel(out, kind=kind, fmspc=pki.fmspc, now=datetime.now(UTC), http_get=http_get(), pcs_url=pcs.url,
                    trust=pki.trust())


# -- Intel --------------------------------------------------------------------------------------
def test_sgx_and_tdx_collateral_is_fetched_verified_and_judges_quotes_from_the_directory(intel, pcs, tmp_path):
    pki, qe = intel
    fetch_both_intel(pki, pcs, tmp_path)
    names = {p.name for p in files_in(tmp_path / "intel")}
    assert names == {f"tcb_info-sgx-{pki.fmspc.hex()}.json", f"tcb_info-tdx-{pki.fmspc.hex()}.json",
                     "qe_identity-sgx.json", "qe_identity-tdx.json", "pck_crl-platform.der",
                     "pck_crl-processor.der", "root_ca_crl.der"}
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in files_in(tmp_path))
    source, now = CollateralDir(tmp_path, trust=pki.trust()), datetime.now(UTC)
    for platform, quote, pin in (("sgx", qe.sgx_quote(report_data=NONCE), sgx_code_pin()),
                                 ("tdx", qe.tdx_quote(report_data=NONCE), tdx_code_pin())):
        claims = verify_evidence(platform, quote, policy_from_mapping({platform: pin}), expected_report_data=NONCE,
                                 now=now, trust=pki.trust(), **source.verify_options(platform, now))
        assert claims.tcb_status == "UpToDate", platform


def test_a_revoking_pck_crl_in_the_directory_refuses_the_quote(intel, pcs, tmp_path):
    # The collateral is really used: the PCK CA's CRL revoking the quote's PCK leaf refuses it.
    pki, qe = intel
    pcs.routes["/sgx/certification/v4/pckcrl?ca=platform&encoding=der"] = (
        pcs.routes["/sgx/certification/v4/pckcrl?ca=platform&encoding=der"][:2]
        + (pki.crl(issuer="ca", revoked=[pki.leaf]).public_bytes(DER),))
    fetch_both_intel(pki, pcs, tmp_path)
    now = datetime.now(UTC)
    with pytest.raises(EvidenceInvalid, match="revoked"):
        verify_evidence("tdx", qe.tdx_quote(report_data=NONCE), policy_from_mapping({"tdx": tdx_code_pin()}),
                        expected_report_data=NONCE, now=now, trust=pki.trust(),
                        **CollateralDir(tmp_path, trust=pki.trust()).verify_options("tdx", now))


@pytest.mark.parametrize("status", [404, 500])
def test_an_http_error_is_a_clear_error_and_nothing_is_written(intel, pcs, tmp_path, status):
    pki, _ = intel
    pcs.routes[f"/tdx/certification/v4/tcb?fmspc={pki.fmspc.hex()}"] = (status, {}, b"")
    with pytest.raises(CollateralFetchError, match=rf"collateral fetch failed: http://127\.0\.0\.1:\d+/tdx/"
                                                   rf"certification/v4/tcb\?fmspc=\w+: HTTP {status}"):
        fetch_intel(tmp_path, kind="tdx", fmspc=pki.fmspc, now=datetime.now(UTC), http_get=http_get(),
                    pcs_url=pcs.url, trust=pki.trust())
    assert files_in(tmp_path) == []


def test_a_document_with_a_bad_signature_is_refused_and_nothing_is_written(intel, pcs, tmp_path):
    pki, _ = intel
    path = f"/sgx/certification/v4/tcb?fmspc={pki.fmspc.hex()}"
    status, headers, body = pcs.routes[path]
    pcs.routes[path] = (status, headers, body.replace(b'"pcesvn":11', b'"pcesvn":10'))
    with pytest.raises(EvidenceInvalid, match="signature"):
        fetch_intel(tmp_path, kind="sgx", fmspc=pki.fmspc, now=datetime.now(UTC), http_get=http_get(),
                    pcs_url=pcs.url, trust=pki.trust())
    assert files_in(tmp_path) == []


def test_a_pck_crl_not_signed_by_its_issuer_chain_is_refused(intel, pcs, tmp_path):
    pki, _ = intel
    route = "/sgx/certification/v4/pckcrl?ca=processor&encoding=der"
    forged = pki.crl(issuer="ca").public_bytes(DER)          # the platform CA's CRL, not the processor CA's
    pcs.routes[route] = pcs.routes[route][:2] + (forged,)
    with pytest.raises(EvidenceInvalid, match="PCK processor CA CRL"):
        fetch_intel(tmp_path, kind="sgx", fmspc=pki.fmspc, now=datetime.now(UTC), http_get=http_get(),
                    pcs_url=pcs.url, trust=pki.trust())
    assert files_in(tmp_path) == []


def test_collateral_signed_under_another_root_is_refused(intel, pcs, tmp_path):
    pki, _ = intel
    with pytest.raises(EvidenceInvalid, match="pinned"):
        fetch_intel(tmp_path, kind="sgx", fmspc=pki.fmspc, now=datetime.now(UTC), http_get=http_get(),
                    pcs_url=pcs.url)       # the real Intel root: the fake PKI is not it
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("url", ["http://pcs.example.test", "ftp://127.0.0.1/", "http://127.0.0.2.example.test"])
def test_plain_http_is_refused_except_to_the_loopback(intel, tmp_path, url):
    pki, _ = intel
    asked: list[str] = []

    def recording_get(u):
        asked.append(u)
        return 500, {}, b""

    with pytest.raises(CollateralFetchError, match="refusing collateral URL"):
        fetch_intel(tmp_path, kind="sgx", fmspc=pki.fmspc, now=datetime.now(UTC), http_get=recording_get,
                    pcs_url=url, trust=pki.trust())
    with pytest.raises(CollateralFetchError, match="refusing collateral URL"):
        loopback_or_https_get()(url + "/x")
    assert asked == [] and files_in(tmp_path) == []


def test_an_oversized_response_is_refused(pcs, tmp_path):
    pcs.routes["/big"] = (200, {}, b"x" * 2048)
    with pytest.raises(CollateralFetchError, match="larger than 1024 bytes"):
        loopback_or_https_get(max_bytes=1024)(pcs.url + "/big")


# -- AMD ----------------------------------------------------------------------------------------
def test_snp_crls_chains_and_a_vcek_are_fetched_and_the_cached_vcek_completes_a_bare_report(amd, kds, tmp_path):
    fake = amd.evidence("Genoa", report_data=NONCE, measurement=b"\x5e" * 48)
    kds.add_vcek("Genoa", fake.fields.chip_id, fake.fields.reported_tcb, fake.leaf)
    written = fetch_snp(tmp_path, product="Genoa", now=datetime.now(UTC), http_get=http_get(), kds_url=kds.url,
                        trust=amd.trust(),
                        vcek_for=(fake.fields.chip_id, decode_tcb(fake.fields.reported_tcb, "Genoa")))
    assert [d.kind for d in written] == ["cert chain", "CRL", "cert chain", "CRL", "VCEK"]
    assert all(d.path.parent == tmp_path / "snp" / "Genoa" for d in written)
    policy = policy_from_mapping({"snp": {"measurement": [(b"\x5e" * 48).hex()]}})
    now = datetime.now(UTC)
    with pytest.raises(EvidenceInvalid):   # the bare report alone: no VCEK to check it with
        verify_evidence("snp", fake.report, policy, expected_report_data=NONCE, now=now, trust=amd.trust())
    options = CollateralDir(tmp_path, trust=amd.trust()).verify_options("snp", now)
    assert len(options["collateral"]["crls"]) == 2
    claims = verify_evidence("snp", fake.report, policy, expected_report_data=NONCE, now=now, trust=amd.trust(),
                             **options)
    assert claims.measurement == b"\x5e" * 48


def test_an_snp_crl_not_signed_by_the_pinned_ark_is_refused_and_nothing_is_written(amd, kds, tmp_path):
    from attestation.testing.snp import fake_rsa_key

    kds.routes["/vlek/v1/Milan/crl"] = (200, {}, amd_crl(amd, "Milan", key=fake_rsa_key("rogue")).public_bytes(DER))
    with pytest.raises(EvidenceInvalid, match="ARK's CRL: the signature of 'CN=ARK-Milan"):
        fetch_snp(tmp_path, product="Milan", now=datetime.now(UTC), http_get=http_get(), kds_url=kds.url,
                  trust=amd.trust())
    assert files_in(tmp_path) == []


def test_an_snp_chain_under_an_unpinned_ark_is_refused(amd, kds, tmp_path):
    with pytest.raises(EvidenceInvalid, match="pinned"):
        fetch_snp(tmp_path, product="Turin", now=datetime.now(UTC), http_get=http_get(), kds_url=kds.url)
    assert files_in(tmp_path) == []


def test_a_revoked_ask_in_the_cache_refuses_snp_evidence(amd, kds, tmp_path):
    kds.routes["/vcek/v1/Genoa/crl"] = (200, {}, amd_crl(amd, "Genoa", revoked=[]).public_bytes(DER))
    fetch_snp(tmp_path, product="Genoa", now=datetime.now(UTC), http_get=http_get(), kds_url=kds.url,
              trust=amd.trust(), signing_keys=("vcek",))
    revoking = amd_crl(amd, "Genoa", revoked=[amd.ask("Genoa").serial_number]).public_bytes(DER)
    write_atomic(tmp_path / "snp" / "Genoa", "crl-vcek.der", revoking)
    fake = amd.evidence("Genoa", report_data=NONCE, measurement=b"\x5e" * 48)
    now = datetime.now(UTC)
    with pytest.raises(EvidenceInvalid, match="revoked"):
        verify_evidence("snp", fake.report, policy_from_mapping({"snp": {"measurement": [(b"\x5e" * 48).hex()]}}),
                        expected_report_data=NONCE, now=now,
                        **with_collateral(CollateralDir(tmp_path, trust=amd.trust()), "snp", now,
                                          {"certs": fake.certs, "trust": amd.trust()}))


# -- the directory verifiers reuse ----------------------------------------------------------------
def test_a_directory_is_read_once_and_again_when_a_file_changes_or_the_earliest_next_update_passes(intel, pcs,
                                                                                                     tmp_path):
    pki, _ = intel
    fetch_both_intel(pki, pcs, tmp_path)
    source, now = CollateralDir(tmp_path, trust=pki.trust()), datetime.now(UTC)
    first = source.for_platform("tdx", now)
    assert source.for_platform("tdx", now + timedelta(days=1)) is first and source.loads == 1
    crl = tmp_path / "intel" / "root_ca_crl.der"
    os.utime(crl, ns=(crl.stat().st_atime_ns, crl.stat().st_mtime_ns + 1_000_000_000))
    assert source.for_platform("tdx", now) is not first and source.loads == 2
    source.for_platform("tdx", now + timedelta(days=40))          # past every nextUpdate (30 days): read again
    assert source.loads == 3


def test_a_tampered_file_in_the_directory_is_an_error_naming_it(intel, pcs, tmp_path):
    pki, _ = intel
    fetch_both_intel(pki, pcs, tmp_path)
    target = tmp_path / "intel" / "qe_identity-tdx.json"
    target.write_bytes(target.read_bytes().replace(b'"isvprodid":2', b'"isvprodid":3'))
    with pytest.raises(EvidenceInvalid, match=r"collateral in .*intel: qe_identity-tdx\.json: .*signature"):
        CollateralDir(tmp_path, trust=pki.trust()).for_platform("tdx", datetime.now(UTC))
    (tmp_path / "snp" / "Milan").mkdir(parents=True)
    (tmp_path / "snp" / "Milan" / "crl-vcek.der").write_bytes(b"garbage")
    with pytest.raises(EvidenceMalformed, match=r"snp/Milan/crl-vcek\.der: neither a CRL nor a certificate"):
        CollateralDir(tmp_path).for_platform("snp", datetime.now(UTC))


def test_a_missing_or_empty_directory_is_no_collateral_and_a_flat_directory_works(intel, tmp_path):
    pki, _ = intel
    now = datetime.now(UTC)
    assert CollateralDir(tmp_path / "absent").for_platform("sgx", now) == {}
    assert CollateralDir(tmp_path).for_platform("snp", now) == {}
    assert CollateralDir(tmp_path).for_platform("sim", now) == {}
    flat = pki.write_collateral_dir(tmp_path / "flat", crls=[pki.crl(issuer="root")])   # no intel/ subdirectory
    assert set(CollateralDir(flat, trust=pki.trust()).for_platform("sgx", now)) == {"crls"}


def test_the_default_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "enclaveq" / "collateral"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "enclaveq" / "collateral"


def test_writing_never_follows_a_symlink(tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"keep")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "crl-vcek.der").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CollateralFetchError, match="not a regular file"):
        write_atomic(tmp_path / "dir", "crl-vcek.der", b"new")
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    with pytest.raises(CollateralFetchError, match="symbolic link"):
        write_atomic(tmp_path / "link", "x.der", b"new")
    assert (tmp_path / "elsewhere").read_bytes() == b"keep"


# -- the commands ---------------------------------------------------------------------------------
@pytest.fixture
def fake_roots(monkeypatch, intel, amd):
    """The process's default trust anchors replaced by the fake Intel and AMD roots (in-process
    CLI runs only: nothing a user runs can do this)."""
    pki, _ = intel
    fake = TrustAnchors({**pki.trust().roots, **amd.trust().roots})
    monkeypatch.setattr(trust_module, "DEFAULT_TRUST", fake)
    monkeypatch.setattr(verify_module, "DEFAULT_TRUST", fake)
    return fake


def invoke(*args: str):
    from enclaveq.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_collateral_fetch_and_show_on_the_command_line(fake_roots, intel, pcs, kds, tmp_path, monkeypatch):
    pki, qe = intel
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    quote = tmp_path / "quote.hex"
    quote.write_text(qe.tdx_quote().hex())
    result = invoke("collateral", "fetch", "--platform", "tdx", "--evidence", str(quote), "--pcs-url", pcs.url)
    assert result.exit_code == 0, result.output
    assert "TCB Info" in result.output and "issuer C=US" in result.output and "nextUpdate 20" in result.output
    assert (tmp_path / "cache" / "intel" / f"tcb_info-tdx-{pki.fmspc.hex()}.json").is_file()
    result = invoke("collateral", "fetch", "--platform", "snp", "--product", "Genoa", "--kds-url", kds.url)
    assert result.exit_code == 0, result.output
    # A CRL that went stale is marked.
    stale = amd_crl(amd_of(kds), "Genoa", next_update=datetime.now(UTC) - timedelta(seconds=1))
    write_atomic(tmp_path / "cache" / "snp" / "Genoa", "crl-vlek.der", stale.public_bytes(DER))
    shown = invoke("collateral", "show")
    assert shown.exit_code == 0
    lines = shown.output.splitlines()
    assert any("TCB Info" in line and "TDX FMSPC" in line for line in lines)
    stale_at = next(i for i, line in enumerate(lines) if "snp/Genoa/crl-vlek.der" in line)
    assert lines[stale_at + 1].rstrip().endswith("STALE")
    assert not any(line.rstrip().endswith("STALE") for line in lines[:stale_at])
    assert "\"stale\": true" in invoke("collateral", "show", "--json").output


def amd_of(kds: FakeKds) -> FakeAmd:
    return kds.amd


def enclaveq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "enclaveq", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_fetch_errors_are_one_line_with_the_documented_exit_codes(pcs, tmp_path):
    out = tmp_path / "out"
    failed = enclaveq("collateral", "fetch", "--platform", "sgx", "--fmspc", "00906ed50000", "--out", str(out),
                      "--pcs-url", pcs.url + "/nowhere", cwd=tmp_path)        # 404 (and any real root fails)
    assert failed.returncode == 1 and failed.stderr.startswith("error: collateral fetch failed: ")
    assert "HTTP 404" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    refused = enclaveq("collateral", "fetch", "--platform", "sgx", "--fmspc", "00906ed50000", "--out", str(out),
                       "--pcs-url", "http://pcs.example.test", cwd=tmp_path)
    assert refused.returncode == 2 and "refusing collateral URL 'http://pcs.example.test'" in refused.stderr
    usage = enclaveq("collateral", "fetch", "--platform", "sgx", "--fmspc", "0090", "--out", str(out), cwd=tmp_path)
    assert usage.returncode == 2 and "--fmspc" in usage.stderr
    missing = enclaveq("collateral", "fetch", "--platform", "snp", "--out", str(out), cwd=tmp_path)
    assert missing.returncode == 2 and "--product" in missing.stderr
    assert files_in(out) == []


def test_show_lists_an_inventory_without_verifying(intel, pcs, tmp_path):
    pki, _ = intel
    fetch_both_intel(pki, pcs, tmp_path)
    docs = describe_directory(tmp_path)
    assert {d.kind for d in docs} == {"TCB Info", "QE Identity", "CRL"} and len(docs) == 7
    assert not any(d.stale(datetime.now(UTC)) for d in docs)
    assert all(d.stale(datetime.now(UTC) + timedelta(days=31)) for d in docs)


def test_a_policy_violation_is_still_a_violation_with_collateral(intel, pcs, tmp_path):
    # Collateral adds a TCB judgement; it never replaces the policy's measurement pins.
    pki, qe = intel
    fetch_both_intel(pki, pcs, tmp_path)
    now = datetime.now(UTC)
    with pytest.raises(PolicyViolation, match="tdx.mrtd"):
        verify_evidence("tdx", qe.tdx_quote(report_data=NONCE, mrtd=b"\x01" * 48),
                        policy_from_mapping({"tdx": tdx_code_pin()}), expected_report_data=NONCE, now=now,
                        trust=pki.trust(), **CollateralDir(tmp_path, trust=pki.trust()).verify_options("tdx", now))

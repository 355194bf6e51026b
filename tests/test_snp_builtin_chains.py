"""AMD's chains are built in: a real SEV-SNP report verifies with its VCEK alone (issue 15, item 1).

The package carries AMD's published ASK/ASVK + ARK for Milan, Genoa and Turin
(attestation/trust/amd/), each checked at load against the pinned ARK fingerprints. A chain the
user gives (``--cert``, the report's certificate table) is still used first and still checked, so
a wrong given ASK fails instead of being replaced; a VCEK of another product line is refused; a
built-in chain whose ARK is not pinned in the trust anchors is never used.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import replace
from datetime import datetime, UTC
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.errors import EvidenceInvalid
from attestation.platforms import VerificationInputs
from attestation.snp import PLATFORM, clear_caches, load_certificates
from attestation.snp import verify as snp_verify
from attestation.trust import DEFAULT_TRUST, TrustAnchors
from attestation.trust import amd
from attestation.trust.amd import ARK_FINGERPRINTS, BUNDLED_CHAIN_FILES, BundledChainError, load_bundled_chain

from .processes import enclaveq

NOW = datetime(2026, 11, 27, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO / "attestation" / "trust" / "amd"
# Every real SEV-SNP report among the vectors, with its VCEK and product line.
REPORTS = {
    "snp/trustee/test-report.bin": ("snp/trustee/test-vcek.der", "Milan"),
    "snp/trustee/az-snp-vtpm/evidence-genoa.snp-report.bin": ("snp/trustee/az-snp-vtpm/vcek-genoa.pem", "Genoa"),
}
MILAN, GENOA = REPORTS


def _vcek(vectors_dir: Path, name: str) -> tuple[x509.Certificate, ...]:
    return load_certificates((vectors_dir / REPORTS[name][0]).read_bytes())


def _verify(report: bytes, certs=(), *, trust: TrustAnchors = DEFAULT_TRUST):
    return PLATFORM.verify(report, VerificationInputs(now=NOW, extra_certs=tuple(certs), trust=trust))


def _flip_signature(cert: x509.Certificate) -> x509.Certificate:
    der = bytearray(cert.public_bytes(Encoding.DER))
    der[-10] ^= 0x01  # inside the signature: still parses, same subject, no longer AMD-signed
    return load_certificates(bytes(der))[0]


def _certificate_table(*certs: x509.Certificate) -> bytes:
    """A GHCB certificate table (24-byte entries: GUID, offset, length; zero entry last)."""
    ders = [c.public_bytes(Encoding.DER) for c in certs]
    offset = 24 * (len(ders) + 1)
    entries, blobs = b"", b""
    for der in ders:
        entries += bytes(16) + (offset + len(blobs)).to_bytes(4, "little") + len(der).to_bytes(4, "little")
        blobs += der
    return entries + bytes(24) + blobs


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_caches()  # every test proves its own chain, not one another test cached
    yield
    clear_caches()


# -- the bundled certificates --------------------------------------------------------------------


def test_all_six_bundled_chains_load_and_each_ark_is_the_pinned_one():
    chains = amd.bundled_chains()
    assert sorted((c.product, c.signing_key) for c in chains) == sorted(BUNDLED_CHAIN_FILES)
    for chain in chains:
        assert chain.ark.fingerprint(hashes.SHA256()) == ARK_FINGERPRINTS[chain.product]
        cn = chain.intermediate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == (f"SEV-{chain.product}" if chain.signing_key == "vcek" else f"SEV-VLEK-{chain.product}")


def test_the_bundled_files_are_amds_published_chains_byte_for_byte(vectors_dir):
    assert sorted(p.name for p in BUNDLE_DIR.iterdir()) == sorted(BUNDLED_CHAIN_FILES.values())
    for name in BUNDLED_CHAIN_FILES.values():
        assert (BUNDLE_DIR / name).read_bytes() == (vectors_dir / "snp/go-sev-guest" / name).read_bytes(), name


def test_the_bundled_files_are_package_data():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "amd/*.pem" in setuptools["package-data"]["attestation.trust"]


def test_a_tampered_bundled_file_is_refused_at_load():
    data = (BUNDLE_DIR / "ask_ark_milan.pem").read_bytes()
    intermediate, ark = x509.load_pem_x509_certificates(data)
    assert load_bundled_chain("Milan", "vcek", data).intermediate == intermediate
    forged_ask = _flip_signature(intermediate).public_bytes(Encoding.PEM) + ark.public_bytes(Encoding.PEM)
    with pytest.raises(BundledChainError, match="signature does not verify"):
        load_bundled_chain("Milan", "vcek", forged_ask)
    with pytest.raises(BundledChainError, match="pinned ARK"):  # Milan's ASK with Genoa's (pinned) ARK
        genoa_ark = x509.load_pem_x509_certificates((BUNDLE_DIR / "ask_ark_genoa.pem").read_bytes())[1]
        load_bundled_chain("Milan", "vcek", intermediate.public_bytes(Encoding.PEM) + genoa_ark.public_bytes(Encoding.PEM))
    with pytest.raises(BundledChainError, match="not 'SEV-VLEK-Milan'"):  # the ASK filed as the ASVK
        load_bundled_chain("Milan", "vlek", data)
    with pytest.raises(BundledChainError, match="not a PEM"):
        load_bundled_chain("Milan", "vcek", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# -- real vectors with only the VCEK ------------------------------------------------------------------


@pytest.mark.parametrize("name", REPORTS)
def test_each_real_report_verifies_with_only_its_vcek_and_says_what_expected_json_says(vectors_dir, name):
    entry = json.loads((vectors_dir / "EXPECTED.json").read_text())[name]
    want = entry["report"]
    verified = _verify((vectors_dir / name).read_bytes(), _vcek(vectors_dir, name))

    claims = verified.claims
    assert claims["product"] == REPORTS[name][1] and claims["signing_key"] == "vcek"
    assert (claims["version"], claims["guest_svn"], hex(claims["policy"]), claims["vmpl"]) == (
        want["version"], want["guest_svn"], want["policy"], want["vmpl"])
    for key in ("measurement", "host_data", "id_key_digest", "author_key_digest", "report_data", "chip_id"):
        assert claims[key].hex() == want[key], key
    assert claims["reported_tcb"] == {k: v for k, v in want["reported_tcb"].items() if k != "raw"}
    assert verified.debug is want["policy_decoded"]["debug"]
    # The chain is the VCEK, then AMD's ASK and ARK exactly as EXPECTED.json lists them.
    assert verified.chain[0].subject == entry["vcek"]["subject"]
    assert [(c.subject, c.not_before.isoformat(), c.not_after.isoformat()) for c in verified.chain[1:]] == [
        (c["subject"], c["not_before"], c["not_after"]) for c in entry["chain"]]
    assert verified.chain[-1].sha256 == ARK_FINGERPRINTS[REPORTS[name][1]]


@pytest.mark.parametrize("name", REPORTS)
def test_a_vcek_alone_in_the_reports_certificate_table_suffices(vectors_dir, name):
    report = (vectors_dir / name).read_bytes() + _certificate_table(*_vcek(vectors_dir, name))
    verified = _verify(report)
    assert verified.claims["product"] == REPORTS[name][1] and verified.trailing_bytes > 0


@pytest.mark.vectors
@pytest.mark.parametrize("name", REPORTS)
def test_the_cli_verifies_a_real_report_with_only_cert_vcek(vectors_dir, name):
    result = enclaveq("evidence", "verify", str(vectors_dir / name), "--platform", "snp",
                      "--cert", str(vectors_dir / REPORTS[name][0]), "--at", "2026-11-27T00:00:00Z", "--json")
    doc = json.loads(result.stdout)
    assert doc["verified"] is True and doc["errors"] == []
    assert doc["claims"]["product"] == REPORTS[name][1]
    assert [c["subject"].split(",")[0] for c in doc["chain"]] == [
        "CN=SEV-VCEK", f"CN=SEV-{REPORTS[name][1]}", f"CN=ARK-{REPORTS[name][1]}"]


@pytest.mark.parametrize("name", REPORTS)
def test_the_given_chain_is_still_used_in_any_order(vectors_dir, name):
    product = REPORTS[name][1].lower()
    chain = load_certificates((vectors_dir / f"snp/go-sev-guest/ask_ark_{product}.pem").read_bytes())
    verified = _verify((vectors_dir / name).read_bytes(), tuple(reversed(chain)) + _vcek(vectors_dir, name))
    assert verified.chain[-1].sha256 == ARK_FINGERPRINTS[REPORTS[name][1]]


# -- refusals ------------------------------------------------------------------------------------------


def test_a_vcek_of_another_product_line_than_the_report_is_refused_by_name(vectors_dir):
    genoa_report = (vectors_dir / GENOA).read_bytes()  # v3: its signed CPUID says Genoa
    with pytest.raises(EvidenceInvalid, match=r"VCEK is of another product line than the report: it is for Milan "
                                              r"\(productName 'Milan-B0'\) but the report CPUID .* says Genoa"):
        _verify(genoa_report, _vcek(vectors_dir, MILAN))


def test_a_v2_report_without_cpuid_is_refused_with_another_product_lines_vcek(vectors_dir):
    # A v2 report does not say its product: the Genoa VCEK's chain verifies, its TCB does not.
    with pytest.raises(EvidenceInvalid, match="REPORTED_TCB .* is not the TCB the VCEK was issued for"):
        _verify((vectors_dir / MILAN).read_bytes(), _vcek(vectors_dir, GENOA))


@pytest.mark.parametrize("name", REPORTS)
def test_a_wrong_given_ask_is_used_and_refused_not_replaced_by_the_builtin_one(vectors_dir, name):
    product = REPORTS[name][1].lower()
    ask, ark = load_certificates((vectors_dir / f"snp/go-sev-guest/ask_ark_{product}.pem").read_bytes())
    report, vcek = (vectors_dir / name).read_bytes(), _vcek(vectors_dir, name)
    with pytest.raises(EvidenceInvalid, match="is not signed by"):
        _verify(report, vcek + (_flip_signature(ask),))  # the ARK comes from the bundle
    with pytest.raises(EvidenceInvalid, match="is not signed by"):
        _verify(report, vcek + (_flip_signature(ask), ark))
    with pytest.raises(EvidenceInvalid, match="is not signed by"):  # the same, in the certificate table
        _verify(report + _certificate_table(vcek[0], _flip_signature(ask)))


@pytest.mark.parametrize("name", REPORTS)
def test_a_wrong_given_ark_is_refused(vectors_dir, name):
    product = REPORTS[name][1].lower()
    ask, ark = load_certificates((vectors_dir / f"snp/go-sev-guest/ask_ark_{product}.pem").read_bytes())
    with pytest.raises(EvidenceInvalid, match="is not a pinned AMD root"):
        _verify((vectors_dir / name).read_bytes(), _vcek(vectors_dir, name) + (ask, _flip_signature(ark)))


def test_another_product_lines_chain_given_with_the_vcek_is_refused_not_ignored(vectors_dir):
    genoa_chain = load_certificates((vectors_dir / "snp/go-sev-guest/ask_ark_genoa.pem").read_bytes())
    with pytest.raises(EvidenceInvalid, match=r"chain given is for Genoa .* VCEK is for Milan .* built in"):
        _verify((vectors_dir / MILAN).read_bytes(), _vcek(vectors_dir, MILAN) + genoa_chain)


def test_a_genuine_asvk_given_alongside_the_vcek_is_harmless(vectors_dir):
    asvk_and_ark = load_certificates((vectors_dir / "snp/go-sev-guest/ask_ark_milan_vlek.pem").read_bytes())
    assert _verify((vectors_dir / MILAN).read_bytes(), _vcek(vectors_dir, MILAN) + asvk_and_ark).claims["product"] == "Milan"


def test_a_tampered_bundled_intermediate_is_refused(vectors_dir, monkeypatch):
    genuine = amd.bundled_chain("Milan", "vcek")
    forged = replace(genuine, intermediate=_flip_signature(genuine.intermediate))
    monkeypatch.setattr(snp_verify, "bundled_chain", lambda product, kind: forged)
    with pytest.raises(EvidenceInvalid, match="ASK certificate .*SEV-Milan.* is not signed by"):
        _verify((vectors_dir / MILAN).read_bytes(), _vcek(vectors_dir, MILAN))


def test_a_bundled_file_that_fails_its_check_is_a_typed_refusal(vectors_dir, monkeypatch):
    def broken(product, kind):
        raise BundledChainError("attestation/trust/amd/ask_ark_milan.pem: the ARK's signature does not verify")
    monkeypatch.setattr(snp_verify, "bundled_chain", broken)
    with pytest.raises(EvidenceInvalid, match="built-in Milan ASK/ARK chain cannot be used.*Reinstall"):
        _verify((vectors_dir / MILAN).read_bytes(), _vcek(vectors_dir, MILAN))


@pytest.mark.parametrize("name", REPORTS)
def test_the_builtin_chain_is_not_used_when_its_ark_is_not_pinned(vectors_dir, name):
    product = REPORTS[name][1]
    others = frozenset(fp for p, fp in ARK_FINGERPRINTS.items() if p != product)
    with pytest.raises(EvidenceInvalid, match=rf"ASK .* was not given.*/vcek/v1/{product}/cert_chain"):
        _verify((vectors_dir / name).read_bytes(), _vcek(vectors_dir, name), trust=TrustAnchors({"snp": others}))


def test_every_real_report_verifies_with_its_vcek_alone_in_under_5_ms_warm(vectors_dir):
    for name in REPORTS:
        report, certs = (vectors_dir / name).read_bytes(), _vcek(vectors_dir, name)
        _verify(report, certs)  # cold: loads the bundle, verifies the chain
        times = []
        for _ in range(30):
            start = time.perf_counter()
            _verify(report, certs)
            times.append(time.perf_counter() - start)
        times.sort()
        assert times[len(times) // 2] < 0.005, f"{name}: median {times[len(times) // 2] * 1e3:.2f} ms"

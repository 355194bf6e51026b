"""SEV-SNP against the real reports in ../shared/vectors (see SOURCES.md / EXPECTED.json).

Every report verifies with the certificates EXPECTED.json names for it, and what it says equals
EXPECTED.json; a change to any byte of the signed region or the signature, to sampled bytes of
each certificate, or a truncation, fails with a typed error; the chain fails outside its
validity and under the wrong root; the intentionally invalid VCEKs fail.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, UTC
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.errors import AttestationError, EvidenceInvalid, EvidenceMalformed
from attestation.platforms import VerificationInputs
from attestation.snp import PLATFORM, clear_caches, load_certificates, parse_report
from attestation.snp.abi import decode_tcb
from attestation.snp.kds import cert_info, endorsement_extensions
from attestation.trust import DEFAULT_TRUST, TrustAnchors
from attestation.trust.amd import ARK_FINGERPRINTS, SNP_ROOTS

pytestmark = pytest.mark.vectors

NOW = datetime(2026, 11, 27, tzinfo=UTC)
TRUST = DEFAULT_TRUST.with_roots("snp", *SNP_ROOTS)
REPORTS = ("snp/trustee/test-report.bin", "snp/trustee/az-snp-vtpm/evidence-genoa.snp-report.bin")
PRODUCT = {"snp/trustee/test-report.bin": "Milan", "snp/trustee/az-snp-vtpm/evidence-genoa.snp-report.bin": "Genoa"}


def _expected(vectors_dir: Path) -> dict:
    return json.loads((vectors_dir / "EXPECTED.json").read_text())


def _case(vectors_dir: Path, name: str):
    entry = _expected(vectors_dir)[name]
    report = (vectors_dir / name).read_bytes()
    certs = load_certificates((vectors_dir / entry["vcek_file"]).read_bytes())
    for part in entry["chain_file"].split("+"):
        certs += load_certificates((vectors_dir / part).read_bytes())
    return entry, report, certs


def _inputs(certs, *, now=NOW, trust: TrustAnchors = TRUST, **kw) -> VerificationInputs:
    return VerificationInputs(now=now, extra_certs=tuple(certs), trust=trust, **kw)


def _tcb(parts) -> dict:
    return {"raw": f"0x{parts.raw:x}", **parts.as_dict()}


def test_the_vector_list_matches_expected_json(vectors_dir):
    assert sorted(k for k in _expected(vectors_dir) if k.startswith("snp/")) == sorted(REPORTS)


@pytest.mark.parametrize("name", REPORTS)
def test_each_report_verifies_with_its_certificates_and_says_what_expected_json_says(vectors_dir, name):
    entry, report, certs = _case(vectors_dir, name)
    want = entry["report"]
    verified = PLATFORM.verify(report, _inputs(certs))
    product = PRODUCT[name]

    claims = verified.claims
    assert set(claims) == {"version", "guest_svn", "policy", "measurement", "host_data", "id_key_digest",
                           "author_key_digest", "report_data", "chip_id", "reported_tcb", "vmpl", "signing_key",
                           "product"}
    assert claims["version"] == want["version"]
    assert claims["guest_svn"] == want["guest_svn"]
    assert hex(claims["policy"]) == want["policy"]
    for key in ("measurement", "host_data", "id_key_digest", "author_key_digest", "report_data", "chip_id"):
        assert claims[key].hex() == want[key], key
    assert claims["vmpl"] == want["vmpl"]
    assert claims["reported_tcb"] == {k: v for k, v in want["reported_tcb"].items() if k != "raw"}
    assert claims["signing_key"] == "vcek" and want["flags_0x48"]["signing_key"] == 0
    assert claims["product"] == product
    assert verified.measurement.hex() == want["measurement"]
    assert verified.report_data.hex() == want["report_data"]
    assert verified.debug is want["policy_decoded"]["debug"]
    assert verified.security_version == want["guest_svn"]
    assert verified.trailing_bytes == 0

    # The chain: VCEK then the chain EXPECTED.json lists.
    assert verified.chain[0].subject == entry["vcek"]["subject"]
    assert verified.chain[0].not_after.isoformat() == entry["vcek"]["not_after"]
    assert [(c.subject, c.not_before.isoformat(), c.not_after.isoformat()) for c in verified.chain[1:]] == [
        (c["subject"], c["not_before"], c["not_after"]) for c in entry["chain"]
    ]
    assert verified.chain[-1].sha256 == ARK_FINGERPRINTS[product]


@pytest.mark.parametrize("name", REPORTS)
def test_every_parsed_field_equals_expected_json(vectors_dir, name):
    want = _expected(vectors_dir)[name]["report"]
    rep = parse_report((vectors_dir / name).read_bytes())
    product = PRODUCT[name]
    assert rep.policy.raw == int(want["policy"], 16)
    decoded = want["policy_decoded"]
    assert (rep.policy.abi_minor, rep.policy.abi_major, rep.policy.smt, rep.policy.migrate_ma, rep.policy.debug,
            rep.policy.single_socket) == (decoded["abi_minor"], decoded["abi_major"], decoded["smt"],
                                          decoded["migrate_ma"], decoded["debug"], decoded["single_socket"])
    assert rep.family_id.hex() == want["family_id"] and rep.image_id.hex() == want["image_id"]
    assert rep.signature_algo == want["signature_algo"]
    assert hex(rep.platform_info) == want["platform_info"]
    flags = want["flags_0x48"]
    assert (rep.signer_info.raw, rep.signer_info.author_key_en, rep.signer_info.mask_chip_key,
            rep.signer_info.signing_key) == (int(flags["raw"], 16), bool(flags["author_key_en"]),
                                             bool(flags["mask_chip_key"]), flags["signing_key"])
    assert rep.report_id.hex() == want["report_id"] and rep.report_id_ma.hex() == want["report_id_ma"]
    for key in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
        assert _tcb(decode_tcb(getattr(rep, key), product)) == want[key], key
    assert [rep.current_build, rep.current_minor, rep.current_major] == want["current_build_minor_major"]
    assert [rep.committed_build, rep.committed_minor, rep.committed_major] == want["committed_build_minor_major"]
    assert hex(rep.signature_r) == want["sig_r_hex_be"] and hex(rep.signature_s) == want["sig_s_hex_be"]
    if rep.version >= 3:
        assert (rep.cpuid_fam_id, rep.cpuid_mod_id, rep.cpuid_step) == (
            want["cpuid_fam_id"], want["cpuid_mod_id"], want["cpuid_step"])
        assert rep.cpuid_product == product
    else:
        assert rep.cpuid_fam_id is None and rep.cpuid_product is None


@pytest.mark.parametrize("name", REPORTS)
def test_vcek_extensions_equal_expected_json(vectors_dir, name):
    entry = _expected(vectors_dir)[name]
    vcek = load_certificates((vectors_dir / entry["vcek_file"]).read_bytes())[0]
    exts = endorsement_extensions(vcek)
    raw = entry["vcek_ext"]
    assert exts.struct_version == int(raw["1.3.6.1.4.1.3704.1.1"][4:], 16)
    assert exts.product_name == bytes.fromhex(raw["1.3.6.1.4.1.3704.1.2"])[2:].decode()
    for n in (1, 2, 3, 4, 5, 6, 7, 8):
        assert exts.spl[n] == int.from_bytes(bytes.fromhex(raw[f"1.3.6.1.4.1.3704.1.3.{n}"])[2:], "big")
    assert exts.hwid.hex() == raw["1.3.6.1.4.1.3704.1.4"] == entry["report"]["chip_id"]
    assert exts.csp_id is None
    assert cert_info(vcek).role == "vcek"


def test_the_pinned_milan_and_genoa_arks_are_the_vector_arks(vectors_dir):
    for product, path in (("Milan", "snp/virtee-sev/milan/ark.pem"), ("Genoa", "snp/virtee-sev/genoa/ark.pem")):
        ark = load_certificates((vectors_dir / path).read_bytes())[0]
        assert ark.fingerprint(hashes.SHA256()) == ARK_FINGERPRINTS[product]
        ark.verify_directly_issued_by(ark)
    for path in ("snp/trustee/milan_ask_ark_asvk.pem", "snp/trustee/genoa_ask_ark_asvk.pem"):
        roles = sorted(cert_info(c).role for c in load_certificates((vectors_dir / path).read_bytes()))
        assert roles == ["ark", "intermediate", "intermediate"]


@pytest.mark.parametrize("chain_file", ["snp/trustee/milan_ask_ark_asvk.pem", "snp/go-sev-guest/ask_ark_milan.pem"])
def test_the_milan_report_verifies_with_any_copy_of_the_chain_in_any_order(vectors_dir, chain_file):
    _, report, _ = _case(vectors_dir, REPORTS[0])
    vcek = load_certificates((vectors_dir / "snp/trustee/test-vcek.der").read_bytes())
    chain = load_certificates((vectors_dir / chain_file).read_bytes())
    verified = PLATFORM.verify(report, _inputs(tuple(reversed(chain)) + vcek))
    assert verified.claims["product"] == "Milan"


@pytest.mark.parametrize("invalid", ["snp/trustee/test-vcek-invalid-legacy.der", "snp/trustee/test-vcek-invalid-new.der"])
def test_the_intentionally_invalid_vceks_fail(vectors_dir, invalid):
    _, report, certs = _case(vectors_dir, REPORTS[0])
    bad = load_certificates((vectors_dir / invalid).read_bytes())
    with pytest.raises(EvidenceInvalid, match="is not signed by"):
        PLATFORM.verify(report, _inputs(bad + certs[1:]))
    # Their extensions parse (raw and OCTET STRING-wrapped hwID alike): hwID 00..3f.
    exts = endorsement_extensions(bad[0])
    assert exts.hwid == bytes(range(64)) and exts.product_name == "Milan-B0"


def test_the_genuine_vcek_is_preferred_over_an_invalid_one_given_alongside(vectors_dir):
    _, report, certs = _case(vectors_dir, REPORTS[0])
    bad = load_certificates((vectors_dir / "snp/trustee/test-vcek-invalid-new.der").read_bytes())
    assert PLATFORM.verify(report, _inputs(bad + certs)).claims["product"] == "Milan"


@pytest.mark.parametrize("name", REPORTS)
def test_without_the_vcek_the_error_says_to_pass_it(vectors_dir, name):
    _, report, certs = _case(vectors_dir, name)
    with pytest.raises(EvidenceInvalid, match=r"no VCEK certificate was given: pass it with --cert"):
        PLATFORM.verify(report, _inputs(certs[1:]))


@pytest.mark.parametrize("name", REPORTS)
def test_the_vcek_alone_suffices_amds_chain_is_built_in(vectors_dir, name):
    # Issue 15: the ASK and ARK of every product line ship with enclaveq (attestation/trust/amd/),
    # still checked against the pinned ARK; tests/test_snp_builtin_chains.py has the refusals.
    _, report, certs = _case(vectors_dir, name)
    assert PLATFORM.verify(report, _inputs(certs[:1])) == PLATFORM.verify(report, _inputs(certs))
    assert PLATFORM.verify(report, _inputs(certs[:2])) == PLATFORM.verify(report, _inputs(certs))


def test_a_report_with_the_other_products_chain_fails(vectors_dir):
    _, milan_report, milan_certs = _case(vectors_dir, REPORTS[0])
    _, _, genoa_certs = _case(vectors_dir, REPORTS[1])
    with pytest.raises(EvidenceInvalid):
        PLATFORM.verify(milan_report, _inputs(milan_certs[:1] + genoa_certs[1:]))


@pytest.mark.parametrize("name", REPORTS)
def test_the_chain_expires_and_is_not_yet_valid_outside_its_validity(vectors_dir, name):
    entry, report, certs = _case(vectors_dir, name)
    not_before = datetime.fromisoformat(entry["vcek"]["not_before"])
    not_after = datetime.fromisoformat(entry["vcek"]["not_after"])
    assert PLATFORM.verify(report, _inputs(certs, now=not_after)).claims["version"] == entry["report"]["version"]
    with pytest.raises(EvidenceInvalid, match="expired"):
        PLATFORM.verify(report, _inputs(certs, now=datetime(2046, 1, 1, tzinfo=UTC)))
    with pytest.raises(EvidenceInvalid, match="expired"):
        PLATFORM.verify(report, _inputs(certs, now=not_after.replace(year=not_after.year + 1)))
    with pytest.raises(EvidenceInvalid, match="not valid before"):
        PLATFORM.verify(report, _inputs(certs, now=not_before.replace(year=not_before.year - 1)))
    # and back inside the validity (the cache must not remember the failure)
    PLATFORM.verify(report, _inputs(certs, now=not_before))


@pytest.mark.parametrize("name", REPORTS)
def test_a_wrong_or_missing_root_fails(vectors_dir, name):
    _, report, certs = _case(vectors_dir, name)
    other = (set(SNP_ROOTS) - {ARK_FINGERPRINTS[PRODUCT[name]]})
    with pytest.raises(EvidenceInvalid, match="is not a pinned AMD root"):
        PLATFORM.verify(report, _inputs(certs, trust=TrustAnchors({"snp": frozenset(other)})))
    with pytest.raises(EvidenceInvalid, match="no SEV-SNP root is pinned"):
        PLATFORM.verify(report, _inputs(certs, trust=TrustAnchors({"sgx": frozenset(SNP_ROOTS)})))


@pytest.mark.parametrize("name", REPORTS)
def test_trailing_bytes_are_tolerated_and_counted(vectors_dir, name):
    _, report, certs = _case(vectors_dir, name)
    verified = PLATFORM.verify(report + b"\x00" * 70 + b"junk", _inputs(certs))
    assert verified.trailing_bytes == 74
    assert verified.measurement == PLATFORM.verify(report, _inputs(certs)).measurement


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1:]


@pytest.mark.parametrize("name", REPORTS)
def test_flipping_any_byte_of_the_signed_region_or_the_signature_fails_typed(vectors_dir, name):
    _, report, certs = _case(vectors_dir, name)
    inputs = _inputs(certs)
    PLATFORM.verify(report, inputs)  # warm the chain cache: every failure below is the report's own
    kinds = {}
    for index in range(len(report)):  # [0, 0x2A0) signed, [0x2A0, 0x4A0) signature structure
        with pytest.raises(AttestationError) as info:
            PLATFORM.verify(_flip(report, index), inputs)
        kinds[type(info.value)] = kinds.get(type(info.value), 0) + 1
    assert set(kinds) <= {EvidenceInvalid, EvidenceMalformed} and sum(kinds.values()) == 1184


@pytest.mark.parametrize("name", REPORTS)
def test_truncation_at_every_length_fails_typed(vectors_dir, name):
    _, report, certs = _case(vectors_dir, name)
    inputs = _inputs(certs)
    for length in range(len(report)):
        with pytest.raises(EvidenceMalformed):
            PLATFORM.verify(report[:length], inputs)


@pytest.mark.parametrize("name", REPORTS)
def test_flipping_sampled_bytes_of_each_certificate_fails_typed(vectors_dir, name):
    _, report, certs = _case(vectors_dir, name)
    ders = [c.public_bytes(Encoding.DER) for c in certs]
    tried = 0
    for position, der in enumerate(ders):
        indices = sorted(set(range(0, len(der), 7)) | set(range(len(der) - 24, len(der))) | set(range(0, 24)))
        for index in indices:
            try:
                damaged = load_certificates(_flip(der, index))
            except EvidenceMalformed:
                tried += 1
                continue  # a certificate that does not even parse never gets further
            chain = [load_certificates(d)[0] for d in ders]
            chain[position] = damaged[0]
            with pytest.raises(AttestationError):
                PLATFORM.verify(report, _inputs(chain))
            tried += 1
    assert tried > 600


def test_every_vector_verifies_in_under_5_ms_with_warm_caches(vectors_dir):
    clear_caches()
    for name in REPORTS:
        _, report, certs = _case(vectors_dir, name)
        inputs = _inputs(certs)
        PLATFORM.verify(report, inputs)  # cold: parses extensions, verifies the chain
        times = []
        for _ in range(30):
            start = time.perf_counter()
            PLATFORM.verify(report, inputs)
            times.append(time.perf_counter() - start)
        times.sort()
        assert times[len(times) // 2] < 0.005, f"{name}: median {times[len(times) // 2] * 1e3:.2f} ms"

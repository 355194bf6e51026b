"""The SEV-SNP report parser and the AMD certificate helpers: layouts, format checks, fuzzing.

Runs without the vectors (synthetic reports from attestation.testing.snp.ReportFields); the
fuzz tests also mutate the real reports when ../shared/vectors is present.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import EvidenceMalformed
from attestation.snp.abi import (
    REPORT_SIZE,
    SIGNED_SIZE,
    decode_tcb,
    encode_tcb,
    parse_report,
    product_from_cpuid,
)
from attestation.snp.kds import (
    cert_chain_url,
    crl_url,
    endorsement_extensions,
    load_certificates,
    product_line,
    vcek_url,
)
from attestation.testing.snp import ReportFields

# Inputs tried per run (hypothesis max_examples): random bytes, patched synthetic reports,
# patched real reports, AMD extension values.
# (hypothesis costs a few ms per example here, so the bulk comes from a seeded loop below).
RANDOM_EXAMPLES = 200
PATCHED_EXAMPLES = 400
MUTATION_EXAMPLES = 300
EXTENSION_EXAMPLES = 200
SEEDED_MUTATIONS = 20_000
_BASE: dict[object, bytes] = {}


def _report(**fields) -> bytes:
    """An (unsigned) report: the fields plus an arbitrary in-range R and S."""
    signed = ReportFields(**fields).encode()
    return signed + (7).to_bytes(72, "little") + (9).to_bytes(72, "little") + bytes(REPORT_SIZE - SIGNED_SIZE - 144)


def test_every_field_lands_at_its_documented_offset():
    fields = ReportFields(
        version=3, guest_svn=0x11223344, policy=0x3001F | (1 << 19), family_id=b"F" * 16, image_id=b"I" * 16,
        vmpl=2, current_tcb=0x0102030405060708, platform_info=0x25, author_key_en=True, mask_chip_key=False,
        signing_key=1, report_data=b"R" * 64, measurement=b"M" * 48, host_data=b"H" * 32, id_key_digest=b"K" * 48,
        author_key_digest=b"A" * 48, report_id=b"i" * 32, report_id_ma=b"m" * 32, reported_tcb=0x7308000000000003,
        cpuid=(0x19, 0x11, 0x01), chip_id=b"C" * 64, committed_tcb=5, current_version=(1, 55, 40),
        committed_version=(1, 54, 39), launch_tcb=6,
    )
    raw = _report(**fields.__dict__)
    assert raw[0x90:0xC0] == b"M" * 48 and raw[0x50:0x90] == b"R" * 64 and raw[0x1A0:0x1E0] == b"C" * 64
    rep = parse_report(raw)
    assert rep.version == 3 and rep.guest_svn == 0x11223344
    assert rep.policy.raw == 0x3001F | (1 << 19) and rep.policy.debug and rep.policy.smt and not rep.policy.migrate_ma
    assert (rep.policy.abi_major, rep.policy.abi_minor) == (0, 0x1F)
    assert rep.family_id == b"F" * 16 and rep.image_id == b"I" * 16 and rep.vmpl == 2
    assert rep.current_tcb == 0x0102030405060708 and rep.platform_info == 0x25
    assert rep.signer_info.author_key_en and not rep.signer_info.mask_chip_key and rep.signing_key == "vlek"
    assert rep.host_data == b"H" * 32 and rep.id_key_digest == b"K" * 48 and rep.author_key_digest == b"A" * 48
    assert rep.report_id == b"i" * 32 and rep.report_id_ma == b"m" * 32
    assert rep.reported_tcb == 0x7308000000000003 and rep.committed_tcb == 5 and rep.launch_tcb == 6
    assert (rep.cpuid_fam_id, rep.cpuid_mod_id, rep.cpuid_step) == (0x19, 0x11, 0x01) and rep.cpuid_product == "Genoa"
    assert (rep.current_major, rep.current_minor, rep.current_build) == (1, 55, 40)
    assert (rep.committed_major, rep.committed_minor, rep.committed_build) == (1, 54, 39)
    assert rep.launch_mit_vector is None and rep.current_mit_vector is None
    assert (rep.signature_r, rep.signature_s) == (7, 9)
    assert rep.signed_bytes == raw[:SIGNED_SIZE] and rep.trailing_bytes == 0


def test_version_2_has_no_cpuid_and_version_5_has_mitigation_vectors():
    v2 = parse_report(_report(version=2))
    assert v2.cpuid_fam_id is None and v2.cpuid_product is None
    v5 = parse_report(_report(version=5, cpuid=(0x1A, 0x02, 0), launch_mit_vector=3, current_mit_vector=7))
    assert (v5.launch_mit_vector, v5.current_mit_vector, v5.cpuid_product) == (3, 7, "Turin")
    assert parse_report(_report(version=4)).launch_mit_vector == 0


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_an_unsupported_version_is_malformed(version):
    with pytest.raises(EvidenceMalformed, match=f"VERSION {version} is not supported"):
        parse_report(_report(version=version))


@pytest.mark.parametrize(
    "change, complaint",
    [
        (dict(policy=0x1001F), "bit 17 is reserved and must be 1"),
        (dict(policy=(1 << 17) | (1 << 26)), "reserved bits 26-63"),
        (dict(signature_algo=2), "SIGNATURE_ALGO is 2"),
        (dict(signing_key=3), "SIGNING_KEY 3 is reserved"),
        (dict(vmpl=4), "VMPL is 4"),
        (dict(version=2, cpuid=(0x19, 1, 1)), None),  # v2 writes no CPUID: ReportFields skips it
    ],
)
def test_format_violations_are_malformed(change, complaint):
    if complaint is None:
        parse_report(_report(**change))
        return
    with pytest.raises(EvidenceMalformed, match=complaint):
        parse_report(_report(**change))


@pytest.mark.parametrize(
    "offset, version",
    [(0x4C, 3), (0x18B, 3), (0x19F, 3), (0x188, 2), (0x1EB, 3), (0x1EF, 3), (0x1F8, 3), (0x208, 5), (0x29F, 4),
     (0x330, 3), (0x49F, 3), (0x2A0 + 48, 3), (0x2E8 + 71, 3)],
)
def test_reserved_bytes_must_be_zero(offset, version):
    raw = bytearray(_report(version=version))
    raw[offset] = 1
    with pytest.raises(EvidenceMalformed, match="must be zero"):
        parse_report(bytes(raw))


def test_the_signer_info_reserved_bits_must_be_zero():
    raw = bytearray(_report())
    struct.pack_into("<I", raw, 0x48, 1 << 5)
    with pytest.raises(EvidenceMalformed, match="reserved bits 5-31"):
        parse_report(bytes(raw))


def test_sizes_non_bytes_and_trailing_bytes():
    raw = _report()
    for length in (0, 1, 0x2A0, REPORT_SIZE - 1):
        with pytest.raises(EvidenceMalformed, match="1184"):
            parse_report(raw[:length])
    assert parse_report(raw + b"\xff" * 100).trailing_bytes == 100
    assert parse_report(bytearray(raw)).version == 3 and parse_report(memoryview(raw)).version == 3
    with pytest.raises(EvidenceMalformed, match="at most"):
        parse_report(raw + bytes(64 * 1024))
    for value in (None, "text", 3, [1, 2]):
        with pytest.raises(EvidenceMalformed, match="must be bytes"):
            parse_report(value)


def test_tcb_layouts_per_product():
    milan = decode_tcb(0x7308000000000003, "Milan")
    assert milan.as_dict() == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert milan.fmc is None and milan.raw == 0x7308000000000003
    raw = int.from_bytes(bytes([1, 2, 3, 4, 0, 0, 0, 200]), "little")
    turin = decode_tcb(raw, "Turin")
    assert turin.as_dict() == {"bootloader": 2, "tee": 3, "snp": 4, "microcode": 200, "fmc": 1}
    assert encode_tcb(turin.as_dict(), "Turin") == raw
    assert decode_tcb(raw, "Genoa").as_dict() == {"bootloader": 1, "tee": 2, "snp": 0, "microcode": 200}
    with pytest.raises(ValueError):
        decode_tcb(0, "Venice")
    with pytest.raises(ValueError):
        encode_tcb({"bootloader": 256, "tee": 0, "snp": 0, "microcode": 0}, "Milan")


@pytest.mark.parametrize(
    "family, model, product",
    [(0x19, 0x01, "Milan"), (0x19, 0x0F, "Milan"), (0x19, 0x11, "Genoa"), (0x19, 0xA0, "Genoa"),
     (0x1A, 0x02, "Turin"), (0x1A, 0x11, "Turin"), (0x1A, 0x50, None), (0x17, 0x31, None), (0x19, 0x21, None)],
)
def test_product_from_cpuid(family, model, product):
    assert product_from_cpuid(family, model) == product


def test_kds_urls_and_product_lines():
    tcb = decode_tcb(0x7308000000000003, "Milan")
    assert vcek_url("Milan", bytes(range(64)), tcb) == (
        "https://kdsintf.amd.com/vcek/v1/Milan/" + bytes(range(64)).hex() + "?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115")
    turin = decode_tcb(int.from_bytes(bytes([1, 2, 3, 4, 0, 0, 0, 5]), "little"), "Turin")
    assert vcek_url("Turin", b"\xab" * 64, turin).endswith("/Turin/" + "ab" * 8 + "?fmcSPL=1&blSPL=2&teeSPL=3&snpSPL=4&ucodeSPL=5")
    assert cert_chain_url("Genoa", "vlek") == "https://kdsintf.amd.com/vlek/v1/Genoa/cert_chain"
    assert crl_url("Milan", "vcek") == "https://kdsintf.amd.com/vcek/v1/Milan/crl"
    assert [product_line(n) for n in ("Milan-B0", "Genoa", "Turin-B1", "Venice", "")] == [
        "Milan", "Genoa", "Turin", None, None]


@pytest.mark.parametrize("data", [b"", b"junk", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                  bytes(1000), "not bytes"])
def test_loading_anything_but_a_certificate_is_malformed(data):
    with pytest.raises(EvidenceMalformed):
        load_certificates(data)


# --------------------------------------------------------------------------------------------
# Fuzzing: no input makes the parser raise anything but EvidenceMalformed.


def _parse_or_malformed(data: bytes) -> None:
    try:
        report = parse_report(data)
    except EvidenceMalformed:
        return
    assert report.trailing_bytes == len(data) - REPORT_SIZE


@settings(max_examples=RANDOM_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=1300), st.binary(min_size=REPORT_SIZE, max_size=REPORT_SIZE + 64)))
def test_fuzz_random_bytes_never_crash_the_parser(data):
    _parse_or_malformed(data)


@settings(max_examples=PATCHED_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    version=st.sampled_from([2, 3, 4, 5]),
    patches=st.lists(st.tuples(st.integers(0, REPORT_SIZE + 39), st.integers(0, 255)), max_size=8),
    cut=st.integers(REPORT_SIZE - 8, REPORT_SIZE + 40) | st.integers(0, REPORT_SIZE + 40),
)
def test_fuzz_patched_synthetic_reports_never_crash_the_parser(version, patches, cut):
    if version not in _BASE:
        _BASE[version] = _report(version=version, cpuid=(0x19, 0x11, 1)) + bytes(40)
    raw = bytearray(_BASE[version])
    for offset, value in patches:
        raw[offset] = value
    _parse_or_malformed(bytes(raw[:cut]))


@settings(max_examples=MUTATION_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                 HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["snp/trustee/test-report.bin", "snp/trustee/az-snp-vtpm/evidence-genoa.snp-report.bin"]),
    patches=st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(REPORT_SIZE - 4, REPORT_SIZE + 8) | st.integers(0, REPORT_SIZE),
)
def test_fuzz_mutated_real_reports_never_crash_the_parser(vectors_dir, name, patches, cut):
    if name not in _BASE:
        _BASE[name] = (vectors_dir / name).read_bytes()
    raw = bytearray(_BASE[name] + b"\x00" * 8)
    for offset, value in patches:
        raw[offset] = value
    _parse_or_malformed(bytes(raw[:cut]))


@settings(max_examples=EXTENSION_EXAMPLES, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_extension_values_never_crash_the_extension_parser(value):
    from attestation.snp.kds import _der_ia5, _der_uint8, _hwid

    for reader in (lambda v: _der_uint8(v, "x"), lambda v: _der_ia5(v, "x"), lambda v: _hwid(v, (64,))):
        try:
            reader(value)
        except ValueError:
            pass


def test_seeded_mutation_fuzz_of_synthetic_and_real_reports(request):
    """SEEDED_MUTATIONS inputs: 1-8 random byte patches (biased to the format-checked fields)
    and a random cut, over synthetic reports of each version and, if present, the real ones."""
    import random

    bases = [_report(version=v, cpuid=(0x19, 0x11, 1)) for v in (2, 3, 4, 5)]
    try:
        vectors = request.getfixturevalue("vectors_dir")
        bases += [(vectors / n).read_bytes() for n in ("snp/trustee/test-report.bin",
                                                       "snp/trustee/az-snp-vtpm/evidence-genoa.snp-report.bin")]
    except pytest.skip.Exception:
        pass
    hot = [0, 1, 2, 3, 8, 9, 10, 11, 0x30, 0x34, 0x48, 0x49, 0x4C, 0x188, 0x18B, 0x1EB, 0x1EF, 0x1F8, 0x208,
           0x2A0 + 47, 0x2A0 + 48, 0x2E8 + 48, 0x330, 0x49F]
    rng = random.Random(20261127)
    outcomes = {"parsed": 0, "malformed": 0}
    for _ in range(SEEDED_MUTATIONS):
        raw = bytearray(rng.choice(bases) + bytes(rng.choice((0, 0, 0, 16))))
        for _ in range(rng.randint(1, 8)):
            offset = rng.choice(hot) if rng.random() < 0.3 else rng.randrange(len(raw))
            raw[offset] = rng.randrange(256)
        cut = len(raw) if rng.random() < 0.8 else rng.randrange(len(raw) + 1)
        try:
            parse_report(bytes(raw[:cut]))
            outcomes["parsed"] += 1
        except EvidenceMalformed:
            outcomes["malformed"] += 1
    assert sum(outcomes.values()) == SEEDED_MUTATIONS and min(outcomes.values()) > 1000


@settings(max_examples=EXTENSION_EXAMPLES, deadline=None)
@given(entries=st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.integers(0, 400), st.integers(0, 400)),
                        max_size=4), tail=st.binary(max_size=300))
def test_fuzz_certificate_tables_never_crash_the_table_reader(entries, tail):
    from attestation.snp.kds import certificates_from_table

    table = b"".join(guid + struct.pack("<II", offset, length) for guid, offset, length in entries)
    assert certificates_from_table(table + bytes(24) + tail) == ()
    assert certificates_from_table(table + tail) == ()


def test_the_extension_parser_reads_raw_and_wrapped_hwids_and_rejects_broken_ones(vectors_dir):
    for name in ("test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"):
        cert = load_certificates((vectors_dir / "snp" / "trustee" / name).read_bytes())[0]
        assert endorsement_extensions(cert).hwid == bytes(range(64))

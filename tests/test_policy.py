"""Policy files: strict loading with errors that name the key, safe defaults, exact round trips."""

from __future__ import annotations

import pytest

from attestation.errors import PolicyError
from attestation.policy import Policy, load_policy, policy_from_toml, policy_to_toml, write_policy

M1 = "ab" * 32
M2 = "cd" * 32
ROOT = "12" * 32

EXAMPLE = f"""
version = 1
measurements = ["{M1}", "{M2}"]
min_security_version = 2
debug_allowed = false
max_evidence_age_seconds = 120
max_clock_skew_seconds = 30
nonce_required = true

[simulation]
allow = true
root_sha256 = "{ROOT}"
"""


def toml_with(**top: str) -> str:
    """A minimal valid policy with top-level lines replaced or added (values are TOML text)."""
    lines = {"measurements": f'["{M1}"]', **top}
    return "\n".join(f"{k} = {v}" for k, v in lines.items() if v is not None) + "\n"


def test_a_full_policy_file_loads_into_its_values(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE)

    policy = load_policy(path)

    assert policy == Policy(
        measurements=(M1, M2),
        allow_simulation=True,
        sim_root_sha256=ROOT,
        min_security_version=2,
        debug_allowed=False,
        max_evidence_age_seconds=120,
        max_clock_skew_seconds=30,
        nonce_required=True,
    )


def test_defaults_are_the_safe_choices():
    policy = policy_from_toml(toml_with())
    assert policy.allow_simulation is False
    assert policy.sim_root_sha256 is None
    assert policy.debug_allowed is False
    assert policy.nonce_required is True
    assert policy.min_security_version == 0
    assert policy.max_evidence_age_seconds == 300
    assert policy.max_clock_skew_seconds == 60


def test_writing_then_loading_gives_an_equal_policy(tmp_path):
    policy = policy_from_toml(EXAMPLE)
    path = write_policy(tmp_path / "p.toml", policy)
    assert load_policy(path) == policy
    text = path.read_text()
    assert text.startswith("# enclaveq attestation policy")
    assert "no confidentiality" in text  # simulation allowed: the file itself says what that means


def test_write_refuses_to_replace_an_existing_file_unless_forced(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("keep me")
    policy = policy_from_toml(EXAMPLE)
    with pytest.raises(FileExistsError):
        write_policy(path, policy)
    assert path.read_text() == "keep me"
    write_policy(path, policy, force=True)
    assert load_policy(path) == policy


def test_hex_is_normalised_to_lowercase_and_duplicates_dropped():
    policy = Policy(measurements=(M1.upper(), M1, M2), allow_simulation=True, sim_root_sha256=ROOT.upper())
    assert policy.measurements == (M1, M2)
    assert policy.sim_root_sha256 == ROOT
    assert policy.allows_measurement(bytes.fromhex(M2))
    assert not policy.allows_measurement(bytes(32))


def test_a_48_byte_measurement_is_accepted_for_platforms_that_use_them():
    assert Policy(measurements=("ef" * 48,)).measurements == ("ef" * 48,)


@pytest.mark.parametrize(
    "text, key",
    [
        (toml_with(measurement=f'["{M1}"]'), "measurement"),
        (toml_with(allow_simulation="true"), "allow_simulation"),
        (toml_with() + "[simulation]\nallow = true\nroot = 'x'\n", "root"),
        (toml_with() + "[extra]\nx = 1\n", "extra"),
    ],
)
def test_an_unknown_key_is_refused_by_name(text, key):
    with pytest.raises(PolicyError, match=f"unknown policy key '{key}'") as info:
        policy_from_toml(text)
    assert "known keys:" in str(info.value)


@pytest.mark.parametrize("platform", ["sgx", "tdx", "snp", "nitro"])
def test_an_unknown_key_in_a_platform_table_is_refused_naming_the_table(platform):
    with pytest.raises(PolicyError, match=rf"\[{platform}\]"):
        policy_from_toml(toml_with() + f"[{platform}]\nno_such_key = 1\n")


@pytest.mark.parametrize(
    "key, value, complaint",
    [
        ("debug_allowed", "1", "must be true or false, got int 1"),
        ("nonce_required", '"yes"', "must be true or false, got str 'yes'"),
        ("min_security_version", '"2"', "must be an integer, got str '2'"),
        ("min_security_version", "true", "must be an integer, got bool True"),
        ("max_evidence_age_seconds", "300.0", "must be an integer, got float 300.0"),
        ("max_clock_skew_seconds", "[60]", "must be an integer"),
        ("measurements", f'"{M1}"', "must be a list of hex strings"),
        ("measurements", "[1]", "item 0 must be a hex string, got int 1"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(key, value, complaint):
    with pytest.raises(PolicyError, match=f"policy key '{key}' {complaint}"):
        policy_from_toml(toml_with(**{key: value}))


@pytest.mark.parametrize(
    "key, value, complaint",
    [
        ("min_security_version", "-1", "must be at least 0"),
        ("max_evidence_age_seconds", "0", "must be at least 1"),
        ("max_clock_skew_seconds", "-5", "must be at least 0"),
        ("measurements", "[]", "is empty"),
        ("measurements", '["xyz"]', "item 0 must be 64 or 96 hex digits"),
        ("measurements", f'["{M1[:-2]}"]', "item 0 must be 64 or 96 hex digits"),
        ("measurements", f'["{M1[:-2]} 0"]', "item 0 must be 64 or 96 hex digits"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_the_key(key, value, complaint):
    with pytest.raises(PolicyError, match=f"policy key '{key}' {complaint}"):
        policy_from_toml(toml_with(**{key: value}))


def test_measurements_are_required():
    with pytest.raises(PolicyError, match="'measurements' is missing"):
        policy_from_toml("debug_allowed = false\n")


def test_allowing_simulation_requires_pinning_its_root():
    with pytest.raises(PolicyError, match="'simulation.root_sha256' is required when simulation.allow = true"):
        policy_from_toml(toml_with() + "[simulation]\nallow = true\n")


@pytest.mark.parametrize(
    "table, complaint",
    [
        ("allow = 1\n", "'simulation.allow' must be true or false"),
        (f'allow = true\nroot_sha256 = "{ROOT[:-1]}"\n', "'simulation.root_sha256' must be 64 hex digits"),
        ("allow = true\nroot_sha256 = 5\n", "'simulation.root_sha256' must be 64 hex digits"),
    ],
)
def test_simulation_table_values_are_checked_by_name(table, complaint):
    with pytest.raises(PolicyError, match=complaint):
        policy_from_toml(toml_with() + "[simulation]\n" + table)


def test_simulation_must_be_a_table():
    with pytest.raises(PolicyError, match="'simulation' must be a table"):
        policy_from_toml(toml_with(simulation="true"))


def test_another_policy_format_version_is_refused():
    with pytest.raises(PolicyError, match="'version' is 2; this enclaveq reads version 1"):
        policy_from_toml(toml_with(version="2"))
    with pytest.raises(PolicyError, match="'version' must be an integer"):
        policy_from_toml(toml_with(version='"1"'))


def test_invalid_toml_is_a_policy_error():
    with pytest.raises(PolicyError, match="not valid TOML"):
        policy_from_toml("measurements = [")


def test_file_problems_are_policy_errors_naming_the_file(tmp_path):
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(tmp_path / "absent.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(binary)
    bad = tmp_path / "bad.toml"
    bad.write_text(toml_with(debug_allowed="2"))
    with pytest.raises(PolicyError, match=rf"^{bad}: policy key 'debug_allowed'"):
        load_policy(bad)


def test_policies_are_immutable():
    policy = Policy(measurements=(M1,))
    with pytest.raises(AttributeError):
        policy.allow_simulation = True  # type: ignore[misc]


def test_the_toml_text_of_a_hardware_only_policy_has_no_simulation_warning():
    text = policy_to_toml(Policy(measurements=(M1,)))
    assert "WARNING" not in text
    assert policy_from_toml(text) == Policy(measurements=(M1,))


def test_the_example_in_the_documentation_is_a_valid_policy():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "policy.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    policy = policy_from_toml(example)
    assert policy.allow_simulation is True
    assert policy_from_toml(policy_to_toml(policy)) == policy


@pytest.mark.parametrize("platform, table", [
    ("sgx", "debug_allowed = false"), ("tdx", "debug_allowed = false"),
])
def test_a_platform_table_that_pins_no_code_identity_is_refused(platform, table):
    # A platform table replaces the top-level measurements for its platform, so an unpinned
    # one would accept any enclave the host cares to launch.
    with pytest.raises(PolicyError, match=rf"\[{platform}\] must pin"):
        policy_from_toml(f"[{platform}]\n{table}\n")


def test_a_policy_with_only_a_platform_table_needs_no_top_level_measurements():
    policy = policy_from_toml(f"[sgx]\nmrenclave = [\"{'ab' * 32}\"]\n")
    assert policy.measurements == () and policy.section("sgx") is not None and policy.section("tdx") is None

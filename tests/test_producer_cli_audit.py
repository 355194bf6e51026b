"""The producer-side commands do what their help and the README say (an audit's findings).

--debug prints the traceback of a failure reported in one line, with the same exit code;
`evidence verify` reads the default collateral cache like every other verifying command;
`collateral fetch` refuses a disallowed --pcs-url/--kds-url as a usage error before any request;
help texts state what the code does; owner-key messages name what is deleted or replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from enclaveq.cli import cli

from .processes import enclaveq
from .test_cli_errors import sim  # noqa: F401 - the module fixture: a simulation, a policy, broken files


def help_of(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


# -- 1. --debug: the traceback of a failure reported in one line, the exit code unchanged ----------

@pytest.fixture(scope="module")
def policies(sim) -> dict[str, Path]:  # noqa: F811 - the fixture imported above
    """A usable policy and a broken one (test_cli_errors' simulation and files)."""
    return {"policy": sim["policy"], "broken": sim["dir"] / "broken.toml"}


NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1: connection refused at once


@pytest.mark.parametrize("command", [("attest",), ("pipeline", "list")], ids=["attest", "pipeline list"])
def test_debug_prints_the_traceback_of_a_one_line_failure_and_keeps_its_exit_code(policies, command, monkeypatch):
    args = (*command, "--broker", NO_BROKER, "--pool", "x", "--policy", str(policies["policy"]), "--timeout", "10")
    plain = enclaveq(*args, check=False)
    debug = enclaveq("--debug", *args, check=False)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: cannot connect to amqp://***@127.0.0.1:1/")
    assert debug.returncode == plain.returncode, debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr
    # The traceback first, the same one line last.
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]
    monkeypatch.setenv("ENCLAVEQ_DEBUG", "1")
    by_env = enclaveq(*args, check=False)
    assert by_env.returncode == plain.returncode and "Traceback (most recent call last)" in by_env.stderr


def test_debug_keeps_the_exit_code_of_an_input_error(policies):
    args = ("attest", "--broker", NO_BROKER, "--pool", "x", "--policy", str(policies["broken"]))
    plain = enclaveq(*args, check=False)
    debug = enclaveq("--debug", *args, check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode == 2, debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr and "PolicyError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]


# -- 2. evidence verify reads the default collateral cache ----------------------------------------

def verify_snp(tmp_path: Path, *extra: str, cache: Path) -> tuple[int, str]:
    evidence = tmp_path / "report.bin"
    evidence.write_bytes(b"\x01" * 64)  # not a report: only the collateral is read before it
    result = CliRunner().invoke(cli, ["evidence", "verify", str(evidence), "--platform", "snp", "--json", *extra],
                                env={"ENCLAVEQ_COLLATERAL_DIR": str(cache)})
    return result.exit_code, result.output


def garbage_cache(root: Path) -> Path:
    product = root / "snp" / "Genoa"
    product.mkdir(parents=True)
    (product / "crl-vcek.der").write_bytes(b"not a CRL")  # what `collateral fetch` would write, spoiled
    return root


def test_evidence_verify_reads_the_default_collateral_cache(tmp_path):
    cache = garbage_cache(tmp_path / "cache")
    code, output = verify_snp(tmp_path, cache=cache)
    assert code == 1
    assert '"code": "collateral"' in output and str(cache / "snp" / "Genoa" / "crl-vcek.der") in output


def test_evidence_verify_collateral_dir_takes_the_fetched_layout_and_wins_over_the_cache(tmp_path):
    cache = garbage_cache(tmp_path / "cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = verify_snp(tmp_path, "--collateral", str(empty), cache=cache)
    assert code == 1 and '"code": "collateral"' not in output and '"code": "malformed"' in output
    fetched = garbage_cache(tmp_path / "fetched")
    code, output = verify_snp(tmp_path, "--collateral", str(fetched), cache=tmp_path / "absent")
    assert code == 1 and str(fetched / "snp" / "Genoa" / "crl-vcek.der") in output


def test_evidence_verify_without_a_cache_reads_no_collateral(tmp_path):
    code, output = verify_snp(tmp_path, cache=tmp_path / "absent")
    assert code == 1 and '"code": "collateral"' not in output and '"code": "malformed"' in output


# -- 3. collateral fetch: a disallowed URL is a usage error, before any request ---------------------

@pytest.mark.parametrize("args", [
    ("--platform", "sgx", "--fmspc", "00906ed50000", "--pcs-url", "http://example.com"),
    ("--platform", "snp", "--product", "Genoa", "--kds-url", "http://example.com"),
    ("--platform", "snp", "--product", "Genoa", "--kds-url", "ftp://127.0.0.1/"),
], ids=["pcs http", "kds http", "kds ftp"])
def test_collateral_fetch_refuses_a_disallowed_url_as_a_usage_error(tmp_path, args):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["collateral", "fetch", "--out", str(out), *args])
    option = args[-2]
    assert result.exit_code == 2, result.output
    assert option in result.output and "https://" in result.output
    assert not out.exists()


# -- 4-6. help texts say what the code does -------------------------------------------------------

@pytest.mark.parametrize("command", [("attest",), ("evidence", "verify")])
def test_collateral_help_names_every_default_directory(command):
    text = help_of(*command)
    assert "$ENCLAVEQ_COLLATERAL_DIR, else $XDG_CACHE_HOME/enclaveq/collateral, else ~/.cache/enclaveq/collateral" \
        in text


def test_collateral_fetch_out_help_names_every_default_directory():
    assert "$ENCLAVEQ_COLLATERAL_DIR, else $XDG_CACHE_HOME/enclaveq/collateral, else ~/.cache/enclaveq/collateral" \
        in help_of("collateral", "fetch")


def test_attest_timeout_help_is_the_wait_for_evidence():
    text = help_of("attest")
    assert "Seconds to wait for the pool's evidence." in text and "Seconds to wait for each result." not in text


def test_pool_rotate_grace_help_says_a_longer_grace_is_refused():
    text = help_of("pool", "rotate")
    assert "max_rotation_grace_seconds" in text and "refused" in text and "caps it" not in text


# -- 7. owner-key messages name what is deleted or replaced ---------------------------------------

def test_a_missing_default_owner_key_names_what_it_owns(tmp_path, monkeypatch):
    from enclaveq.cli.owner_key import OwnerKeyError, find_owner_key, load_owner_key

    monkeypatch.delenv("ENCLAVEQ_OWNER_KEY", raising=False)
    source = find_owner_key(None)
    with pytest.raises(OwnerKeyError, match="the key that uploaded the model$"):
        load_owner_key(source)
    with pytest.raises(OwnerKeyError, match="the key that created the pipeline$"):
        load_owner_key(source, owns="pipeline")


def test_a_created_owner_key_names_what_it_is_needed_for(tmp_path, monkeypatch, capsys):
    import click

    from enclaveq.cli.owner_key import find_owner_key
    from enclaveq.cli.producer import _owner_key

    monkeypatch.delenv("ENCLAVEQ_OWNER_KEY", raising=False)
    with click.Context(cli):
        _owner_key(find_owner_key(None), create=True, owns="pipeline")
    said = capsys.readouterr().err
    assert "to delete or replace this pipeline and its models later" in said and os.path.exists(
        find_owner_key(None).path)


def test_model_delete_without_an_owner_key_still_names_the_model(policies, monkeypatch):
    monkeypatch.delenv("ENCLAVEQ_OWNER_KEY", raising=False)
    result = enclaveq("model", "delete", "ab" * 32, "--broker", NO_BROKER, "--pool", "x", "--policy",
                      str(policies["policy"]), check=False)
    assert result.returncode == 2 and "the key that uploaded the model" in result.stderr

"""The documented command line is a contract (issue 8): scripts written against README.md and
`--help` must keep working.

- every documented command and flag still exists, and the table below lists every invocation
  the README and the help texts show;
- no command gains a *required* option beyond those documented from the start (a new one breaks
  every script that worked before it, as `--owner-key` once did): make it optional, with a default;
- the documented `enclaveq model upload FILE --broker URL --pool NAME --policy FILE` really runs,
  end to end against a worker on the in-memory broker, and signs with the default owner key in
  $ENCLAVEQ_HOME (a temporary directory here, never the real home); `ENCLAVEQ_OWNER_KEY` takes
  precedence over that default, and `--owner-key` over both.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from attestation.policy import write_policy
from enclaveq.cli import cli
from enclaveq.cli.owner_key import find_owner_key, load_owner_key
from protocol.ownership import load_signing_key, public_key_bytes

from .support import mlp_model, running_worker

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = frozenset({"--broker", "--pool", "--policy", "--timeout", "--producer-key", "--collateral"})

# Every command, with every flag README.md and its --help document.
DOCUMENTED: dict[tuple[str, ...], frozenset[str]] = {
    ("demo",): frozenset(),
    ("sim", "init"): frozenset({"--dir", "--force", "--days"}),
    ("policy", "init"): frozenset({"--sim-dir", "--out", "--measurement", "--allow-debug", "--max-age", "--force"}),
    ("worker",): frozenset({"--broker", "--pool", "--sim-dir", "--state-dir", "--tee", "--metrics-port",
                            "--rotate-every", "--rotation-grace", "--print-measurement", "--log-level",
                            "--collateral", "--log-format"}),
    ("attest",): CONNECTION | {"--json", "--forget-epoch"},
    ("model", "upload"): CONNECTION | {"--owner-key", "--allow-producer"},
    ("model", "list"): CONNECTION | {"--json"},
    ("model", "delete"): CONNECTION | {"--owner-key"},
    ("run",): CONNECTION | {"--model", "--input", "--output"},
    ("submit",): CONNECTION | {"--model", "--inputs", "--output", "--max-in-flight"},
    ("pool", "rotate"): CONNECTION | {"--grace"},
    ("pool", "status"): CONNECTION | {"--wait", "--json"},
    ("keys", "generate"): frozenset({"--out", "--kind"}),
    ("keys", "show"): frozenset(),
    ("pipeline", "init"): frozenset({"--example", "--recipient", "--out", "--about", "--threshold", "--force"}),
    ("pipeline", "create"): CONNECTION | {"--owner-key"},
    ("pipeline", "list"): CONNECTION | {"--json"},
    ("pipeline", "delete"): CONNECTION | {"--owner-key"},
    ("publish",): CONNECTION | {"--pipeline", "--input", "--text", "--inputs", "--file", "--topic", "--max-in-flight"},
    ("subscribe",): CONNECTION | {"--pipeline", "--key", "--output", "--count"},
    ("evidence", "verify"): frozenset({"--platform", "--cert", "--collateral", "--policy", "--report-data", "--at",
                                       "--json"}),
    ("collateral", "fetch"): frozenset({"--platform", "--fmspc", "--evidence", "--product", "--out", "--pcs-url",
                                        "--kds-url", "--timeout"}),
    ("collateral", "show"): frozenset({"--dir", "--json"}),
}

# Positional arguments, by parameter name.
DOCUMENTED_ARGUMENTS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("model", "upload"): ("file",),
    ("model", "delete"): ("model_id",),
    ("keys", "show"): ("file",),
    ("pipeline", "create"): ("file",),
    ("pipeline", "delete"): ("pipeline_id",),
    ("evidence", "verify"): ("file",),
}

# The required options as originally documented: nothing may be added here lightly.
REQUIRED_CONNECTION = frozenset({"--broker", "--pool", "--policy"})
ALLOWED_REQUIRED: dict[tuple[str, ...], frozenset[str]] = {
    ("sim", "init"): frozenset({"--dir"}),
    ("policy", "init"): frozenset({"--sim-dir", "--out"}),
    ("attest",): REQUIRED_CONNECTION,
    ("model", "upload"): REQUIRED_CONNECTION,
    ("model", "list"): REQUIRED_CONNECTION,
    ("model", "delete"): REQUIRED_CONNECTION,
    ("run",): REQUIRED_CONNECTION | {"--model", "--input", "--output"},
    ("submit",): REQUIRED_CONNECTION | {"--model", "--inputs", "--output"},
    ("pool", "rotate"): REQUIRED_CONNECTION,
    ("pool", "status"): REQUIRED_CONNECTION,
    ("keys", "generate"): frozenset({"--out"}),
    ("pipeline", "init"): frozenset({"--example", "--recipient", "--out"}),
    ("pipeline", "create"): REQUIRED_CONNECTION,
    ("pipeline", "list"): REQUIRED_CONNECTION,
    ("pipeline", "delete"): REQUIRED_CONNECTION,
    ("publish",): REQUIRED_CONNECTION | {"--pipeline"},
    ("subscribe",): REQUIRED_CONNECTION | {"--pipeline", "--key", "--output"},
    ("evidence", "verify"): frozenset({"--platform"}),
    ("collateral", "fetch"): frozenset({"--platform"}),
}

DOCUMENTS = [ROOT / "README.md", ROOT / "examples" / "README.md"]


# --------------------------------------------------------------------------- the command tree


def walk(command: click.Command = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from walk(sub, (*path, name))


def resolve(path: tuple[str, ...]) -> click.Command | None:
    command: click.Command = cli
    for name in path:
        if not isinstance(command, click.Group) or name not in command.commands:
            return None
        command = command.commands[name]
    return command


def flags(command: click.Command) -> set[str]:
    return {name for p in command.params if isinstance(p, click.Option) for name in (*p.opts, *p.secondary_opts)}


def help_text(command: click.Command) -> str:
    """The texts --help shows, unwrapped: docstring, epilog and every option's help."""
    return "\n".join([command.help or "", command.epilog or ""]
                     + [p.help or "" for p in command.params if isinstance(p, click.Option)])


_INVOCATION = re.compile(r"(?<![\w./`-])enclaveq[ \t]+([^\n]*)")
_END = re.compile(r"[|`#;&)]|\$\(")


def invocations(text: str) -> list[tuple[tuple[str, ...], set[str], str]]:
    """Every `enclaveq SUBCOMMAND ... --flag` in ``text``: (command path, flags, the line)."""
    text = re.sub(r"\\[ \t]*\n[ \t]*", " ", text)  # shell line continuations
    found = []
    for match in _INVOCATION.finditer(text):
        rest = _END.split(match.group(1), maxsplit=1)[0]
        tokens = rest.split()
        command: click.Command = cli
        path: tuple[str, ...] = ()
        for token in tokens:
            if isinstance(command, click.Group) and token in command.commands:
                command, path = command.commands[token], (*path, token)
            else:
                break
        if not path:
            continue  # prose ("enclaveq is ..."), not an invocation
        used = {t.split("=")[0].rstrip(".,:") for t in tokens if t.startswith("--")} - {"--help"}
        found.append((path, used, match.group(0).strip()))
    return found


def documented_invocations() -> list[tuple[str, tuple[str, ...], set[str], str]]:
    found = []
    for document in DOCUMENTS:
        found += [(document.name, *i) for i in invocations(document.read_text())]
    for path, command in walk():
        found += [(f"enclaveq {' '.join(path)} --help", *i) for i in invocations(help_text(command))]
    return found


# --------------------------------------------------------------------------- (a) nothing disappears


@pytest.mark.parametrize("path", sorted(DOCUMENTED), ids=" ".join)
def test_every_documented_command_and_flag_still_exists(path):
    command = resolve(path)
    assert command is not None and not isinstance(command, click.Group), f"`enclaveq {' '.join(path)}` is gone"
    assert DOCUMENTED[path] <= flags(command), f"flags gone from `enclaveq {' '.join(path)}`: " \
                                               f"{sorted(DOCUMENTED[path] - flags(command))}"
    arguments = tuple(p.name for p in command.params if isinstance(p, click.Argument))
    assert arguments == DOCUMENTED_ARGUMENTS.get(path, ())


def test_the_table_lists_every_command_and_every_invocation_the_readme_and_help_show():
    leaves = {path for path, command in walk() if path and not isinstance(command, click.Group)}
    assert leaves == set(DOCUMENTED), "add new commands to DOCUMENTED (and document them)"
    found = documented_invocations()
    assert len(found) > 30  # the extraction works
    for where, path, used, line in found:
        if isinstance(resolve(path), click.Group):
            continue  # `enclaveq keys --help` and the like
        assert path in DOCUMENTED, f"{where}: {line!r} runs a command missing from DOCUMENTED"
        assert used <= DOCUMENTED[path] | flags(resolve(path)), f"{where}: {line!r} uses an unknown flag"
        assert used <= DOCUMENTED[path], f"{where}: {line!r} documents flags missing from DOCUMENTED"


def test_the_readme_uploads_a_model_both_with_the_default_key_and_with_owner_key():
    uploads = [used for path, used, _ in invocations((ROOT / "README.md").read_text()) if path == ("model", "upload")]
    assert any("--owner-key" not in used for used in uploads)
    assert any("--owner-key" in used for used in uploads)


# --------------------------------------------------------------------------- (b) nothing new is required


def test_no_command_has_a_required_option_beyond_the_originally_documented_ones():
    assert all("--owner-key" not in allowed for allowed in ALLOWED_REQUIRED.values())
    for path, command in walk():
        required = {p.opts[0] for p in command.params if isinstance(p, click.Option) and p.required}
        extra = required - ALLOWED_REQUIRED.get(path, frozenset())
        assert not extra, f"`enclaveq {' '.join(path)}` now requires {sorted(extra)}: that breaks every script " \
                          "written against the documented command; make it optional with a default"
        arguments = tuple(p.name for p in command.params if isinstance(p, click.Argument) and p.required)
        assert arguments == DOCUMENTED_ARGUMENTS.get(path, ()), f"`enclaveq {' '.join(path)}` changed its arguments"


# --------------------------------------------------------------------------- (c) the documented upload runs


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """$ENCLAVEQ_HOME in tmp_path: nothing here may touch the real ~/.config/enclaveq."""
    path = tmp_path / "enclaveq-home"
    monkeypatch.setenv("ENCLAVEQ_HOME", str(path))
    monkeypatch.delenv("ENCLAVEQ_OWNER_KEY", raising=False)
    return path


@pytest.fixture
async def deployment(tmp_path, home, tee, memory_url, pool):
    """A simulated worker serving the test's pool on the in-memory broker, and a policy file for it."""
    policy = write_policy(tmp_path / "policy.toml", tee.policy())
    async with running_worker(tee, memory_url, pool):
        yield {"conn": ["--broker", memory_url, "--pool", pool, "--policy", str(policy)]}


async def enclaveq(*args: str) -> Result:
    """The command in this process (the memory broker lives here), off the worker's event loop."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


def model_file(tmp_path: Path, seed: int) -> tuple[Path, str]:
    model = mlp_model(seed=seed)
    path = tmp_path / f"model-{seed}.onnx"
    path.write_bytes(model)
    return path, hashlib.sha256(model).hexdigest()


def public_key(path: Path) -> bytes:
    return public_key_bytes(load_signing_key(path))


async def test_the_documented_upload_needs_no_owner_key_and_the_default_key_deletes_it(deployment, home, tmp_path):
    path, model_id = model_file(tmp_path, 1)
    first = await enclaveq("model", "upload", str(path), *deployment["conn"])
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines()[-1] == model_id  # the model id alone on the last line
    key = home / "owner.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(home.stat().st_mode) == 0o700
    created = [line for line in first.stderr.splitlines() if "owner key" in line]
    assert len(created) == 1 and str(key) in created[0] and "delete" in created[0]
    owner = public_key(key)

    # Uploading the same model again replaces its manifest, which only its owner may do: same key.
    again = await enclaveq("model", "upload", str(path), *deployment["conn"])
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[-1] == model_id and str(key) not in again.stderr
    assert public_key(key) == owner and sorted(p.name for p in home.iterdir()) == ["owner.key"]

    listed = await enclaveq("model", "list", *deployment["conn"])
    assert model_id in listed.stdout
    deleted = await enclaveq("model", "delete", model_id, *deployment["conn"])
    assert deleted.exit_code == 0 and deleted.stdout.strip() == f"deleted {model_id}", deleted.output
    assert model_id not in (await enclaveq("model", "list", *deployment["conn"])).stdout


async def test_owner_key_flag_then_environment_variable_take_precedence_over_the_default(deployment, home, tmp_path,
                                                                                           monkeypatch):
    keys = {}
    home.mkdir(mode=0o700)
    for name, where in (("default", home / "owner.key"), ("env", tmp_path / "env.key"), ("flag", tmp_path / "f.key")):
        assert (await enclaveq("keys", "generate", "--out", str(where))).exit_code == 0
        keys[name] = where

    # ENCLAVEQ_OWNER_KEY over the default file.
    monkeypatch.setenv("ENCLAVEQ_OWNER_KEY", str(keys["env"]))
    path, by_env = model_file(tmp_path, 2)
    assert (await enclaveq("model", "upload", str(path), *deployment["conn"])).exit_code == 0
    refused = await enclaveq("model", "delete", by_env, *deployment["conn"], "--owner-key", str(keys["default"]))
    assert refused.exit_code == 1 and "not_owner" in refused.stderr
    assert (await enclaveq("model", "delete", by_env, *deployment["conn"])).exit_code == 0

    # --owner-key over ENCLAVEQ_OWNER_KEY (still set).
    path, by_flag = model_file(tmp_path, 3)
    assert (await enclaveq("model", "upload", str(path), *deployment["conn"], "--owner-key", str(keys["flag"]))).exit_code == 0
    refused = await enclaveq("model", "delete", by_flag, *deployment["conn"])
    assert refused.exit_code == 1 and "not_owner" in refused.stderr
    assert (await enclaveq("model", "delete", by_flag, *deployment["conn"], "--owner-key", str(keys["flag"]))).exit_code == 0


# --------------------------------------------------------------------------- refusals (no worker needed)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def offline(tmp_path: Path) -> list[str]:
    """Connection options for commands that must fail before connecting."""
    policy = tmp_path / "policy.toml"
    policy.write_text("")
    return ["--broker", "memory://nobody-listens", "--pool", "none", "--policy", str(policy), "--timeout", "1"]


def test_delete_without_any_key_fails_naming_the_default_key_file_and_creates_nothing(home, tmp_path):
    result = run("model", "delete", "ab" * 32, *offline(tmp_path))
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and str(home / "owner.key") in result.stderr
    assert not home.exists()


def test_a_key_named_by_the_environment_must_exist_and_is_never_created(home, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.key"
    monkeypatch.setenv("ENCLAVEQ_OWNER_KEY", str(missing))
    path, _ = model_file(tmp_path, 4)
    for args in (("model", "upload", str(path)), ("model", "delete", "ab" * 32)):
        result = run(*args, *offline(tmp_path))
        assert result.exit_code == 2 and str(missing) in result.stderr and "ENCLAVEQ_OWNER_KEY" in result.stderr
    assert not missing.exists() and not home.exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_an_owner_key_file_others_can_read_is_refused(home, tmp_path, mode):
    key = tmp_path / "owner.key"
    assert run("keys", "generate", "--out", str(key)).exit_code == 0
    os.chmod(key, mode)
    result = run("model", "delete", "ab" * 32, *offline(tmp_path), "--owner-key", str(key))
    assert result.exit_code == 2 and "chmod 600" in result.stderr and str(key) in result.stderr
    assert "PRIVATE KEY" not in result.output


def test_racing_first_uploads_create_one_default_key_and_all_use_it(home):
    barrier = threading.Barrier(8)
    results: list[tuple[bytes, bool]] = []

    def first_use() -> None:
        barrier.wait()
        key, created = load_owner_key(find_owner_key(None), create=True)
        results.append((public_key_bytes(key), created))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 8 and sum(created for _, created in results) == 1
    assert {public for public, _ in results} == {public_key(home / "owner.key")}
    assert sorted(p.name for p in home.iterdir()) == ["owner.key"]  # no scratch file left behind
    assert stat.S_IMODE((home / "owner.key").stat().st_mode) == 0o600


def test_enclaveq_home_defaults_to_the_users_config_directory(monkeypatch):
    monkeypatch.delenv("ENCLAVEQ_HOME", raising=False)
    monkeypatch.delenv("ENCLAVEQ_OWNER_KEY", raising=False)
    source = find_owner_key(None)
    assert source.path == Path("~/.config/enclaveq/owner.key").expanduser() and source.origin == "default"
    monkeypatch.setenv("ENCLAVEQ_OWNER_KEY", "/keys/env.key")
    assert find_owner_key(None).path == Path("/keys/env.key")
    assert find_owner_key(Path("flag.key")).path == Path("flag.key")

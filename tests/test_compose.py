"""The compose stack (compose/compose.yaml) built and run with podman-compose, and used from the host.

The same compose.yaml a user runs with `docker compose up`, with the images built locally: the
enclaveq image on a Debian base imported by compose/podman-setup.sh (its wheels downloaded here
first, since builds here cannot reach PyPI over TLS), RabbitMQ and Mosquitto from Debian's packages
(compose/rabbitmq, compose/mosquitto). podman-compose 1.0 honours neither health conditions nor
profiles, so the stack comes up service by service, in the order compose.yaml's `depends_on`
gives. Each run has its own project name and ports, and removes every container, volume and
network it created.

Skipped with the reason when rootful podman, podman-compose or the base image are missing; with
ENCLAVEQ_REQUIRE_COMPOSE=1 (as `.ci/run` sets after running compose/podman-setup.sh) that is a failure.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
WHEELS = COMPOSE_DIR / "out" / "wheels"
BASE_IMAGE = os.environ.get("ENCLAVEQ_COMPOSE_BASE_IMAGE", "localhost/debian:bookworm")
CONTAINERS_CONF = os.environ.get("CONTAINERS_CONF", str(COMPOSE_DIR / "podman" / "containers.conf"))
REQUIRE = os.environ.get("ENCLAVEQ_REQUIRE_COMPOSE") == "1"
ENCLAVEQ = str(Path(sys.executable).with_name("enclaveq"))
# Local images, shared by every run (the layer cache makes a rebuild of unchanged sources quick).
IMAGES = {"ENCLAVEQ_IMAGE": "localhost/enclaveq:compose-test",
          "RABBITMQ_IMAGE": "localhost/enclaveq-rabbitmq:debian",
          "MOSQUITTO_IMAGE": "localhost/enclaveq-mosquitto:debian",
          "PROMETHEUS_IMAGE": "localhost/enclaveq-prometheus:debian"}


def _unusable() -> str | None:
    """Why podman-compose cannot run the stack here, or None."""
    for tool in ("podman", "podman-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (compose/podman-setup.sh installs it)"
    if os.geteuid() != 0:
        return "the stack runs on rootful podman and this is not root"
    exists = subprocess.run(["podman", "image", "exists", BASE_IMAGE], env={**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF},
                            capture_output=True, timeout=60)
    if exists.returncode != 0:
        return f"the base image {BASE_IMAGE} is missing (compose/podman-setup.sh imports it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Return once ``condition()`` holds; fail naming ``what`` if it does not within ``timeout`` s."""
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"{what}: not within {timeout:g} s"
        time.sleep(0.5)


@dataclass(frozen=True)
class Stack:
    project: str
    env: dict[str, str]
    amqp_url: str
    mqtt_url: str
    policy: Path

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return _run(["podman-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args], self.env, timeout)

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["podman", *args], self.env, timeout, check=check)

    def container(self, service: str, number: int = 1) -> str:
        return f"{self.project}_{service}_{number}"

    def logs(self, container: str) -> str:
        done = self.podman("logs", container, check=False)
        return done.stdout + done.stderr

    def enclaveq(self, *args: str, home: Path, timeout: float = 120) -> str:
        """The host's `enclaveq` command against this stack's pool `docs`; its stdout."""
        command = [ENCLAVEQ, *args, "--broker", self.amqp_url, "--pool", "docs", "--policy", str(self.policy)]
        done = subprocess.run(command, env={**os.environ, "ENCLAVEQ_HOME": str(home)}, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args[:2])} exited {done.returncode}:\n{done.stderr[-3000:]}"
        return done.stdout


def _run(command: list[str], env: dict[str, str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=COMPOSE_DIR)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(command[:6])} ... exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _download_wheels(env: dict[str, str]) -> None:
    """The image's dependencies as wheels in the build context, by the host's pip (pip inside a
    build cannot verify PyPI's certificate here); the Dockerfile installs them with WHEELS=local."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = project["project"]["dependencies"] + project["build-system"]["requires"]
    WHEELS.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
          "--dest", str(WHEELS), *requirements], env, timeout=600)


def _build_images(env: dict[str, str], project: str) -> None:
    for name, folder in (("RABBITMQ_IMAGE", "rabbitmq"), ("MOSQUITTO_IMAGE", "mosquitto"),
                         ("PROMETHEUS_IMAGE", "prometheus")):
        _run(["podman", "build", "--quiet", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", env[name],
              str(COMPOSE_DIR / folder)], env, timeout=900)
    # The enclaveq image exactly as compose.yaml builds it (its build section, with the build args).
    _run(["podman-compose", "-p", project, "-f", str(COMPOSE_FILE), "build", "init"], env, timeout=900)


def _healthy(stack: Stack, container: str) -> bool:
    # podman runs health checks from systemd timers, which this host has not: run them here.
    return stack.podman("healthcheck", "run", container, check=False).returncode == 0


def _tear_down(stack: Stack) -> None:
    """`podman-compose down -v`, then whatever it leaves: containers of services it did not start,
    anonymous volumes, and the project's network."""
    _run(["podman-compose", "-p", stack.project, "-f", str(COMPOSE_FILE), "down", "-v", "-t", "5"], stack.env,
         timeout=300, check=False)
    label = f"label=io.podman.compose.project={stack.project}"
    leftovers = stack.podman("ps", "-a", "-q", "--filter", label, check=False).stdout.split()
    if leftovers:
        stack.podman("rm", "-f", "-v", *leftovers, check=False)
    volumes = stack.podman("volume", "ls", "-q", "--filter", label, check=False).stdout.split()
    if volumes:
        stack.podman("volume", "rm", "-f", *volumes, check=False)
    stack.podman("network", "rm", "-f", f"{stack.project}_default", check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack up to its workers: brokers healthy, simulation and policy made, both pools served."""
    reason = _unusable()
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"the compose stack is required (ENCLAVEQ_REQUIRE_COMPOSE=1) but {reason}")
        pytest.skip(f"{reason}; set ENCLAVEQ_REQUIRE_COMPOSE=1 to make this a failure")
    out = tmp_path_factory.mktemp("compose-out")
    out.chmod(0o755)  # the demo container's non-root user reads the policy from it
    project = f"eqtest{uuid.uuid4().hex[:8]}"
    ports = {name: _free_port() for name in ("ENCLAVEQ_AMQP_PORT", "ENCLAVEQ_MQTT_PORT", "ENCLAVEQ_MANAGEMENT_PORT",
                                             "ENCLAVEQ_PROMETHEUS_PORT")}
    env = {**os.environ, **IMAGES, **{k: str(v) for k, v in ports.items()},
           "CONTAINERS_CONF": CONTAINERS_CONF, "BUILDAH_FORMAT": "docker",  # docker format keeps HEALTHCHECK
           "ENCLAVEQ_BASE_IMAGE": BASE_IMAGE, "ENCLAVEQ_WHEELS": "local", "ENCLAVEQ_OUT": str(out)}
    stack = Stack(project=project, env=env, amqp_url=f"amqp://guest:guest@127.0.0.1:{ports['ENCLAVEQ_AMQP_PORT']}/",
                  mqtt_url=f"mqtt://127.0.0.1:{ports['ENCLAVEQ_MQTT_PORT']}/", policy=out / "policy.toml")
    started = time.monotonic()
    _download_wheels(env)
    _build_images(env, project)
    print(f"\ncompose test: images ready after {time.monotonic() - started:.0f} s", file=sys.stderr)
    try:
        stack.compose("up", "-d", "rabbitmq", "mosquitto")
        for service in ("rabbitmq", "mosquitto"):
            wait_for(lambda s=service: _healthy(stack, stack.container(s)), f"{service} is healthy", 180)
        stack.compose("up", "-d", "--no-deps", "init")
        exit_code = stack.podman("wait", stack.container("init"), timeout=120).stdout.strip()
        assert exit_code == "0", f"init exited {exit_code}:\n{stack.logs(stack.container('init'))}"
        assert stack.policy.exists(), "init wrote no policy for the host"
        stack.compose("up", "-d", "--no-deps", "worker", "mqtt-worker")
        for container in (stack.container("worker", 1), stack.container("worker", 2), stack.container("mqtt-worker")):
            wait_for(lambda c=container: "ready; send SIGTERM" in stack.logs(c), f"{container} serves its pool", 180)
        print(f"compose test: stack up after {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield stack
    finally:
        _tear_down(stack)
        print(f"compose test: torn down after {time.monotonic() - started:.0f} s", file=sys.stderr)


@pytest.fixture
def magika():
    """The stock Magika model the README's commands upload (its model id is the SHA-256 of the
    file, so whoever uploads it first owns it on the pool until they delete it)."""
    from enclaveq.bundled_model import SAMPLE_DOCUMENTS, magika_model

    return magika_model(), SAMPLE_DOCUMENTS


@pytest.fixture(scope="module")
def demo(stack: Stack) -> tuple[str, str]:
    """The demo service run once to completion, as `docker compose up` runs it after the workers
    are healthy: its exit code and its log."""
    for container in (stack.container("worker", 1), stack.container("worker", 2), stack.container("mqtt-worker")):
        wait_for(functools.partial(_healthy, stack, container), f"{container} is healthy (admitted to its pool)", 120)
    stack.compose("up", "-d", "--no-deps", "demo")
    exit_code = stack.podman("wait", stack.container("demo"), timeout=300).stdout.strip()
    return exit_code, stack.logs(stack.container("demo"))


def readme_host_commands(broker: str, policy: Path) -> tuple[str, list[str]]:
    """The host commands of README.md's "Run the stack" (the block that starts with BROKER=), with
    this stack's broker URL and policy path; and its `docker compose` lines, which the test does
    with podman-compose (the restart test; the fixture's tear-down)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Run the stack\n", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if b.startswith("BROKER="))
    lines, compose_lines = [], []
    for line in block.splitlines():
        if line.startswith("docker compose"):
            compose_lines.append(line)
        elif line.startswith("BROKER="):
            lines.append(f"BROKER={shlex.quote(broker)}")
        elif line.startswith("POLICY="):
            lines.append(f"POLICY={shlex.quote(str(policy))}")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n", compose_lines


def test_the_two_workers_joined_one_pool_by_mutual_attestation(stack):
    logs = stack.logs(stack.container("worker", 1)) + stack.logs(stack.container("worker", 2))
    assert "joined pool 'docs'" in logs and "after mutual attestation" in logs
    for number in (1, 2):
        assert "state_slot: using" in stack.logs(stack.container("worker", number))
    slots = {line for number in (1, 2) for line in stack.logs(stack.container("worker", number)).splitlines()
             if "state_slot: using" in line}
    assert len(slots) == 2, f"the two workers share a state directory: {slots}"


def test_the_workers_are_healthy_and_serve_metrics_where_prometheus_scrapes_them(stack):
    for container in (stack.container("worker", 1), stack.container("worker", 2), stack.container("mqtt-worker")):
        assert _healthy(stack, container), f"{container} fails the image's HEALTHCHECK"
    # From another container on the stack's network, by service name, as compose/prometheus scrapes.
    fetch = "import urllib.request as u; print(u.urlopen('http://worker:9100/metrics', timeout=5).read().decode())"
    metrics = stack.podman("exec", stack.container("mqtt-worker"), "python3", "-c", fetch).stdout
    assert "enclaveq_worker_requests_total" in metrics


def test_the_demo_service_verifies_jobs_over_rabbitmq_and_a_pipeline_over_mqtt(stack, demo):
    exit_code, logs = demo
    if exit_code != "0":  # the workers' side of the story, for a failure seen only in CI
        workers = "\n".join(f"--- {c} (last 40 lines)\n" + "\n".join(stack.logs(c).splitlines()[-40:])
                            for c in (stack.container("worker", 1), stack.container("worker", 2),
                                      stack.container("mqtt-worker")))
        raise AssertionError(f"the demo exited {exit_code}:\n{logs}\n{workers}")
    assert "every result equals onnxruntime run directly" in logs
    assert "document pipeline" in logs and "equals the chain run directly" in logs
    assert "demo passed" in logs
    # It leaves the pools as it found them: what it uploaded under its run's own key, it deleted.
    assert "Magika's model deleted from every worker of 'docs'" in logs
    assert "stage models it uploaded deleted from 'events'" in logs


def test_the_readmes_host_commands_work_against_the_stack_after_the_demo(stack, demo, magika, tmp_path):
    """README.md's "Run the stack" host commands, run by bash as written (the stack's broker port
    and policy path substituted), on the stock Magika model, after the demo ran as `up` runs it."""
    import onnxruntime as ort

    assert demo[0] == "0", "the demo failed (see its own test)"
    model, documents = magika
    script, compose_lines = readme_host_commands(stack.amqp_url, stack.policy)
    assert compose_lines == ["docker compose -f compose/compose.yaml restart worker"
                             "   # the pool keeps serving; nothing is lost",
                             "docker compose -f compose/compose.yaml down -v"
                             "          # removes containers, volumes and network"], compose_lines
    # `enclaveq` and `python` from the project's virtual environment, as after `make demo`; the
    # owner key is the default one, which the upload creates in $ENCLAVEQ_HOME.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "ENCLAVEQ_HOME": str(tmp_path / "home")}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script + 'echo "ID=$ID"\n'], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the README's host commands exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    assert "simulated" in done.stdout  # attest's verified claims
    model_id = done.stdout.strip().splitlines()[-1].removeprefix("ID=")
    assert model_id == hashlib.sha256(model.path.read_bytes()).hexdigest(), done.stdout[-2000:]

    direct = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    one = model.features(documents["payroll.csv"])
    with np.load(tmp_path / "result.npz") as result:
        assert np.array_equal(result[model.output_name], direct.run(None, {"bytes": one})[0])
    for name, document in documents.items():
        with np.load(tmp_path / "results" / f"{name}.npz") as result:
            expected = direct.run(None, {"bytes": model.features(document)})[0]
            assert np.array_equal(result[model.output_name], expected), name
    # The README's last host command deleted the model again (only that key could).
    assert model_id not in stack.enclaveq("model", "list", home=tmp_path / "home")


def test_prometheus_of_the_metrics_profile_scrapes_every_worker_and_sees_the_jobs_they_ran(stack, demo):
    """`--profile metrics` as a user starts it (podman-compose ignores profiles: the service is
    named instead), then Prometheus's own API on the host: both pool workers, found by DNS, and the
    MQTT worker are scraped, and their job counters show the demo's jobs."""
    import json as _json
    import urllib.request

    assert demo[0] == "0", "the demo failed (see its own test)"
    stack.compose("up", "-d", "--no-deps", "prometheus")
    api = f"http://127.0.0.1:{stack.env['ENCLAVEQ_PROMETHEUS_PORT']}/api/v1"

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"{api}/{path}", timeout=5) as response:
            return _json.loads(response.read())["data"]

    def targets_up() -> bool:
        try:
            active = get("targets")["activeTargets"]
        except OSError:
            return False
        up = [t for t in active if t["health"] == "up"]
        return len(up) == 3 and {t["labels"]["job"] for t in up} == {"enclaveq-workers", "enclaveq-mqtt-worker"}

    wait_for(targets_up, "Prometheus scrapes both pool workers and the MQTT worker", 90)

    def jobs_seen() -> float:
        query = urllib.request.quote('sum(enclaveq_worker_requests_total{job="enclaveq-workers",kind="job"})')
        result = get(f"query?query={query}")["result"]
        return float(result[0]["value"][1]) if result else 0.0

    wait_for(lambda: jobs_seen() > 0, "Prometheus sees the demo's jobs in the pool workers' counters", 60)


def test_restarting_a_worker_container_mid_batch_loses_no_job(stack, magika, tmp_path):
    import onnxruntime as ort

    from enclaveq import Client, generate_signing_key

    model, documents = magika
    rows = [model.features(document) for document in documents.values()]
    victim = stack.container("worker", 2)
    restarting, restarted = threading.Event(), threading.Event()
    restart_error: list[BaseException] = []

    before: list[str] = []

    def restart() -> None:
        try:  # SIGTERM within the stop grace period, as `docker compose restart` does, then start again
            before.append(stack.logs(victim))
            restarting.set()
            stack.podman("restart", "-t", "40", victim, timeout=120)
        except BaseException as exc:  # noqa: B036 -- reported by the test below
            restart_error.append(exc)
        finally:
            restarted.set()

    def jobs() -> Iterator[dict[str, np.ndarray]]:
        """Jobs until 500 after the restart finished: the restart falls inside the batch, however fast."""
        index, after = 0, 0
        while after < 500 and index < 100_000:
            if index == 200:
                threading.Thread(target=restart, daemon=True).start()
            after += restarted.is_set()
            yield {"bytes": rows[index % len(rows)]}
            index += 1

    outputs: dict[int, np.ndarray] = {}
    with Client(stack.amqp_url, "docs", str(stack.policy), owner_key=generate_signing_key(), max_in_flight=64,
                epoch_state=False, timeout=300) as client:
        model_id = client.upload_model(model.path)
        try:
            for result in client.submit(model_id, jobs()):
                assert result.error is None, f"job {result.index}: {result.error!r}"
                assert result.outputs is not None
                outputs[result.index] = result.outputs[model.output_name]
        finally:
            client.delete_model(model_id)  # the stock model, owned by this test's key: leave the pool as found
    assert restarted.is_set() and not restart_error, restart_error
    assert len(outputs) > 700 and sorted(outputs) == list(range(len(outputs))), "jobs lost or duplicated"
    direct = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    expected = [direct.run(None, {"bytes": row})[0] for row in rows]
    for index, output in outputs.items():
        assert np.array_equal(output, expected[index % len(rows)]), index
    # The restarted container drained, came back and carries on from the sealed state in its own
    # state directory. Its log (podman keeps one log across a container's restarts), counted
    # before and after the restart, shows it: it took the same state slot again; it neither
    # founded the pool nor fetched the model from a member (a worker with an empty state directory
    # joins and logs "model ... synced from a pool member") -- yet it serves at the same epoch with
    # the model it had stored before the restart, so both came out of its own sealed state. (A
    # restarted member also asks the live members for newer keys, which logs "joined pool" again,
    # so that line proves nothing either way.)
    (old,) = before
    wait_for(lambda: stack.logs(victim).count("ready; send SIGTERM") == old.count("ready; send SIGTERM") + 1,
             "the restarted worker serves again", 120)
    wait_for(lambda: _healthy(stack, victim), "the restarted worker is ready again", 60)
    new = stack.logs(victim)
    assert new.count("stopping: finishing in-flight jobs") == old.count("stopping: finishing in-flight jobs") + 1
    slots = [line.strip() for line in new.splitlines() if "state_slot: using" in line]
    assert len(slots) == old.count("state_slot: using") + 1 and len(set(slots)) == 1, slots
    assert f"model {model_id} stored" in old, "the worker had not stored the model before its restart"
    for line in ("founded pool", f"model {model_id} synced from a pool member", "sealed model"):
        assert new.count(line) == old.count(line), f"after the restart: {line!r}\n{new[len(old) - 2000:]}"
    serving_before = [line for line in old.splitlines() if "serving pool 'docs'" in line]
    serving = [line for line in new.splitlines() if "serving pool 'docs'" in line]
    assert len(serving) == len(serving_before) + 1, serving
    epoch = re.search(r"\(epoch (\d+), (\d+) models\)", serving[-1])
    assert epoch is not None and int(epoch[2]) >= 1, serving[-1]
    assert f"(epoch {epoch[1]}, " in serving_before[-1], (serving_before[-1], serving[-1])

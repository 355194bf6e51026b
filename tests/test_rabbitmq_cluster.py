"""A three-node RabbitMQ cluster loses the node that leads the pool's job queue (issue 16, fault 2).

The test starts its own cluster (own node names, ports, data directories and cookie; the
machine's broker is left alone). The worker and the producer are given the cluster as one
comma-separated list of node URLs; the job queue is a quorum queue replicated on all three
nodes. Mid-batch the node leading it is killed with SIGKILL: the clients fail over to another
node by themselves, the queue elects a new leader, and the batch completes with every result
once, equal to direct onnxruntime, and nothing dead-lettered.
"""

from __future__ import annotations

import numpy as np
import pytest

from broker_adapters._common import jobs_queue
from producer_sdk import AsyncClient

from .support import FaultMidway, dead_letters, mlp_model, run_directly, running_worker

# Three Erlang nodes and a 1,500-job batch: alone, in make test's serial pass (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.serial]
JOBS = 1500


async def test_a_batch_survives_the_node_leading_its_job_queue_being_killed(private_cluster, tee, pool):
    rng = np.random.default_rng(2)
    batch = [{"x": rng.standard_normal((1, 4)).astype(np.float32), "bias": np.zeros(3, np.float32)}
             for _ in range(JOBS)]
    urls = private_cluster.urls
    results: dict[int, object] = {}
    victim: list[str] = []

    def kill_the_leader(resume) -> None:
        leader = private_cluster.leader_of(jobs_queue(pool))
        victim.append(leader.node)
        leader.kill()
        resume()

    async with running_worker(tee, urls, pool), AsyncClient(urls, pool, tee.policy(), timeout=120) as client:
        members = private_cluster.members_of(jobs_queue(pool))
        assert len(members) == 3, f"the job queue is not replicated on every node: {members}"
        model_id = await client.upload_model(mlp_model())
        fault = FaultMidway(batch, kill_the_leader, at=JOBS // 4)
        async for result in client.submit(model_id, fault.jobs(), max_in_flight=64):
            assert result.index not in results, f"job {result.index} yielded twice"
            results[result.index] = result
    await fault.finished()
    assert sorted(results) == list(range(JOBS))
    failed = [r for r in results.values() if not r.ok]
    assert not failed, failed[:3]
    for index in (0, JOBS // 2, JOBS - 1):
        np.testing.assert_array_equal(results[index].outputs["logits"], run_directly(mlp_model(), batch[index])["logits"])
    new_leader = private_cluster.leader_of(jobs_queue(pool))
    assert new_leader.node != victim[0], "the queue did not elect another leader"
    assert await dead_letters(urls, pool) == 0

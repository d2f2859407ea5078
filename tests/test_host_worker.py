"""The host worker (mobile.moe.hostwork): jobs computed on its thread, the host's speed emulated
as the link's is, and a failure that ends every wait instead of hanging it."""

from __future__ import annotations

import time

import pytest
import torch
from test_host_kernel import expert_rows

from mobile.errors import RunError
from mobile.moe import host
from mobile.moe.hostwork import HostJob, HostModel, HostWorker
from mobile.moe.layout import ExpertMLP
from mobile.moe.reference import reference


def job_for(rows, ids: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, tag: str = "L0.host") -> HostJob:
    tokens = torch.arange(ids.shape[0], dtype=torch.int32).repeat_interleave(ids.shape[1])
    addresses = torch.tensor([rows[e].data_ptr() for e in ids.flatten().tolist()])
    return HostJob(x, tokens, addresses, weights.flatten(), tag)


@pytest.mark.skipif(host.unavailable() is not None, reason=str(host.unavailable()))
def test_jobs_run_on_the_worker_and_give_the_reference():
    mlp = ExpertMLP(64, 32)
    rows, layout, arena = expert_rows("int4", mlp, experts=4, group=16)
    trace: list = []
    worker = HostWorker(host.HostExperts(mlp, torch.float32, layout, 1), HostModel(), trace)
    try:
        x, ids, weights = torch.randn(2, 64), torch.tensor([[0, 2], [3, 1]]), torch.rand(2, 2)
        out, _ = worker.submit(job_for(rows, ids, x, weights)).wait()
        torch.testing.assert_close(out, reference(x, weights, ids, arena, mlp), rtol=1e-5, atol=1e-5)
        assert trace and trace[0][0] == "L0.host" and trace[0][-1] == {"pairs": 4}
    finally:
        worker.close()
    assert not worker._thread.is_alive()


def test_emulated_host_time_is_padded_per_pair_and_serial():
    """Ratio x the device's time per pair x pairs, one job after the other."""
    model = HostModel("emulated", ratio=10.0, pair_seconds=0.002)  # 20 ms a pair
    worker = HostWorker(lambda x, out, tokens, rows, weights: out, model)
    try:
        x = torch.zeros(1, 8)
        jobs = [worker.submit(HostJob(x, torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int64),
                                      torch.ones(n))) for n in (2, 1)]
        for job in jobs:
            job.wait()
        first, second = jobs
        assert first.end_s - first.start_s >= 0.04 and second.end_s >= first.end_s + 0.02
        assert worker.busy_s >= 0.06
    finally:
        worker.close()


def test_a_failing_kernel_ends_every_wait_in_words():
    def broken(*args):
        raise ZeroDivisionError("injected")

    worker = HostWorker(broken, HostModel())
    x = torch.zeros(1, 8)
    job = worker.submit(HostJob(x, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64),
                                torch.ones(1)))
    start = time.perf_counter()
    with pytest.raises(RunError, match="internal error in the host worker: ZeroDivisionError: injected"):
        job.wait()
    assert time.perf_counter() - start < 5
    with pytest.raises(RunError, match="host worker"):
        worker.submit(HostJob(x, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64),
                              torch.ones(1)))
    worker.close()
    assert not worker._thread.is_alive()

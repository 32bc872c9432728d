"""The OpenMP wait policy skindiff chooses before torch loads, from how busy the cores are."""

import os
import subprocess
import sys
import time

import pytest
import torch

from skindiff.core.device import fused_adam
from skindiff.core.threads import (
    BUSY_CORES,
    busy_cores_of_others,
    choose_thread_policy,
    cpu_jiffies,
    thread_policy_for,
)

PROC_STAT = """cpu  300 10 60 900 40 0 5 2 7 0
cpu0 100 10 20 300 10 0 5 2 7 0
cpu1 200 0 40 600 30 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""


def test_busy_and_total_jiffies_count_only_this_process_cores():
    # cpu0: busy = user 100 + nice 10 + system 20 + irq 0 + softirq 5 + steal 2; guest (7) is
    # already in user; idle and iowait are free.
    assert cpu_jiffies(PROC_STAT, {0}) == (137, 447)
    assert cpu_jiffies(PROC_STAT, {0, 1}) == (137 + 240, 447 + 870)
    assert cpu_jiffies(PROC_STAT, {5}) == (0, 0)


def test_free_cores_spin_briefly_busy_or_unknown_ones_sleep_at_once():
    assert thread_policy_for(0.0) == {"GOMP_SPINCOUNT": "1000"}
    assert thread_policy_for(BUSY_CORES - 0.01) == {"GOMP_SPINCOUNT": "1000"}
    assert thread_policy_for(BUSY_CORES) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert thread_policy_for(None) == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc/stat")
def test_a_busy_neighbour_is_measured_and_makes_threads_sleep_at_once():
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # running before the measurement starts
        busy = busy_cores_of_others(0.3)
        environ: dict[str, str] = {}
        choose_thread_policy(environ)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert busy is not None and 0.8 <= busy <= len(os.sched_getaffinity(0)) + 0.01
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize(
    "given",
    [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "PASSIVE"}],
)
def test_a_policy_already_set_is_left_as_it_is(given):
    environ = dict(given)
    choose_thread_policy(environ)
    assert environ == given


def test_fused_adam_updates_as_the_loop_over_parameters_does():
    torch.manual_seed(0)
    start = [torch.randn(8, 4), torch.randn(4)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    finals = []
    for fused in (False, True):
        params = [p.clone().requires_grad_(True) for p in start]
        assert fused_adam(params)
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, fused=fused)
        for step in grads:
            for param, grad in zip(params, step, strict=True):
                param.grad = grad.clone()
            optimizer.step()
        finals.append(params)
    for unfused, fused in zip(*finals, strict=True):
        assert not torch.equal(unfused, start[0] if unfused.ndim == 2 else start[1])
        torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-7)

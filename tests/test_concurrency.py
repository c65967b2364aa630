"""Threads and process-wide state: first calls from several threads at once, runs training side by side in
threads, and building models while other threads draw random numbers."""
import os
import subprocess
import sys
import threading

import pytest
import torch

from sfg_fast import models, train
from sfg_fast.ops import cpu_ext

needs_ext = pytest.mark.skipif(not cpu_ext.available(), reason="sfg_fast._C is not built")

FIRST_CALLS = r"""
import threading, torch, sfg_fast.functional as F
B, N, D = 8, 3, 4
ids = torch.randint(0, 5, (B, N), generator=torch.Generator().manual_seed(0))
offsets = torch.arange(N) * 5
table, dec = torch.randn(5 * N, D), torch.randn(N, N)
barrier, results = threading.Barrier(4), {}
def work(k):
    barrier.wait()
    try:
        with torch.no_grad():
            results[k] = F.sfg_logits(ids, table, offsets, None, None, dec, "scalar", backend="cpu")
    except Exception as exc:
        results[k] = f"{type(exc).__name__}: {exc}"
threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
bad = [r for r in results.values() if isinstance(r, str)]
assert not bad, bad
assert all(torch.equal(results[0], r) for r in results.values())
print("ok")
"""


@needs_ext
def test_first_calls_from_several_threads_wait_for_the_backends():
    """The backends load on the first call. Another thread calling meanwhile found nothing registered yet:
    an explicit backend raised "no kernel for 'sfg_logits'" and "auto" quietly took the torch path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    for _ in range(2):      # a fresh process each time: the race is on the very first load
        proc = subprocess.run([sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_runs_in_threads_share_the_deterministic_switch():
    """Each run saved the mode, set it and restored its own snapshot: with two runs overlapping, the first to
    finish turned the mode off under the other, and the second then restored "on" for good."""
    assert not torch.are_deterministic_algorithms_enabled()
    entered, leave_first, first_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with train.deterministic_algorithms(True):
            entered.set()
            leave_first.wait(10)
        first_left.set()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(10)
        with train.deterministic_algorithms(True):
            leave_first.set()
            assert first_left.wait(10)
            seen["while the second runs"] = torch.are_deterministic_algorithms_enabled()
        seen["after both"] = torch.are_deterministic_algorithms_enabled()
    finally:
        leave_first.set()
        thread.join()
        torch.use_deterministic_algorithms(False)
    assert seen == {"while the second runs": True, "after both": False}


def test_a_run_keeps_a_callers_deterministic_mode():
    torch.use_deterministic_algorithms(True)
    try:
        with train.deterministic_algorithms(True):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_building_a_fused_model_leaves_other_threads_random_numbers_alone(monkeypatch):
    """The fused first-order table takes the native one's weights, and was built under torch.random.fork_rng
    so as not to draw: fork_rng restores the global generator on exit, so numbers another thread drew during
    the build came again (repeated dropout masks). A thread drawing while the table is built must never
    see a number twice."""
    from sfg_fast.models import base
    real = base.make_field_embedding
    during, after = [], []

    def draw_meanwhile(*args, **kwargs):
        if args and args[0] == "fused" and args[2] == 1:      # the first-order table's rebuild
            drawer = threading.Thread(target=lambda: during.append(torch.rand(64, dtype=torch.float64)))
            drawer.start()
            drawer.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(base, "make_field_embedding", draw_meanwhile)
    torch.manual_seed(0)
    fused = models.build("fm", [50, 40], embedding_dim=4, embedding="fused")
    after.append(torch.rand(64, dtype=torch.float64))
    assert len(during) == 1
    assert not set(during[0].tolist()) & set(after[0].tolist())
    # and the fused model still starts where the native one of the same seed does
    torch.manual_seed(0)
    native = models.build("fm", [50, 40], embedding_dim=4)
    assert torch.equal(fused.linear.table.weight, native.linear.table.weight)


def test_a_run_turns_the_mode_back_on_if_it_was_turned_off_meanwhile():
    """The switch was set by the first run only: a run starting while another ran, after something had turned
    the mode off, trained without it."""
    with train.deterministic_algorithms(True):
        torch.use_deterministic_algorithms(False)      # e.g. user code between two runs' starts
        with train.deterministic_algorithms(True):
            assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()

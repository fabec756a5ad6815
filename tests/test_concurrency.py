"""Concurrency and determinism (issue 9, part 5).

One loaded IntModel used from several Python threads at once gives bit-identical
answers to sequential use (cpu and reference backends); results are bit-identical
across runs, across torch.set_num_threads 1 vs 2 and across the C++ kernels' own
thread count; the per-thread backend selection (a context variable) does not leak.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("qgnn_deploy.fold")
pytest.importorskip("qgnn_deploy.artifact")


def _tiny_model(bits=4):
    from qgnn_deploy.config import preset_config
    from qgnn_deploy.data import calibration_episodes
    from qgnn_deploy.models import build_model
    torch.manual_seed(0)
    cfg = preset_config("tiny", bits)
    m = build_model(cfg)
    images, labels = calibration_episodes(cfg, tasks=1, seed=0)
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.dropout._DropoutNd):
            mod.eval()
    with torch.no_grad():
        m(images, labels)
    return m.eval()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from qgnn_deploy.artifact import save_int_model
    from qgnn_deploy.fold import fold
    m = _tiny_model()
    p = str(tmp_path_factory.mktemp("conc") / "m.qgnn")
    save_int_model(fold(m), p)
    return p, m.config


def _episodes(config, n, tasks=1):
    from qgnn_deploy.data import calibration_episodes
    return [calibration_episodes(config, tasks=tasks, seed=100 + i) for i in range(n)]


def _need(backend):
    from qgnn_deploy.backends import is_backend_available
    if not is_backend_available(backend):
        pytest.skip(f"{backend} backend unavailable")


def _run_threads(fn, items, threads):
    barrier = threading.Barrier(threads)

    def go(item):
        barrier.wait(timeout=60)  # start together: maximal overlap
        return fn(item)

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(go, items))


@pytest.mark.parametrize("backend,threads,rounds", [("cpu", 4, 2), ("reference", 2, 1)])
def test_threads_match_sequential(artifact, backend, threads, rounds):
    """A *freshly loaded* model (empty weight caches) hit by several threads at once."""
    _need(backend)
    from qgnn_deploy.artifact import load_int_model
    path, config = artifact
    eps = _episodes(config, threads)
    im = load_int_model(path, backend=backend)
    concurrent = _run_threads(lambda e: im(*e).logits, eps * rounds, threads)
    seq_model = load_int_model(path, backend=backend)
    sequential = [seq_model(*e).logits for e in eps]
    for i, out in enumerate(concurrent):
        assert torch.equal(out, sequential[i % threads]), f"thread result {i} differs from sequential"


def test_mixed_backends_per_thread(artifact, monkeypatch):
    """Threads selecting different backends with use_backend on one shared model
    (backend=None) each run every op on their own backend and get its answer."""
    _need("cpu")
    from qgnn_deploy.artifact import load_int_model
    from qgnn_deploy.backends import use_backend
    from qgnn_deploy.ops import registry
    path, config = artifact
    (e,) = _episodes(config, 1)
    im = load_int_model(path, backend=None)
    with use_backend("cpu-eager"):  # the module path: every op dispatches (cpu runs the plan)
        want_cpu = im(*e).logits
    with use_backend("reference"):
        want_ref = im(*e).logits
    # the C++ kernels reproduce the reference bit for bit on this model (measured: every
    # logit equal), so the answers alone cannot tell the backends apart: record the
    # backend each op dispatched to, per thread
    assert torch.equal(want_cpu, want_ref)
    dispatched = {}
    lookup = registry.backend_function

    def recording(name, op):
        dispatched.setdefault(threading.get_ident(), set()).add(name)
        return lookup(name, op)
    monkeypatch.setattr(registry, "backend_function", recording)

    def job(name):
        with use_backend(name):
            return name, threading.get_ident(), im(*e).logits

    results = _run_threads(job, ["cpu-eager", "reference", "cpu-eager"], 3)  # one reference pass
    assert len({ident for _, ident, _ in results}) == 3
    for name, ident, out in results:
        assert dispatched[ident] == {name}, (name, dispatched[ident])
        assert torch.equal(out, want_cpu if name == "cpu-eager" else want_ref)


def test_failing_thread_does_not_disturb_others(artifact):
    _need("cpu")
    from qgnn_deploy.artifact import load_int_model
    from qgnn_deploy.errors import InputError
    path, config = artifact
    eps = _episodes(config, 2)
    im = load_int_model(path, backend="cpu")
    want = [im(*e).logits for e in eps]
    bad = eps[0][0].clone()
    bad[0, 0, 0, 0, 0] = float("nan")

    def job(i):
        if i % 2:
            with pytest.raises(InputError):
                im(bad, eps[0][1])
            return None
        return im(*eps[(i // 2) % 2]).logits

    outs = _run_threads(job, list(range(4)), 4)
    assert torch.equal(outs[0], want[0]) and torch.equal(outs[2], want[1])


def test_bit_identical_across_runs_and_thread_counts(artifact):
    _need("cpu")
    from qgnn_deploy.artifact import load_int_model
    from qgnn_deploy.backends import cpu
    path, config = artifact
    (e,) = _episodes(config, 1, tasks=3)
    im = load_int_model(path, backend="cpu")
    saved = torch.get_num_threads()
    results = {}
    try:
        for torch_threads in (1, 2):
            torch.set_num_threads(torch_threads)
            for kernel_threads in (None, 1, 2, 3):
                cpu.set_num_threads(kernel_threads)
                for run in range(2):
                    o = im(*e)
                    # the edges carry the FP32 edge-MLP convs' outputs straight through (a
                    # thread-count dependent sum there once reached them but not the logits)
                    results[(torch_threads, kernel_threads, run)] = torch.cat(
                        [o.logits.flatten()] + [t.flatten() for t in o.point_edges + o.distribution_edges])
    finally:
        cpu.set_num_threads(None)
        torch.set_num_threads(saved)
    first = next(iter(results.values()))
    for key, out in results.items():
        assert torch.equal(out, first), f"result differs at torch/kernel threads/run {key}"
    # a second load of the same file gives the same bits
    o = load_int_model(path, backend="cpu")(*e)
    assert torch.equal(o.logits.flatten(), first[:o.logits.numel()])


def test_kernel_thread_counts_bit_identical_on_large_ops():
    """Big enough that the C++ kernels really split the work (M tiles, K blocks)."""
    try:
        from qgnn_deploy.backends import cpu
    except ImportError:
        pytest.skip("cpu backend missing")
    if not cpu.is_available():
        pytest.skip("C++ extension not built")
    from qgnn_deploy.ops.packing import pack_codes
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (8, 16, 16, 64), generator=g).to(torch.uint8)
    wp = pack_codes(torch.randint(0, 16, (96, 9 * 64), generator=g).to(torch.uint8), 4)
    epi = dict(w_scale=torch.rand(96, generator=g) * 0.1 + 0.01, w_offset=torch.rand(96, generator=g) - 0.5,
               a_scale=0.05, a_offset=-0.3, post_scale=torch.rand(96, generator=g) + 0.5,
               post_shift=torch.randn(96, generator=g), slope=0.2)
    a = torch.randint(0, 256, (40, 30, 30), generator=g).to(torch.uint8)
    v = torch.randint(0, 16, (40, 30, 128), generator=g).to(torch.uint8)
    outs = []
    try:
        for n in (1, 2, 3, 7):
            cpu.set_num_threads(n)
            outs.append((cpu.cpu_qconv2d(x, wp, 4, 4, 3, 1, 1, **epi),
                         cpu.cpu_qconv2d(x, wp, 4, 4, 3, 1, 1, **epi, out_l=-1.0, out_s=0.1, out_bits=4),
                         cpu.cpu_qbmm(a, v, 8, 4, 0.01, -0.1, 0.05, 0.2),
                         cpu.cpu_quantize(torch.randn(1000, 33, generator=torch.Generator().manual_seed(1)),
                                          -1.0, 0.1, 4)))
    finally:
        cpu.set_num_threads(None)
    for o in outs[1:]:
        for a_, b_ in zip(outs[0], o):
            assert torch.equal(a_, b_)
    # concurrent calls into the extension from Python threads (GIL released inside)
    cpu.set_num_threads(2)
    try:
        conc = _run_threads(lambda _: cpu.cpu_qconv2d(x, wp, 4, 4, 3, 1, 1, **epi), range(4), 4)
    finally:
        cpu.set_num_threads(None)
    for c in conc:
        assert torch.equal(c, outs[0][0])


def test_fp32_1x1_conv_is_bit_identical_across_torch_thread_counts():
    # the last conv of every edge MLP (C -> 1 channel, 1x1) stays FP32; torch's conv summed
    # it in a thread-count dependent order (all of 50 random shapes differed 1 vs 2 threads)
    from qgnn_deploy.intmodel import FloatConv2d
    g = torch.Generator().manual_seed(0)
    saved = torch.get_num_threads()
    try:
        for c in (32, 37, 64):
            layer = FloatConv2d("edge.conv_out", torch.randn(1, c, 1, 1, generator=g), torch.randn(1, generator=g),
                                1, 0, None, None, None)
            x = torch.randn(2, 10, 10, c, generator=g)
            outs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs.append(layer(x))
            assert torch.equal(outs[0], outs[1]), c
            ref = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).double(), layer.weight.double(), layer.bias.double())
            assert torch.allclose(outs[0].double(), ref.permute(0, 2, 3, 1), atol=1e-5)
    finally:
        torch.set_num_threads(saved)


def test_wake_workers_between_and_during_runs(artifact):
    """``wake_workers`` (called by every cpu episode before its checks) may land while another
    thread's plan runs, or many times in a row: results stay bit-identical; bad arguments of
    the native call raise instead of touching the pool."""
    _need("cpu")
    from qgnn_deploy.artifact import load_int_model
    from qgnn_deploy.backends import cpu
    from qgnn_deploy.errors import KernelArgumentError
    path, config = artifact
    (e,) = _episodes(config, 1, tasks=2)
    im = load_int_model(path, backend="cpu")
    want = im(*e).logits
    for _ in range(3):
        cpu.wake_workers()
    assert torch.equal(im(*e).logits, want)

    def run(i):
        if i % 2:
            for _ in range(50):
                cpu.wake_workers()
            return None
        return im(*e).logits
    outs = _run_threads(run, list(range(4)), 4)
    for o in outs[::2]:
        assert torch.equal(o, want)
    for args in ((0, 100), (2, -1), (2, 10 ** 7)):
        with pytest.raises(KernelArgumentError):
            cpu._call(cpu._ext().wake_workers, *args)


def test_worker_sharing_the_callers_cpu_is_moved_off_it():
    """A pool worker polling on the caller's CPU (as the kernel's wake-up placement left one
    after idle time) is moved to a free CPU at the next parallel loop, and results stay the
    same. Forced here with affinities: caller and worker on one CPU, then the worker's mask
    opened again (the kernel's load balancer would move it only later)."""
    import os
    import time
    _need("cpu")
    from qgnn_deploy.backends import cpu
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs and sched_setaffinity")
    from qgnn_deploy.ops.packing import pack_codes
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (8, 16, 16, 64), generator=g).to(torch.uint8)
    wp = pack_codes(torch.randint(0, 16, (96, 9 * 64), generator=g).to(torch.uint8), 4)
    epi = dict(w_scale=torch.rand(96, generator=g) * 0.1 + 0.01, w_offset=torch.rand(96, generator=g) - 0.5,
               a_scale=0.05, a_offset=-0.3, out_l=-1.0, out_s=0.1, out_bits=4)
    ext = cpu._ext()
    allowed = os.sched_getaffinity(0)
    here = min(allowed)
    cpu.set_num_threads(2)
    try:
        want = cpu.cpu_qconv2d(x, wp, 4, 4, 3, 1, 1, **epi)  # spawns the worker
        tid = ext.pool_stats()["worker_tids"][0]
        moved = False
        for _ in range(5):  # the load balancer may move it first: then force it again
            os.sched_setaffinity(0, {here})
            os.sched_setaffinity(tid, {here})
            ext.wake_workers(2, 500000)  # it polls (and publishes its CPU) meanwhile
            deadline = time.monotonic() + 2.0
            while ext.pool_stats()["worker_cpus"][0] != here and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.002)  # past the once-a-millisecond limit of the previous move
            os.sched_setaffinity(tid, allowed)
            before = ext.pool_stats()["moves"]
            got = cpu.cpu_qconv2d(x, wp, 4, 4, 3, 1, 1, **epi)
            assert torch.equal(got, want)
            if ext.pool_stats()["moves"] > before:
                moved = True
                break
        assert moved, "the worker sharing the caller's CPU was never moved"
        assert os.sched_getaffinity(tid) == allowed  # its own mask is back
        deadline = time.monotonic() + 2.0
        while ext.pool_stats()["worker_cpus"][0] in (here, -1) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert ext.pool_stats()["worker_cpus"][0] not in (here, -1)
    finally:
        os.sched_setaffinity(0, allowed)
        cpu.set_num_threads(None)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("tasks", [0, 1, 2, 3, 7, 64, 1001])
def test_thread_pool_runs_every_task_once(threads, tasks):
    """Each thread's contiguous share first, then the others' leftovers: every task runs
    exactly once, on a thread id below the count asked for, whatever the split (more
    threads than cores or tasks included); with one task per thread or fewer nothing is
    lost either."""
    _need("cpu")
    from qgnn_deploy.backends import cpu
    ext = cpu._ext()
    for _ in range(20):  # the split moves with the timing of the workers
        used, runs, by = ext.parallel_for_runs(threads, tasks)
        assert runs == [1] * tasks
        assert 1 <= used <= max(1, min(threads, tasks))
        assert all(0 <= t < threads for t in by)


def test_thread_pool_concurrent_callers_run_every_task_once():
    """A caller that finds the pool busy runs its loop on its own thread: no task is run
    twice or lost when several Python threads call at once."""
    _need("cpu")
    from qgnn_deploy.backends import cpu
    ext = cpu._ext()
    results = _run_threads(lambda n: ext.parallel_for_runs(2, n), [5, 64, 257, 1000] * 2, 4)
    for n, (used, runs, by) in zip([5, 64, 257, 1000] * 2, results):
        assert runs == [1] * n and used in (1, 2) and all(0 <= t < 2 for t in by)

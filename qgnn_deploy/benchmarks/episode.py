"""End-to-end episode latency: every available engine vs torch FP32 eager and onnxruntime FP32.

Workload (DESIGN.md section 6): one full episode batch -- ``tasks`` tasks (default 10) of
``N`` images each (10 for 5-way 1-shot), at the model's image size, all generations --
from images to logits. Variants, all in this process, timed round-robin (one run of
each per round, so machine noise hits them alike), after ``warmup`` untimed runs each:

* ``torch_fp32``: the FP32 :class:`QGNNModel` (the checkpoint's float weights) in eager;
* ``onnxruntime_fp32``: onnxruntime on the FP32 ONNX export;
* ``reference`` / ``cpu`` / ``triton``: the folded :class:`IntModel` on that op backend;
* ``onnxruntime_int``: onnxruntime on the integer ONNX export.

Speed-ups are ratios of p50 latencies from the same run. A variant that cannot run
here is reported under ``unavailable`` with the reason; nothing is estimated.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

#: variant names in the order they are reported
BASELINES = ("torch_fp32", "onnxruntime_fp32")
INT_BACKENDS = ("reference", "cpu", "triton")
DEFAULT_BACKENDS = ("cpu", "triton", "onnx")
ALL_BACKENDS = ("reference", "cpu", "triton", "onnx")


@dataclass
class Variant:
    backend: str
    fn: Callable[[], Any]
    times_ms: List[float] = field(default_factory=list)


# ------------------------------------------------------------------ environment

def backend_status(names: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """(available op backends among ``names``, {unavailable name: reason})."""
    ok, why = [], {}
    for name in names:
        if name not in INT_BACKENDS:
            continue
        try:
            from ..backends import backend_module
            backend_module(name)
            ok.append(name)
        except Exception as e:  # noqa: BLE001 - any failure means "not here", with its reason
            why[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return ok, why


def device_info() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:  # other work on the machine skews latencies: say how busy it was
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def versions() -> Dict[str, Optional[str]]:
    import qgnn_deploy
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "qgnn_deploy": qgnn_deploy.__version__, "numpy": np.__version__}
    for mod in ("onnxruntime", "onnx", "triton"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


# ------------------------------------------------------------------ variants

def fp32_twin(model):
    """The FP32 QGNNModel with ``model``'s float weights (quantizers dropped), eval mode."""
    from ..models import build_model
    cfg = model.config.replace(bits=32, layer_bits={})
    fp = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if not any(q in k for q in ("weight_quant.", "act_quant.", "adj_quant.", "node_quant."))}
    fp.load_state_dict(state, strict=True)
    return fp.eval()


def _ort_session(path: str, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _ort_fn(sess, images: torch.Tensor, labels: torch.Tensor):
    names = [i.name for i in sess.get_inputs()]
    feed = dict(zip(names, (images.numpy(), labels.numpy())))
    return lambda: sess.run(None, feed)


def build_variants(float_model, int_model, backends: Sequence[str], images: torch.Tensor,
                   labels: torch.Tensor, threads: int, workdir: str,
                   log: Callable[[str], None] = lambda s: None) -> Tuple[List[Variant], Dict[str, str], Dict[str, Any]]:
    """The variants to time, {name: reason} for those that cannot run, and export info."""
    variants: List[Variant] = []
    unavailable: Dict[str, str] = {}
    info: Dict[str, Any] = {}
    fp = fp32_twin(float_model) if float_model is not None else None
    if fp is not None:
        def torch_fp32():
            with torch.no_grad():
                return fp(images, labels).logits
        variants.append(Variant("torch_fp32", torch_fp32))
    else:
        unavailable["torch_fp32"] = "no float weights (an integer artifact was given)"
    export = None
    try:
        from ..backends.onnx import export_module
        export = export_module()
    except Exception as e:  # noqa: BLE001
        reason = f"ONNX export unavailable: {type(e).__name__}: {e}"
        unavailable["onnxruntime_fp32"] = reason
        if "onnx" in backends:
            unavailable["onnxruntime_int"] = reason
    if export is not None and fp is not None:
        try:
            path = os.path.join(workdir, "fp32.onnx")
            log("exporting the FP32 model to ONNX")
            export.export_onnx(fp, path)
            variants.append(Variant("onnxruntime_fp32", _ort_fn(_ort_session(path, threads), images, labels)))
        except Exception as e:  # noqa: BLE001
            unavailable["onnxruntime_fp32"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    ok, why = backend_status([b for b in backends if b in INT_BACKENDS])
    unavailable.update(why)
    if int_model is None:
        for b in ok:
            unavailable[b] = "no integer model (fold unavailable)"
        ok = []
    for name in ok:
        def run_int(name=name):
            prev = int_model.backend
            int_model.backend = name
            try:
                return int_model(images, labels).logits
            finally:
                int_model.backend = prev
        if name == "triton" and not images.is_cuda:
            unavailable[name] = "the triton backend runs on CUDA tensors; this benchmark runs on CPU"
            continue
        variants.append(Variant(name, run_int))
    if "onnx" in backends and export is not None:
        if int_model is None:
            unavailable["onnxruntime_int"] = "no integer model (fold unavailable)"
        else:
            try:
                path = os.path.join(workdir, "int.onnx")
                log("exporting the integer model to ONNX")
                info["onnx_int"] = {k: v for k, v in export.export_onnx(int_model, path).items()
                                    if isinstance(v, (str, int, float, bool))}
                variants.append(Variant("onnxruntime_int", _ort_fn(_ort_session(path, threads), images, labels)))
            except Exception as e:  # noqa: BLE001
                unavailable["onnxruntime_int"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return variants, unavailable, info


# ------------------------------------------------------------------ timing

#: idle time after every run, untimed: onnxruntime's pool keeps a core spinning ~28 ms after
#: ``run`` returns (libgomp's spin is shorter), which would halve the next variant's cores.
SETTLE_MS = 50.0


def measure(variants: List[Variant], repeats: int, warmup: int, progress: bool = True,
            desc: str = "bench") -> None:
    """Warm-up each variant, then ``repeats`` rounds of one timed run per variant, each
    followed by :data:`SETTLE_MS` of idle time."""
    from tqdm import tqdm
    total = len(variants) * (warmup + repeats)
    with tqdm(total=total, desc=desc, unit="run", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        for v in variants:
            for _ in range(warmup):
                v.fn()
                bar.update(1)
        for _ in range(repeats):
            for v in variants:
                t0 = time.perf_counter()
                v.fn()
                v.times_ms.append((time.perf_counter() - t0) * 1e3)
                bar.update(1)
                time.sleep(SETTLE_MS / 1e3)


def summarize(variants: List[Variant], workload: str) -> List[Dict[str, Any]]:
    p50 = {v.backend: float(np.percentile(v.times_ms, 50)) for v in variants}
    base = p50.get("torch_fp32")
    ort = p50.get("onnxruntime_fp32")
    out = []
    for v in variants:
        t = np.asarray(v.times_ms)
        out.append({"workload": workload, "backend": v.backend,
                    "p50_ms": p50[v.backend], "p90_ms": float(np.percentile(t, 90)),
                    "mean_ms": float(t.mean()), "min_ms": float(t.min()), "runs": int(t.size),
                    "speedup_vs_torch_fp32": (base / p50[v.backend]) if base else None,
                    "speedup_vs_onnxruntime_fp32": (ort / p50[v.backend]) if ort else None})
    return out


def run_episode_bench(float_model=None, int_model=None, backends: Sequence[str] = DEFAULT_BACKENDS,
                      tasks: int = 10, threads: Optional[int] = None, repeats: int = 20,
                      warmup: int = 3, progress: bool = True, seed: int = 0,
                      log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Time one episode batch on every variant. Returns the ``bench --json`` object
    (without per-layer results): ``device``, ``threads``, ``batch``, ``versions``,
    ``results`` ({workload, backend, p50_ms, p90_ms, speedup_vs_torch_fp32, ...}),
    ``unavailable`` ({variant: reason})."""
    from ..report import default_episode
    model = float_model if float_model is not None else int_model
    if model is None:
        raise ValueError("run_episode_bench needs a float model or an integer model")
    config = model.config
    threads = int(threads or torch.get_num_threads())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    cpu_threads_set = False
    try:
        try:
            from ..backends import cpu as cpu_backend
            if hasattr(cpu_backend, "set_num_threads"):
                old_cpu = getattr(cpu_backend, "_threads_override", None)
                cpu_backend.set_num_threads(threads)
                cpu_threads_set = True
        except Exception:  # noqa: BLE001 - cpu backend absent: reported by build_variants
            pass
        images, labels = default_episode(config, tasks, seed)
        workload = (f"episode_{tasks}x{config.num_nodes}_{config.image_size}px_"
                    f"{getattr(int_model, 'generations', config.generations)}gen")
        with tempfile.TemporaryDirectory(prefix="qgnn-bench-") as tmp:
            variants, unavailable, info = build_variants(float_model, int_model, backends, images,
                                                         labels, threads, tmp, log)
            measure(variants, repeats, warmup, progress, desc=workload)
        results = summarize(variants, workload)
    finally:
        torch.set_num_threads(old)
        if cpu_threads_set:
            cpu_backend.set_num_threads(old_cpu)
    return {"device": device_info(), "threads": threads,
            "batch": {"tasks": tasks, "images": tasks * config.num_nodes,
                      "image_size": config.image_size, "way": config.way, "shot": config.shot},
            "repeats": repeats, "warmup": warmup, "versions": versions(),
            "results": results, "unavailable": unavailable, "export": info,
            "method": ("variants interleaved round-robin in one process; p50/p90 over the timed "
                       "runs; speed-ups are ratios of p50s from this run")}


def format_results(results: List[Dict[str, Any]]) -> str:
    f = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    lines = ["| workload | backend | p50 ms | p90 ms | vs torch FP32 | vs ORT FP32 | vs ORT int8 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['workload']} | {r['backend']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{f(r.get('speedup_vs_torch_fp32'))} | {f(r.get('speedup_vs_onnxruntime_fp32'))} | "
                     f"{f(r.get('speedup_vs_onnxruntime_int8'))} |")
    return "\n".join(lines)


__all__ = ["run_episode_bench", "build_variants", "measure", "summarize", "fp32_twin",
           "device_info", "versions", "backend_status", "format_results"]

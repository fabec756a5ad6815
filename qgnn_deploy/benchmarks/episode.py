"""End-to-end episode latency (and accuracy) of our engines against what a user would run instead.

Workload (docs/measuring.md): one episode batch -- ``tasks`` tasks of ``N`` images each
(10 for 5-way 1-shot) at the model's image size, the whole graph (DPGN: all generations;
EGNN: all layers) -- from images to logits; T=1 is the latency a deployed classifier
sees. Either model family (DPGN ``QGNNModel``, EGNN ``EGNNModel`` and their folded
``IntModel``) runs the same variants: they share the episode contract (inputs ``images``,
``support_labels``; output ``.logits`` [T, Q, way]). Variants, all in this process,
timed round-robin (one run of each per round, so machine noise hits them alike) after
``warmup`` untimed runs each:

baselines (:data:`BASELINES`)
  * ``torch_fp32``: the FP32 model of the checkpoint's family (its float weights), eager,
    weights in channels_last (so every conv runs NHWC in oneDNN; rows say ``layout``);
  * ``torch_bf16``: the same under ``torch.autocast("cpu", torch.bfloat16)``, where the
    CPU has bf16 arithmetic (avx512_bf16 or amx_bf16);
  * ``onnxruntime_fp32``: onnxruntime on the FP32 ONNX export;
  * ``onnxruntime_int8_qdq``: that export quantized by onnxruntime's ``quantize_static``
    (QDQ, per-channel s8 weights, u8 activations, calibrated on synthetic episodes;
    :mod:`.ort_qdq`) -- the int8 route of onnxruntime's own tooling;
our engines (:data:`ENGINES`)
  * ``cpu`` / ``cpu-eager`` / ``reference`` / ``triton``: the folded :class:`IntModel` on
    that backend (``cpu`` rows carry the kernels' ``isa``);
  * ``onnx`` -> row ``onnxruntime_int``: onnxruntime on our integer ONNX export.

Speed-ups are ratios of p50 latencies from the same run. Accuracy (optional) is every
variant's on the same synthetic test-split episodes. A variant that cannot run here is
reported under ``unavailable`` with the reason; nothing is estimated.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from ..intmodel import family_of
from .variants import BASELINES, DEFAULT_ENGINES, ENGINES, INT_BACKENDS, SPEEDUP_BASES

#: CPU flags reported in ``device`` (plus every ``amx_*`` flag the CPU has)
CPU_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass
class Variant:
    """One timed call; ``details`` go into its result row."""

    backend: str
    fn: Callable[[], Any]
    times_ms: List[float] = field(default_factory=list)
    details: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Engine:
    """One way to run an episode: ``predict(images float32 [T, N, 3, S, S], support_labels
    int64 [T, way*shot]) -> logits [T, Q, way]`` (Q = way queries; torch or numpy), on ``device``."""

    name: str
    predict: Callable[[torch.Tensor, torch.Tensor], Any]
    details: Dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


# ------------------------------------------------------------------ environment

def backend_status(names: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """(available IntModel backends among ``names``, {unavailable name: reason})."""
    from ..backends import backend_module
    ok, why = [], {}
    for name in names:
        if name not in INT_BACKENDS:
            continue
        try:
            backend_module(name)
            ok.append(name)
        except Exception as e:  # noqa: BLE001 - any failure means "not here", with its reason
            why[name] = _reason(e)
    return ok, why


def cpu_flags() -> Set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_unavailable_reason(flags: Set[str]) -> Optional[str]:
    """Why ``torch_bf16`` is no baseline on a CPU with ``flags`` (None: it is one)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn), which runs bf16 convolutions on CPU"
    if not any(f in flags for f in BF16_FLAGS):
        return (f"the CPU has none of {', '.join(BF16_FLAGS)}: bf16 autocast would run emulated, "
                "slower than FP32, not what a user would pick")
    return None


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
    flags = cpu_flags()
    names = list(CPU_FLAGS) + sorted(f for f in flags if f.startswith("amx_") and f not in CPU_FLAGS)
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "cpu_flags": {f: f in flags for f in names}, "cuda": torch.cuda.is_available()}
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


@contextlib.contextmanager
def bench_threads(threads: int) -> Iterator[None]:
    """torch and the cpu kernels on ``threads`` threads inside the block (onnxruntime
    sessions take it when they are created)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    cpu_backend = None
    try:
        from ..backends import cpu as cpu_backend
        old_cpu = cpu_backend._threads_override
        cpu_backend.set_num_threads(threads)
    except ImportError:  # cpu backend absent: reported by build_engines
        cpu_backend = None
    try:
        yield
    finally:
        torch.set_num_threads(old)
        if cpu_backend is not None:
            cpu_backend.set_num_threads(old_cpu)


# ------------------------------------------------------------------ engines

def fp32_twin(model):
    """A fresh FP32 model of ``model``'s family (``build_model`` dispatches on the config:
    QGNNModel or EGNNModel) with its float weights (quantizers dropped), eval mode; a copy
    even for an FP32 ``model``, since the torch baselines move it to channels_last."""
    from ..models import build_model
    cfg = model.config.replace(bits=32, layer_bits={})
    fp = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if not any(q in k for q in ("weight_quant.", "act_quant.", "adj_quant.", "node_quant."))}
    fp.load_state_dict(state, strict=True)
    return fp.eval()


def _torch_engines(fp, baselines: Sequence[str], unavailable: Dict[str, str]) -> List[Engine]:
    """torch_fp32 / torch_bf16 on ``fp`` with channels_last weights (the first conv's
    NCHW input then gives NHWC activations throughout the backbone)."""
    engines: List[Engine] = []
    cl = fp.to(memory_format=torch.channels_last)
    if "torch_fp32" in baselines:
        def torch_fp32(images, labels):
            with torch.no_grad():
                return cl(images, labels).logits
        engines.append(Engine("torch_fp32", torch_fp32, {"layout": "channels_last", "precision": "fp32",
                                                         "description": "torch FP32 eager, channels_last"}))
    if "torch_bf16" in baselines:
        why = bf16_unavailable_reason(cpu_flags())
        if why:
            unavailable["torch_bf16"] = why
        else:
            def torch_bf16(images, labels):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return cl(images, labels).logits.float()
            engines.append(Engine("torch_bf16", torch_bf16, {
                "layout": "channels_last", "precision": "bf16 autocast",
                "description": "torch bf16 autocast, channels_last"}))
    return engines


def _ort_predict(session):
    """onnxruntime's own call on the episode (inputs ``images``, ``support_labels``)."""
    def predict(images, labels):
        return session.run(["logits"], {"images": images.numpy(), "support_labels": labels.numpy()})[0]
    return predict


def _onnx_engines(float_model, baselines: Sequence[str], threads: int, unavailable: Dict[str, str],
                  exports: Dict[str, Any], log: Callable[[str], None]) -> List[Engine]:
    """onnxruntime_fp32 and onnxruntime_int8_qdq (its quantized FP32 export)."""
    wanted = [b for b in ("onnxruntime_fp32", "onnxruntime_int8_qdq") if b in baselines]
    if not wanted:
        return []
    from ..backends.onnx import OnnxSession
    try:
        log("FP32 ONNX export (cached)")
        fp32 = OnnxSession.from_float(float_model, threads=threads)
    except Exception as e:  # noqa: BLE001 - no onnx / onnxruntime here: both say why
        for b in wanted:
            unavailable[b] = f"FP32 ONNX export unavailable: {_reason(e)}"
        return []
    exports["onnxruntime_fp32"] = {"path": fp32.path, "bytes": fp32.bytes, "cached": fp32.info.get("cached")}
    engines = []
    if "onnxruntime_fp32" in wanted:
        engines.append(Engine("onnxruntime_fp32", _ort_predict(fp32.session),
                              {"description": "onnxruntime, FP32 export"}))
    if "onnxruntime_int8_qdq" in wanted:
        try:
            from .ort_qdq import qdq_summary, quantize_qdq_int8
            log("onnxruntime quantize_static: int8 QDQ of the FP32 export (cached after the first run)")
            info = quantize_qdq_int8(fp32.path, float_model.config)
            qdq = OnnxSession(info["path"], threads=threads)
            exports["onnxruntime_int8_qdq"] = {**info, "bytes": qdq.bytes, "graph": qdq_summary(info["path"])}
            engines.append(Engine("onnxruntime_int8_qdq", _ort_predict(qdq.session), {
                "description": "onnxruntime int8 QDQ (quantize_static: s8 per-channel weights, u8 activations)"}))
        except Exception as e:  # noqa: BLE001
            unavailable["onnxruntime_int8_qdq"] = _reason(e)
    return engines


def _int_engines(int_model, backends: Sequence[str], threads: int, unavailable: Dict[str, str],
                 exports: Dict[str, Any], log: Callable[[str], None]) -> List[Engine]:
    """onnxruntime_int (our integer export) and the IntModel on each asked-for backend."""
    engines: List[Engine] = []
    if "onnx" in backends:
        try:
            from ..backends.onnx import OnnxSession
            log("integer ONNX export (cached)")
            sess = OnnxSession(int_model, threads=threads)
            form = sess.metadata.get("qgnn_deploy.form")
            exports["onnxruntime_int"] = {"path": sess.path, "bytes": sess.bytes, "form": form,
                                          "cached": sess.info.get("cached")}
            engines.append(Engine("onnxruntime_int", _ort_predict(sess.session), {
                "form": form, "description": f"onnxruntime, our integer export ({form})"}))
        except Exception as e:  # noqa: BLE001
            unavailable["onnxruntime_int"] = _reason(e)
    ok, why = backend_status([b for b in backends if b in INT_BACKENDS])
    unavailable.update(why)
    for name in (b for b in INT_BACKENDS if b in ok):
        if name == "triton" and not torch.cuda.is_available():
            unavailable[name] = "the triton backend runs on CUDA tensors; there is no CUDA device here"
            continue
        device = "cuda" if name == "triton" else "cpu"
        model = copy.deepcopy(int_model).to(device) if device == "cuda" else int_model

        def predict(images, labels, name=name, model=model):
            # engines share the model: each selects its backend, set only when another engine
            # ran last (an nn.Module attribute store is ~4 us; run_episode_bench restores it)
            if model.backend != name:
                model.backend = name
            return model(images, labels).logits
        details = {"zero_point": int_model.zero_point, "description": f"IntModel on '{name}'"}
        if name in ("cpu", "cpu-eager"):
            from ..backends import cpu as cpu_backend
            details["isa"] = cpu_backend.active_isa()
            details["description"] += f" ({details['isa']})"
        engines.append(Engine(name, predict, details, device))
    return engines


def build_engines(float_model, int_model, backends: Sequence[str] = DEFAULT_ENGINES,
                  baselines: Sequence[str] = BASELINES, threads: int = 1,
                  log: Callable[[str], None] = lambda s: None
                  ) -> Tuple[List[Engine], Dict[str, str], Dict[str, Any]]:
    """The engines to time (baselines first, in :data:`BASELINES` then :data:`ENGINES`
    order), ``{name: reason}`` for those that cannot run, and what each export is."""
    unavailable: Dict[str, str] = {}
    exports: Dict[str, Any] = {}
    engines: List[Engine] = []
    if float_model is None:
        for b in baselines:
            unavailable[b] = "no float weights (an integer artifact was given)"
    else:
        engines += _torch_engines(fp32_twin(float_model), baselines, unavailable)
        engines += _onnx_engines(float_model, baselines, threads, unavailable, exports, log)
    if int_model is None:
        for b in backends:
            unavailable["onnxruntime_int" if b == "onnx" else b] = "no integer model (fold unavailable)"
    else:
        engines += _int_engines(int_model, backends, threads, unavailable, exports, log)
    return engines, unavailable, exports


# ------------------------------------------------------------------ timing

#: idle time after every run, untimed: onnxruntime's pool keeps a core spinning ~28 ms after
#: ``run`` returns (libgomp's spin is shorter), which would halve the next variant's cores.
SETTLE_MS = 50.0


#: timed calls per variant and round, back to back after one untimed call
BURST = 3


def measure(variants: List[Variant], repeats: int, warmup: int, progress: bool = True,
            desc: str = "bench", burst: int = BURST) -> None:
    """Warm-up each variant, then rounds until every variant has ``repeats`` timed runs: per
    variant, :data:`SETTLE_MS` of idle time (the previous variant's threads stop spinning),
    one untimed call, then ``burst`` timed calls back to back.

    Steady state, as a classifier answering a stream of episodes sees it (MLPerf's
    single-stream scenario): an isolated call after idle time measured the VM's wake-up
    as much as the engine (the compiled plan, T=1: 5.1 ms back to back, 11.3 ms after
    50 ms of sleep and another process's work; every step slowed, on both cores)."""
    from tqdm import tqdm
    rounds = -(-repeats // max(1, burst))
    total = len(variants) * (warmup + repeats + rounds)
    with tqdm(total=total, desc=desc, unit="run", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        for v in variants:
            for _ in range(warmup):
                v.fn()
                bar.update(1)
        done = 0
        while done < repeats:
            n = min(burst, repeats - done)
            for v in variants:
                time.sleep(SETTLE_MS / 1e3)
                v.fn()
                bar.update(1)
                for _ in range(n):
                    t0 = time.perf_counter()
                    v.fn()
                    v.times_ms.append((time.perf_counter() - t0) * 1e3)
                    bar.update(1)
            done += n


def summarize(variants: List[Variant], workload: str) -> List[Dict[str, Any]]:
    """One row per variant: p50/p90 and ``speedup_vs_<base>`` for every base of
    :data:`SPEEDUP_BASES` (None where that base did not run)."""
    p50 = {v.backend: float(np.percentile(v.times_ms, 50)) for v in variants}
    out = []
    for v in variants:
        t = np.asarray(v.times_ms)
        row = {"workload": workload, "backend": v.backend,
               "p50_ms": p50[v.backend], "p90_ms": float(np.percentile(t, 90)),
               "mean_ms": float(t.mean()), "min_ms": float(t.min()), "runs": int(t.size)}
        for base in SPEEDUP_BASES:
            row[f"speedup_vs_{base}"] = p50[base] / p50[v.backend] if base in p50 else None
        row.update(v.details)
        out.append(row)
    return out


#: how a family's graph depth reads in a workload name (DPGN generations, EGNN layers)
DEPTH_UNITS = {"dpgn": "gen", "egnn": "layers"}


def workload_name(config, tasks: int, depth: int) -> str:
    """``episode_10x10_32px_6gen`` (DPGN) / ``egnn_episode_10x10_32px_3layers`` (EGNN)."""
    family = family_of(config).name
    prefix = "" if family == "dpgn" else f"{family}_"
    return f"{prefix}episode_{tasks}x{config.num_nodes}_{config.image_size}px_{depth}{DEPTH_UNITS[family]}"


def _synced(engine: Engine, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], Any]:
    """The timed call: ``engine`` on this episode, waiting for the GPU where it runs on one."""
    if engine.device == "cpu":
        return lambda: engine.predict(images, labels)
    images, labels = images.to(engine.device), labels.to(engine.device)

    def call():
        out = engine.predict(images, labels)
        torch.cuda.synchronize()
        return out
    return call


def time_engines(engines: Sequence[Engine], config, tasks: int, depth: int, repeats: int,
                 warmup: int, progress: bool = True, seed: int = 0) -> List[Dict[str, Any]]:
    """Time every engine on one random episode batch of ``tasks`` tasks, interleaved;
    ``depth`` (graph generations / layers run) names the workload."""
    from ..report import default_episode
    images, labels = default_episode(config, tasks, seed)
    variants = [Variant(e.name, _synced(e, images, labels), details=dict(e.details)) for e in engines]
    workload = workload_name(config, tasks, depth)
    measure(variants, repeats, warmup, progress, desc=workload)
    return summarize(variants, workload)


def engine_accuracy(engines: Sequence[Engine], config, episodes: int, seed: int = 0
                    ) -> Dict[str, Dict[str, float]]:
    """``{engine: {"accuracy", "ci95"}}`` (fractions in [0, 1]) over the same ``episodes``
    synthetic test-split tasks, in batches of 10: per task the mean over its queries of
    ``argmax(logits [T, Q, way]) == query labels [T, Q]``."""
    from ..data import episode_batches
    from ..evaluate import confidence_interval
    batches = list(episode_batches(config, episodes, seed, split="test", dataset="synthetic",
                                   tasks_per_batch=10))
    out = {}
    for e in engines:
        per_episode = []
        for images, support, query in batches:
            logits = torch.as_tensor(e.predict(images.to(e.device), support.to(e.device))).float().cpu()
            per_episode.append((logits.argmax(-1) == query).float().mean(1))
        acc = torch.cat(per_episode).numpy()
        out[e.name] = {"accuracy": float(acc.mean()), "ci95": confidence_interval(acc)}
    return out


def run_episode_bench(float_model=None, int_model=None, backends: Sequence[str] = DEFAULT_ENGINES,
                      baselines: Sequence[str] = BASELINES, tasks: int = 10,
                      threads: Optional[int] = None, repeats: int = 20, warmup: int = 3,
                      accuracy_episodes: int = 0, progress: bool = True, seed: int = 0,
                      log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Time one episode batch of ``tasks`` tasks on every variant, and with
    ``accuracy_episodes`` > 0 evaluate each on that many synthetic test episodes.

    Returns the ``bench --json`` object (without per-layer results): ``device``,
    ``threads``, ``family`` (dpgn / egnn), ``batch``, ``zero_point``, ``versions``, ``results`` ({workload, backend,
    p50_ms, p90_ms, speedup_vs_torch_fp32, speedup_vs_torch_bf16,
    speedup_vs_onnxruntime_fp32, speedup_vs_onnxruntime_int, accuracy, ...}),
    ``accuracy`` (how it was measured), ``exports``, ``unavailable`` ({variant: reason}).
    """
    model = float_model if float_model is not None else int_model
    if model is None:
        raise ValueError("run_episode_bench needs a float model or an integer model")
    config = model.config
    threads = int(threads or torch.get_num_threads())
    depth = getattr(int_model, "generations", None) or family_of(config).depth(config)
    backend = getattr(int_model, "backend", None)  # the engines select theirs on the model
    try:
        with bench_threads(threads):
            engines, unavailable, exports = build_engines(float_model, int_model, backends, baselines,
                                                          threads, log)
            results = time_engines(engines, config, tasks, depth, repeats, warmup, progress, seed)
            accuracy = None
            if accuracy_episodes:
                log(f"accuracy of every variant on {accuracy_episodes} synthetic test episodes")
                by_engine = engine_accuracy(engines, config, accuracy_episodes, seed)
                for row in results:
                    row["accuracy"] = by_engine[row["backend"]]["accuracy"]
                    row["accuracy_ci95"] = by_engine[row["backend"]]["ci95"]
                accuracy = {"episodes": accuracy_episodes, "dataset": "synthetic", "split": "test",
                            "seed": seed, "way": config.way, "shot": config.shot, "by_backend": by_engine}
    finally:
        if int_model is not None:
            int_model.backend = backend
    return {"device": device_info(), "threads": threads, "family": family_of(config).name,
            "batch": {"tasks": tasks, "images": tasks * config.num_nodes,
                      "image_size": config.image_size, "way": config.way, "shot": config.shot},
            "zero_point": getattr(int_model, "zero_point", None),
            "repeats": repeats, "warmup": warmup, "versions": versions(),
            "results": results, "accuracy": accuracy, "unavailable": unavailable, "exports": exports,
            "method": ("variants interleaved round-robin in one process; p50/p90 over the timed "
                       "runs; speed-ups are ratios of p50s from this run")}


def format_results(results: List[Dict[str, Any]]) -> str:
    """A markdown table of result rows (episode rows and, if present, per-layer rows)."""
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    layers = any("speedup_vs_onnxruntime_int8" in r for r in results)
    head = ("| workload | backend | runs as | p50 ms | p90 ms | vs torch FP32 | vs torch bf16 | "
            "vs ORT FP32 | vs ORT int (ours) |" + (" vs ORT int8 (layer) |" if layers else "")
            + " accuracy |")
    lines = [head, "|---|---|---|" + "---:|" * (head.count("|") - 4)]
    for r in results:
        acc = f"{100 * r['accuracy']:.1f}% +- {100 * r['accuracy_ci95']:.1f}" if "accuracy" in r else "-"
        lines.append(
            f"| {r['workload']} | {r['backend']} | {r.get('description', r.get('shape', '-'))} | {r['p50_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {x(r.get('speedup_vs_torch_fp32'))} | {x(r.get('speedup_vs_torch_bf16'))} | "
            f"{x(r.get('speedup_vs_onnxruntime_fp32'))} | {x(r.get('speedup_vs_onnxruntime_int'))} |"
            + (f" {x(r.get('speedup_vs_onnxruntime_int8'))} |" if layers else "") + f" {acc} |")
    return "\n".join(lines)


__all__ = ["run_episode_bench", "build_engines", "time_engines", "engine_accuracy", "measure",
           "summarize", "bench_threads", "fp32_twin", "device_info", "cpu_flags",
           "bf16_unavailable_reason", "versions", "backend_status", "format_results", "workload_name",
           "Engine", "Variant", "BASELINES", "ENGINES", "DEFAULT_ENGINES"]

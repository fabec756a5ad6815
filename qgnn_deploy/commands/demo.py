"""``qgnn-deploy demo``: the whole pipeline on the embedded default model, in one command.

checkpoint -> fold -> run on every available backend (parity vs the reference engine)
-> ONNX export + onnxruntime check -> Bit-FLOPs report + plot -> latency summary.

Everything goes under ``--out`` (default ``./demo-out``): ``checkpoint.pt``,
``model.qgnn``, ``model.onnx``, ``report.json``, ``report.md``, ``report.png``,
``bench.json`` and ``summary.json`` (the figures of every stage). A stage whose
implementation is missing in this build is recorded as ``"unavailable: <reason>"``;
one that breaks is recorded as failed with its error (exit status 1); no figure is
ever filled in for a stage that did not run.

The latency stage times one episode (T=1, what a deployed classifier sees) and the
10-task batch (T=10) on our ``cpu`` engine against torch FP32 (channels_last), torch bf16
autocast (where the CPU has bf16) and onnxruntime on the FP32 export.

``--quick`` cuts the evaluation episodes and the benchmark repeats (CI smoke test).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict

DEFAULT_PRESET, DEFAULT_BITS = "tiny", 4
#: the latency line: our engine against what a user would run instead, at T=1 and T=10
LATENCY_ENGINE = "cpu"
LATENCY_BASELINES = ("torch_fp32", "torch_bf16", "onnxruntime_fp32")
LATENCY_TASKS = (1, 10)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output folder (default ./demo-out)")
    p.add_argument("--quick", action="store_true",
                   help="few episodes and benchmark runs (a smoke test, figures are rough)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"model preset (default {DEFAULT_PRESET})")
    p.add_argument("--bits", type=int, default=DEFAULT_BITS, help=f"bit-width (default {DEFAULT_BITS})")
    p.add_argument("--episodes", type=int, help="evaluation episodes (default 50, --quick 10)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--no-bench", action="store_true", help="skip the latency stage")
    p.add_argument("--json", action="store_true", help="print summary.json on stdout")


class Stages:
    """Runs stages, records {status, seconds, figures} per stage, never fakes one."""

    def __init__(self, log: Callable[[str], None]):
        self.summary: Dict[str, Any] = {}
        self.log = log

    def unavailable(self, name: str, reason: str) -> None:
        self.summary[name] = {"status": f"unavailable: {reason}"}
        self.log(f"[{name}] unavailable: {reason}")

    def run(self, name: str, fn: Callable[[], Dict[str, Any]], needs=()) -> bool:
        for dep in needs:
            if self.summary.get(dep, {}).get("status") != "ok":
                self.unavailable(name, f"needs the '{dep}' stage, which did not run")
                return False
        self.log(f"[{name}] ...")
        t0 = time.perf_counter()
        try:
            figures = fn()
        except ImportError as e:
            self.unavailable(name, f"not in this build ({e})")
            return False
        except Exception as e:  # noqa: BLE001 - recorded, the other stages still run
            from ..errors import BackendUnavailableError
            if isinstance(e, BackendUnavailableError):
                self.unavailable(name, str(e))
                return False
            self.summary[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc(limit=6)}
            self.log(f"[{name}] FAILED: {type(e).__name__}: {e}")
            return False
        self.summary[name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2), **figures}
        self.log(f"[{name}] ok ({self.summary[name]['seconds']:.1f} s)")
        return True


def run(args) -> int:
    import torch

    from ..config import check_bits
    check_bits(args.bits, "--bits")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    quick = bool(args.quick)
    episodes = args.episodes or (10 if quick else 50)
    log = lambda s: print(f"demo: {s}", file=sys.stderr)  # noqa: E731
    st = Stages(log)
    ctx: Dict[str, Any] = {}
    t_start = time.perf_counter()
    path = lambda name: os.path.join(out, name)  # noqa: E731

    # 1. checkpoint ---------------------------------------------------------------
    def checkpoint():
        from ..checkpoint import save_checkpoint
        from ..sources import Source, embedded_checkpoint, load_float_model
        src = Source("preset", preset=args.preset, bits=args.bits)
        emb = embedded_checkpoint(args.preset, args.bits)
        model = load_float_model(src, quiet=True)
        ctx["model"] = model
        save_checkpoint(model, path("checkpoint.pt"), meta={"demo": True})
        return {"preset": args.preset, "bits": args.bits,
                "origin": emb if emb else "no shipped checkpoint: fresh model calibrated on synthetic "
                                          "episodes (seed 0), untrained",
                "trained": bool(emb), "file": path("checkpoint.pt"),
                "params": sum(p.numel() for n, p in model.named_parameters()
                              if not any(q in n for q in ("_quant.l", "_quant.r")))}
    st.run("checkpoint", checkpoint)

    # evaluation episodes shared by every engine (same tasks for all)
    def batches():
        from ..data import episode_batches
        return list(episode_batches(ctx["model"].config, episodes, seed=0, split="test"))

    # 2. fold ---------------------------------------------------------------------
    def fold_stage():
        from ..fold import (compare_engines, episode_logits_of, episode_parity_ok, fake_quant_counterpart, fold,
                            layerwise_parity_batches, parity_verdict)
        from ..fold import accuracy as acc_of
        from ..evaluate import model_predict
        im = fold(ctx["model"], backend="reference")
        ctx["int_model"] = im
        ctx["batches"] = batches()
        fq_logits, labels = episode_logits_of(model_predict(ctx["model"]), ctx["batches"])
        ref_logits, _ = episode_logits_of(lambda x, y: im(x, y).logits, ctx["batches"])
        ctx.update(fq_logits=fq_logits, ref_logits=ref_logits, labels=labels)
        cmp = compare_engines(fq_logits, ref_logits)
        episode_ok = episode_parity_ok(cmp["agreement"], cmp["max_logit_diff"])
        # a missed episode bar: is every layer right (an fp32 tie cascading) or is one wrong?
        layerwise_ok = episode_ok or layerwise_parity_batches(fake_quant_counterpart(ctx["model"]), im,
                                                              ctx["batches"])["passed"]
        figures = {"episodes": episodes, "agreement": cmp["agreement"],
                   "max_logit_diff": cmp["max_logit_diff"], "verdict": parity_verdict(episode_ok, layerwise_ok),
                   "accuracy_fake_quant": acc_of(fq_logits, labels),
                   "accuracy_reference": acc_of(ref_logits, labels)}
        try:
            from ..artifact import save_int_model
            figures["artifact_bytes"] = save_int_model(im, path("model.qgnn"))
            figures["artifact"] = path("model.qgnn")
        except ImportError as e:
            figures["artifact"] = f"unavailable: {e}"
        return figures
    st.run("fold", fold_stage, needs=("checkpoint",))

    # 3. run on every available backend ---------------------------------------------
    def run_stage():
        from ..benchmarks.episode import backend_status
        from ..fold import accuracy as acc_of
        from ..fold import compare_engines, episode_logits_of
        im = ctx["int_model"]
        ok, why = backend_status(["reference", "cpu", "triton"])
        res = {"reference": {"accuracy": acc_of(ctx["ref_logits"], ctx["labels"]),
                             "agreement_with_reference": 1.0, "max_logit_diff_vs_reference": 0.0}}
        for name in ok:
            if name == "reference":
                continue
            if name == "triton" and not torch.cuda.is_available():
                why[name] = "needs a CUDA GPU for its kernels (none here)"
                continue
            prev = im.backend
            im.backend = name
            try:
                logits, _ = episode_logits_of(lambda x, y: im(x, y).logits, ctx["batches"])
            finally:
                im.backend = prev
            cmp = compare_engines(ctx["ref_logits"], logits)
            res[name] = {"accuracy": acc_of(logits, ctx["labels"]),
                         "agreement_with_reference": cmp["agreement"],
                         "max_logit_diff_vs_reference": cmp["max_logit_diff"]}
        return {"episodes": episodes, "backends": res,
                "unavailable": {k: f"unavailable: {v}" for k, v in why.items()}}
    st.run("run", run_stage, needs=("fold",))

    # 4. ONNX export + onnxruntime check -------------------------------------------
    def export_stage():
        from ..backends.onnx import OnnxSession, export_module
        from ..fold import accuracy as acc_of
        from ..fold import compare_engines
        export = export_module()
        info = export.export_onnx(ctx["int_model"], path("model.onnx"))
        sess = OnnxSession(path("model.onnx"), threads=threads)
        logits = torch.cat([sess(x, y) for x, y, _ in ctx["batches"]])
        cmp = compare_engines(ctx["ref_logits"], logits)
        return {"file": path("model.onnx"), "onnx_bytes": os.path.getsize(path("model.onnx")),
                "export": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))},
                "accuracy": acc_of(logits, ctx["labels"]),
                "agreement_with_reference": cmp["agreement"],
                "max_logit_diff_vs_reference": cmp["max_logit_diff"]}
    st.run("export", export_stage, needs=("fold",))

    # 5. report + plot ---------------------------------------------------------------
    def report_stage():
        from ..plots import plot_report
        from ..report import render_markdown
        from .report import build_report
        d, paper = build_report(ctx["model"], "paper")
        with open(path("report.json"), "w") as f:
            json.dump(d, f, indent=1)
        with open(path("report.md"), "w") as f:
            f.write(render_markdown(d, paper))
        plot_report(d, path("report.png"), model=ctx["model"], title=f"demo: {d['model']}")
        t = d["total"]
        return {"files": [path("report.json"), path("report.md"), path("report.png")],
                "workload": d["workload"]["description"],
                **{k: t[k] for k in ("params", "macs", "flops", "bit_flops", "fp32_bit_flops",
                                     "bit_flops_reduction", "packed_bytes", "fp32_bytes",
                                     "compression", "elementwise_flops", "ops_binary_net",
                                     "uncounted_ops")}}
    st.run("report", report_stage, needs=("checkpoint",))

    # 6. latency --------------------------------------------------------------------
    def bench_stage():
        figures = latency_figures(ctx["model"], ctx["int_model"], threads, quick,
                                  progress=not args.json or sys.stderr.isatty(), log=log)
        with open(path("bench.json"), "w") as f:
            json.dump(figures.pop("full"), f, indent=1)
        return {"file": path("bench.json"), **figures}
    if args.no_bench:
        st.unavailable("bench", "skipped (--no-bench)")
    else:
        st.run("bench", bench_stage, needs=("fold",))

    summary = {"preset": args.preset, "bits": args.bits, "quick": quick, "out": out,
               "threads": threads, "seconds": round(time.perf_counter() - t_start, 1),
               "stages": st.summary}
    with open(path("summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    text = human_summary(summary)
    if args.json:
        print(json.dumps(summary, default=str))
        print(text, file=sys.stderr)
    else:
        print(text)
    failed = [k for k, v in st.summary.items() if v.get("status") == "failed"]
    return 1 if failed else 0


def latency_figures(model, int_model, threads: int, quick: bool, progress: bool = False,
                    log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """p50 / p90 of :data:`LATENCY_ENGINE` and :data:`LATENCY_BASELINES` at each of
    :data:`LATENCY_TASKS` tasks, interleaved per workload. Returns the summary figures
    (``results``: one slim row per workload and variant, ``unavailable``) and under
    ``full`` the whole benchmark object (written to ``bench.json``)."""
    from ..benchmarks.episode import (bench_threads, build_engines, device_info, time_engines,
                                      versions)
    repeats, warmup = (3, 1) if quick else (20, 3)
    with bench_threads(threads):
        engines, unavailable, exports = build_engines(model, int_model, (LATENCY_ENGINE,),
                                                      LATENCY_BASELINES, threads, log)
        results = []
        for tasks in LATENCY_TASKS:
            for row in time_engines(engines, model.config, tasks, int_model.generations, repeats,
                                    warmup, progress):
                results.append({"tasks": tasks, **row})
    keys = ("tasks", "workload", "backend", "p50_ms", "p90_ms", "speedup_vs_torch_fp32",
            "speedup_vs_torch_bf16", "speedup_vs_onnxruntime_fp32", "layout", "isa")
    full = {"device": device_info(), "threads": threads, "repeats": repeats, "warmup": warmup,
            "versions": versions(), "results": results, "unavailable": unavailable, "exports": exports}
    return {"threads": threads, "repeats": repeats, "warmup": warmup, "device": full["device"],
            "results": [{k: r[k] for k in keys if k in r} for r in results],
            "unavailable": {k: f"unavailable: {v}" for k, v in unavailable.items()},
            **({"note": f"--quick: {repeats} timed runs, rough figures"} if quick else {}),
            "full": full}


#: how the latency line names the baselines
_LATENCY_LABELS = {"torch_fp32": "torch FP32 channels_last", "torch_bf16": "torch bf16",
                   "onnxruntime_fp32": "onnxruntime FP32"}


def latency_lines(b: Dict[str, Any]) -> list:
    """The latency stage in a few lines: per workload, our engine's p50 and how it compares
    with each baseline (``Nx`` = baseline p50 / ours: above 1 we are faster)."""
    lines = [f"  latency:    p50 on {b['threads']} threads, {LATENCY_ENGINE} engine vs each baseline "
             "(x = baseline time / ours)"]
    for tasks in LATENCY_TASKS:
        rows = {r["backend"]: r for r in b["results"] if r["tasks"] == tasks}
        ours = rows.get(LATENCY_ENGINE)
        head = f"T={tasks}: {LATENCY_ENGINE} " + (f"{ours['p50_ms']:.3g} ms" if ours else "not run")
        parts = []
        for base in LATENCY_BASELINES:
            if base not in rows:
                parts.append(f"{_LATENCY_LABELS[base]} n/a")
            elif ours:
                parts.append(f"{_LATENCY_LABELS[base]} {rows[base]['p50_ms']:.3g} ms "
                             f"({ours['speedup_vs_' + base]:.2f}x)")
            else:
                parts.append(f"{_LATENCY_LABELS[base]} {rows[base]['p50_ms']:.3g} ms")
        lines.append(f"              {head}; " + "; ".join(parts))
    return lines


def human_summary(s: Dict[str, Any]) -> str:
    """Ten lines a person reads in ten seconds."""
    g = s["stages"]
    ok = lambda k: g.get(k, {}).get("status") == "ok"  # noqa: E731
    status = lambda k: g.get(k, {}).get("status", "not run")  # noqa: E731
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"qgnn-deploy demo: {s['preset']} at {s['bits']} bits, {s['seconds']:.0f} s, files in {s['out']}"]
    c = g.get("checkpoint", {})
    lines.append("  checkpoint: " + (f"{c['params']:,} params; "
                 + ("trained (shipped)" if c["trained"] else "UNTRAINED (calibrated only: accuracy is chance)")
                 if ok("checkpoint") else status("checkpoint")))
    f = g.get("fold", {})
    lines.append("  fold:       " + (f"integer model vs fake-quant: agreement {pct(f['agreement'])}, "
                 f"max |logit diff| {f['max_logit_diff']:.2e} on {f['episodes']} episodes ({f['verdict']})"
                 + (f"; artifact {f['artifact_bytes']:,} B" if "artifact_bytes" in f else "")
                 if ok("fold") else status("fold")))
    r = g.get("run", {})
    if ok("run"):
        parts = [f"{b} acc {pct(v['accuracy'])} (agree {pct(v['agreement_with_reference'])}, "
                 f"diff {v['max_logit_diff_vs_reference']:.1e})" for b, v in r["backends"].items()]
        lines.append("  run:        " + "; ".join(parts))
        for b, why in r.get("unavailable", {}).items():
            lines.append(f"              {b}: {why[:110]}")
    else:
        lines.append("  run:        " + status("run"))
    e = g.get("export", {})
    lines.append("  onnx:       " + (f"{e['onnx_bytes']:,} B, onnxruntime agrees with reference on "
                 f"{pct(e['agreement_with_reference'])} (max diff {e['max_logit_diff_vs_reference']:.1e})"
                 if ok("export") else status("export")[:160]))
    p = g.get("report", {})
    lines.append("  report:     " + (f"Bit-FLOPs {p['fp32_bit_flops'] / 1e9:.3g} G FP32 -> {p['bit_flops'] / 1e9:.3g} G "
                 f"({p['bit_flops_reduction']:.1f}x fewer), weights {p['fp32_bytes'] / 1e6:.3g} MB -> "
                 f"{p['packed_bytes'] / 1e6:.3g} MB ({p['compression']:.1f}x smaller)"
                 if ok("report") else status("report")))
    if ok("bench"):
        lines += latency_lines(g["bench"])
    else:
        lines.append("  latency:    " + status("bench"))
    lines.append(f"  details:    {os.path.join(s['out'], 'summary.json')}")
    return "\n".join(lines)

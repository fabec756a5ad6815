"""The training loop: FP pre-training and QAT (PQ + AQD + SQD) on few-shot episodes, for
both model families (DPGN presets ``tiny`` / ``resnet12-cifarfs`` and EGNN presets
``egnn-tiny`` / ``egnn-miniimagenet``; each with its own loss, :mod:`.losses`).

One iteration = one batch of ``tasks`` training episodes; episode batch ``i`` is a pure
function of ``(seed, i)`` and the torch RNG (dropout, SQD draws) is checkpointed, so a
run interrupted and resumed ends with the same weights as one run straight through.

Checkpoints are :func:`qgnn_deploy.checkpoint.save_checkpoint` files with two extra
entries: ``"distill"`` (AQD's attention MLPs; never part of the model) and
``"training"`` (iteration, optimizer, scheduler, RNG, validation history, options),
left out with ``slim``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..checkpoint import (_load_state, is_official_dpgn, load_official_dpgn, read_checkpoint,
                          save_checkpoint)
from ..config import ModelConfig, config_family, config_from_dict, preset_config, preset_family
from ..errors import CheckpointError, ConfigError, QGNNError
from ..models import QAggregation, QGNNModel, build_model, quantizable_layers
from ..models.egnn import is_official_egnn, load_official_egnn
from .distill import Distillation
from .losses import model_loss, node_bits_penalty
from .recipe import build_optimizer, default_recipe


@dataclass
class TrainOptions:
    """Everything a run depends on (the ``train`` command's arguments)."""

    out: str
    preset: str = "tiny"
    bits: int = 32
    bits_config: Optional[str] = None  # per-layer bits file (qgnn_deploy.bits_config), over ``bits``
    node_bits: Tuple[int, ...] = ()    # per-node aggregation widths (ModelConfig.node_bits)
    node_bits_target: Optional[float] = None  # mean width the penalty aims under (default: 2nd widest)
    node_bits_weight: float = 0.1      # weight of that penalty in the loss
    dataset: str = "synthetic"
    data_dir: Optional[str] = None
    way: int = 5
    shot: int = 1
    image_size: Optional[int] = None
    iterations: int = 1000
    tasks: int = 10
    aqd: bool = True
    sqd: bool = True
    lambda1: float = 0.7
    lambda2: float = 1.0
    sqd_p: float = 0.5
    init: Optional[str] = None
    resume: bool = False
    seed: int = 0
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    lr_step: Optional[int] = None
    val_every: int = 0
    val_episodes: int = 100
    save_every: int = 0
    slim: bool = False
    progress: bool = True
    command: List[str] = field(default_factory=list)
    transductive: Optional[bool] = None  # EGNN only: train / validate on one graph per episode

    def model_config(self):
        """The run's :class:`ModelConfig` (DPGN presets) or ``EGNNConfig`` (EGNN presets)."""
        family = preset_family(self.preset)
        extra: Dict[str, Any] = {"way": self.way, "shot": self.shot}
        if self.image_size:
            extra["image_size"] = self.image_size
        elif self.dataset in ("mini-imagenet", "cub"):
            extra["image_size"] = 84  # their standard size (DPGN, EGNN)
        if family == "egnn":
            if self.node_bits:
                raise ConfigError(f"--node-bits (per-node aggregation widths) is DPGN-only; the EGNN preset "
                                  f"{self.preset!r} has one node-feature width per aggregation "
                                  "(set it per layer with --bits-config)")
            if self.transductive is not None:
                extra["transductive"] = bool(self.transductive)
        elif self.transductive:
            raise ConfigError(f"--transductive is an EGNN option (--preset egnn-tiny / egnn-miniimagenet); "
                              f"the DPGN preset {self.preset!r} always runs one graph per episode")
        config = preset_config(self.preset, self.bits, **extra)
        if self.bits_config:
            from ..bits_config import load_bits_config, resolve_bits
            config = resolve_bits(load_bits_config(self.bits_config), config)
        if self.node_bits:
            if not config.quantized:
                raise ConfigError("--node-bits needs a quantized model (--bits or --bits-config below 32)")
            config = config.replace(node_bits=self.node_bits)
        return config

    def node_target(self, config: ModelConfig) -> float:
        """The mean per-node width the penalty aims under."""
        nb = config.node_bits
        target = nb[-2] if self.node_bits_target is None else float(self.node_bits_target)
        if not nb[0] <= target <= nb[-1]:
            raise ConfigError(f"--node-bits-target must lie in [{nb[0]}, {nb[-1]}], got {target}")
        return target


class TrainingDiverged(QGNNError):
    """The loss became NaN / Inf."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


DPGN_ARCH_KEYS = ("widths", "emb_dim", "generations", "image_size", "way", "shot")
#: EGNN weights do not depend on way / shot (the graph is class-agnostic)
EGNN_ARCH_KEYS = ("widths", "emb_dim", "node_features", "edge_features", "num_layers", "image_size")


def init_from(path: str, config):
    """A model for ``config`` initialised from a checkpoint of ours or an official DPGN /
    EGNN one, of the same model family as ``config``.

    Quantizer ranges absent from the source (an FP checkpoint) stay uninitialised and
    are set from the first training batch (mean +- 3 std), the QAT starting point."""
    obj = read_checkpoint(path)
    family = config_family(config)
    for official, loader, fam in ((is_official_egnn, load_official_egnn, "egnn"),
                                  (is_official_dpgn, load_official_dpgn, "dpgn")):
        if official(obj):
            if fam != family:
                raise CheckpointError(f"--init {path!r} is an official {fam.upper()} checkpoint; this run "
                                      f"trains {family.upper()} (choose a {fam.upper()} --preset)")
            return loader(obj, config, source=path)
    if not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"--init {path!r} has no state_dict")
    src_cfg = obj.get("config", {})
    if not isinstance(src_cfg, dict):
        raise CheckpointError(f"--init {path!r} has no valid config")
    src_family = str(src_cfg.get("family", "dpgn"))
    if src_family != family:
        raise CheckpointError(f"--init {path!r} holds a {src_family.upper()} model; this run trains "
                              f"{family.upper()} (choose a {src_family.upper()} --preset, or a "
                              f"{family.upper()} checkpoint)")
    for k in (EGNN_ARCH_KEYS if family == "egnn" else DPGN_ARCH_KEYS):
        ours = list(config.widths) if k == "widths" else getattr(config, k)
        if k in src_cfg and src_cfg[k] != ours:
            raise CheckpointError(f"--init {path!r} has {k}={src_cfg[k]}, the run needs {ours}")
    model = build_model(config)
    state = obj["state_dict"]
    if config.quantized and src_cfg.get("bits", 32) >= 32:
        _load_state(model, state, path, strict=True, allow_missing_quant=True)
    else:
        _load_state(model, state, path, strict=True, allow_missing_quant=False)
        if getattr(config, "node_bits", ()) and not src_cfg.get("node_bits"):
            _keep_node_steps(model, ModelConfig.from_dict(src_cfg))
    return model


def _keep_node_steps(model: QGNNModel, src: ModelConfig) -> None:
    """Per-node widths from a uniform source: widen each node range to the shared grid at
    the source's step, so nodes that fit the source's width keep it and the rest (clipped
    there) take more bits."""
    for name, m in quantizable_layers(model).items():
        if isinstance(m, QAggregation) and m.node_bits and bool(m.node_quant.initialized):
            a = src.bits_for(name).a
            if a < m.bits.a:
                q = m.node_quant
                with torch.no_grad():
                    q.r.copy_(q.l + (q.r - q.l) * ((2 ** m.bits.a - 1) / (2 ** a - 1)))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _install_sigterm():
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _restore_sigterm(old) -> None:
    import signal
    if old is not None:
        signal.signal(signal.SIGTERM, old)


def _batch(config, ds, opts: TrainOptions, iteration: int):
    from ..data import episode_batches
    return next(episode_batches(config, opts.tasks, opts.seed, "train", ds,
                                tasks_per_batch=opts.tasks, start=iteration * opts.tasks,
                                augment=True))


def validate(model, config, opts: TrainOptions, ds) -> Dict[str, float]:
    """Accuracy on ``val_episodes`` validation episodes (fixed seed), model left in train mode."""
    from ..evaluate import evaluate, model_predict
    rng = torch.get_rng_state()  # validation must not shift the training RNG stream
    model.eval()
    try:
        r = evaluate(model_predict(model), config, episodes=opts.val_episodes, seed=1000 + opts.seed,
                     split="val", dataset=ds, progress=False)
    finally:
        model.train()
        torch.set_rng_state(rng)
    return {"accuracy": r["accuracy"], "ci95": r["ci95"]}


def train(opts: TrainOptions) -> Dict[str, Any]:
    """Run (or resume) training; writes ``opts.out``; returns a summary dict.

    Raises KeyboardInterrupt after saving a resumable checkpoint when interrupted."""
    from tqdm import tqdm

    from ..data import get_dataset
    if opts.iterations < 1 or opts.tasks < 1:
        raise ConfigError("--iterations and --tasks must be >= 1")
    state = None
    if opts.resume:
        if not os.path.isfile(opts.out):
            raise CheckpointError(f"--resume: {opts.out!r} does not exist (it is the --out of the run "
                                  "to continue)")
        state = read_checkpoint(opts.out)
        if not isinstance(state.get("training"), dict):
            raise CheckpointError(f"--resume: {opts.out!r} has no training state (written with --slim?)")
        try:
            config = config_from_dict(state["config"])
        except ConfigError as e:
            raise CheckpointError(f"--resume: {opts.out!r} has an invalid model config: {e}") from None
        if opts.preset and preset_family(opts.preset) != config_family(config):
            raise CheckpointError(f"--resume: {opts.out!r} holds a {config_family(config).upper()} run, "
                                  f"but --preset {opts.preset} is {preset_family(opts.preset).upper()}")
        model = build_model(config)
        _load_state(model, state["state_dict"], opts.out, strict=True, allow_missing_quant=False)
    else:
        config = opts.model_config()
        # Seed first: model init and AQD's attention MLPs must not depend on the caller's RNG.
        torch.manual_seed(opts.seed)
        model = init_from(opts.init, config) if opts.init else build_model(config)
    ds = get_dataset(opts.dataset, opts.data_dir, config.image_size)
    quantized = config.quantized
    distill = Distillation(model, aqd=opts.aqd and quantized, sqd=opts.sqd and quantized,
                           lambda1=opts.lambda1, lambda2=opts.lambda2, p=opts.sqd_p)
    family = config_family(config)
    recipe = default_recipe(config.bits, opts.iterations, opts.optimizer, opts.lr, opts.lr_step,
                            family=family)
    model.train()
    if quantized and not opts.resume:
        # Initialise every PQ range (mean +- 3 std) from the first training batch before the
        # optimizer is built, so the ranges start where the paper puts them.
        images, support, _ = _batch(config, ds, opts, 0)
        with torch.no_grad():
            model(images, support)
    opt, sched = build_optimizer(list(model.parameters()) + list(distill.parameters()), recipe)
    start, history = 0, []
    if state is not None:
        tr = state["training"]
        if isinstance(state.get("distill"), dict):
            distill.load_state_dict(state["distill"])
        opt.load_state_dict(tr["optimizer"])
        sched.load_state_dict(tr["scheduler"])
        torch.set_rng_state(tr["rng"])
        start, history = int(tr["iteration"]), list(tr.get("history", []))
        _log(f"resuming {opts.out} at iteration {start}")
    else:
        torch.manual_seed(opts.seed)
    distill.attach(model)
    node_target = opts.node_target(config) if getattr(config, "node_bits", ()) else None
    val_every = opts.val_every or max(1, opts.iterations // 5)

    def meta(it: int) -> Dict[str, Any]:
        extra_meta = ({"family": family, "preset": opts.preset, "transductive": bool(config.transductive)}
                      if family == "egnn" else {})
        return {"trained_by": "qgnn-deploy train", **extra_meta, "dataset": opts.dataset, "iteration": it,
                "iterations": opts.iterations, "tasks_per_batch": opts.tasks, "bits": config.bits,
                "aqd": distill.aqd is not None, "sqd": distill.sqd is not None,
                "recipe": recipe.to_dict(), "init": opts.init, "seed": opts.seed,
                "val": history[-1] if history else None, "command": list(opts.command)}

    def save(it: int, slim: bool = False, rng: Optional[torch.Tensor] = None) -> None:
        extra: Dict[str, Any] = {}
        if distill.aqd is not None and not slim:
            extra["distill"] = distill.state_dict()
        if not slim:
            extra["training"] = {"iteration": it, "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "rng": torch.get_rng_state() if rng is None else rng,
                                 "history": history,
                                 "options": {k: v for k, v in dataclasses.asdict(opts).items()
                                             if isinstance(v, (int, float, str, bool, type(None)))}}
        save_checkpoint(model, opts.out, meta=meta(it), **extra)

    # SIGTERM (a job scheduler, `kill`) stops like Ctrl-C: save a resumable checkpoint first.
    old_term = _install_sigterm()
    desc = f"train {'egnn ' if family == 'egnn' else ''}w{config.bits}"
    bar = tqdm(total=opts.iterations, initial=start, desc=desc, unit="it",
               file=sys.stderr, disable=not opts.progress, dynamic_ncols=True)
    done = start
    rng_resume = torch.get_rng_state()  # the RNG state at the start of iteration `done`
    t0 = time.perf_counter()
    ema = None
    try:
        for it in range(start, opts.iterations):
            rng_resume = torch.get_rng_state()
            images, support, query = _batch(config, ds, opts, it)
            out = model(images, support)
            parts = model_loss(model, out, support, query, config.way)
            d = distill.pop_losses()
            loss = parts["loss"] + d["total"]
            pen = node_bits_penalty(model, node_target) if node_target is not None else None
            if pen is not None:
                loss = loss + opts.node_bits_weight * pen
            if not torch.isfinite(loss.detach()):
                raise TrainingDiverged(
                    f"loss became {float(loss.detach())} at iteration {it} ({recipe.optimizer} lr {recipe.lr}); "
                    "lower --lr or use --optimizer sgd")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done, rng_resume = it + 1, torch.get_rng_state()
            loss_value = float(loss.detach())
            acc = float(parts["accuracy"])
            ema = acc if ema is None else 0.95 * ema + 0.05 * acc
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", aqd=f"{float(d['aqd'].detach()):.3f}",
                            sqd=f"{float(d['sqd'].detach()):.3f}", acc=f"{ema:.3f}",
                            lr=f"{sched.get_last_lr()[0]:.1e}")
            if not opts.progress and done % max(1, opts.iterations // 20) == 0:
                _log(f"iteration {done}/{opts.iterations}: loss {loss_value:.3f} (aqd {float(d['aqd'].detach()):.3f}, "
                     f"sqd {float(d['sqd'].detach()):.3f}), train acc ema {ema:.3f}")
            if done % val_every == 0 or done == opts.iterations:
                v = validate(model, config, opts, ds)
                history.append({"iteration": done, "val_accuracy": v["accuracy"], "val_ci95": v["ci95"],
                                "train_accuracy_ema": ema, "loss": loss_value})
                bar.write(f"iteration {done}: val accuracy {v['accuracy']:.4f} +- {v['ci95']:.4f} "
                          f"(train ema {ema:.3f}, loss {loss_value:.3f})", file=sys.stderr)
            if opts.save_every and done % opts.save_every == 0 and done < opts.iterations:
                save(done)
    except KeyboardInterrupt:
        bar.close()
        distill.detach()
        save(done, rng=rng_resume)
        _log(f"interrupted at iteration {done}: saved a resumable checkpoint to {opts.out} "
             "(continue with the same command plus --resume)")
        raise
    finally:
        _restore_sigterm(old_term)
    bar.close()
    distill.detach()
    save(done, slim=opts.slim)
    return {"out": opts.out, "iterations": done, "bits": config.bits, "seconds": time.perf_counter() - t0,
            "val": history[-1] if history else None, "history": history}

#!/usr/bin/env python3
"""Regenerate tests/fixtures/egnn_official/ with the OFFICIAL EGNN code.

    python scripts/make_egnn_fixture.py OFFICIAL_DIR OUT_DIR

OFFICIAL_DIR is a work tree of https://github.com/khy0809/fewshot-egnn (e.g.
``git --git-dir=MIRROR archive HEAD | tar -x -C /tmp/egnn_official``). Its modules
(``model.py``, ``train.py``, ``torchtools``) are imported from there unchanged; the
two imports this environment lacks and the fixture never uses (``tensorboardX`` for
logging, ``data`` for the miniImageNet pickles, which needs torchvision) are replaced by
empty stand-ins in ``sys.modules`` before the import.

What it does:

1. builds the official ``EmbeddingImagenet(128)`` and ``GraphNetwork(128, 96, 96, 3,
   dropout=0.1)`` (the miniImageNet 5-way 1-shot settings of ``train.py``), randomly
   initialised by their own code under a fixed seed;
2. rounds every conv / linear weight to int8 times a per-tensor float32 scale, in the
   official modules themselves, so the fixture can store them in 1 byte each (float16
   would not fit the 3 MB budget: the encoder alone has 1.28 M weights) and both sides
   compute with identical values;
3. gives every BatchNorm non-trivial state: running statistics measured on the episode
   (one train-mode pass with momentum 1), then randomly perturbed, and random affine
   parameters;
4. runs the official ``ModelTrainer.eval`` on one 5-way 1-shot episode batch of two
   tasks, non-transductive and transductive, through a stand-in data loader, and records
   what the official code computes: the encoder embeddings, the graph's input edges,
   every layer's edges, the assembled edges it scores (``full_logit``), the query scores
   and predictions, and the accuracy ``eval`` returns.

Everything is saved with ``torch.save`` as plain tensors / dicts / lists / numbers, so
``torch.load(..., weights_only=True)`` reads it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import types

import torch

TASKS = 2
WAY, SHOT = 5, 1
IMAGE = 84
EMB, NODE_F, EDGE_F, LAYERS, DROPOUT = 128, 96, 96, 3, 0.1
SEED = 20240611


def import_official(official_dir: str):
    """The official modules, imported from ``official_dir`` unchanged."""
    official_dir = os.path.abspath(official_dir)
    if not os.path.isfile(os.path.join(official_dir, "model.py")):
        sys.exit(f"{official_dir!r} has no model.py: pass a work tree of khy0809/fewshot-egnn")
    os.environ.setdefault("MPLBACKEND", "Agg")  # model.py imports matplotlib.pyplot
    tbx = types.ModuleType("tensorboardX")
    tbx.SummaryWriter = object  # logging only; eval(log_flag=False) never writes
    sys.modules.setdefault("tensorboardX", tbx)
    data = types.ModuleType("data")  # the miniImageNet loaders (need torchvision)
    data.MiniImagenetLoader = data.TieredImagenetLoader = None
    sys.modules["data"] = data
    argv, sys.argv = sys.argv, sys.argv[:1]  # torchtools parses sys.argv at import
    sys.path.insert(0, official_dir)
    try:
        from torchtools import tt  # noqa: E402
        import model as official_model  # noqa: E402
        import train as official_train  # noqa: E402
    finally:
        sys.argv = argv
    return tt, official_model, official_train


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def round_weights_int8(module: torch.nn.Module) -> dict:
    """Round every conv / linear weight of ``module`` in place to ``int8 * scale``;
    returns ``{state-dict key: (int8 codes, float32 scale)}``."""
    packed = {}
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                w = m.weight
                scale = (w.abs().max() / 127.0).float()
                q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
                w.copy_(q.float() * scale)
                packed[f"{name}.weight"] = (q, scale)
    return packed


def randomise_batchnorm(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Perturb measured running statistics and set random affine parameters."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                c = m.num_features
                std = m.running_var.clamp_min(1e-4).sqrt()
                m.running_mean.add_(0.1 * std * torch.randn(c, generator=gen))
                m.running_var.mul_(torch.exp(0.2 * torch.randn(c, generator=gen)))
                m.weight.copy_(1.0 + 0.1 * torch.randn(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.num_batches_tracked.fill_(1000)
                m.momentum = 0.1


def make_episode(gen: torch.Generator):
    """Images float16 [T, N, 3, 84, 84] (supports class-major, then one query per class in
    a random order: our layout), support labels [T, S], query labels [T, Q]."""
    s = WAY * SHOT
    support = torch.randn(TASKS, s, 3, IMAGE, IMAGE, generator=gen)
    order = torch.stack([torch.randperm(WAY, generator=gen) for _ in range(TASKS)])
    # a query resembles its class's support image, so the predictions mean something
    query = torch.stack([support[t, order[t] * SHOT] for t in range(TASKS)])
    query = 0.6 * query + 0.8 * torch.randn(query.shape, generator=gen)
    images = torch.cat([support, query], 1).half()
    support_labels = torch.arange(WAY).repeat_interleave(SHOT).repeat(TASKS, 1)
    return images, support_labels, order.long()


class EpisodeLoader:
    """Stands in for the official MiniImagenetLoader: always the fixture's episode."""

    def __init__(self, images, support_labels, query_labels):
        s = WAY * SHOT
        self.batch = [images[:, :s].float(), support_labels.float(), images[:, s:].float(),
                      query_labels.float()]

    def get_task_batch(self, num_tasks, num_ways, num_shots, num_queries=1, seed=None):
        assert (num_tasks, num_ways, num_shots, num_queries) == (TASKS, WAY, SHOT, 1)
        return [x.clone() for x in self.batch]


def calibrate_batchnorm(trainer, images, support_labels, query_labels) -> None:
    """Running statistics from one train-mode pass (momentum 1) over the episode."""
    enc, gnn = trainer.enc_module, trainer.gnn_module
    bns = [m for m in list(enc.modules()) + list(gnn.modules())
           if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    for m in bns:
        m.momentum = 1.0
    s = WAY * SHOT
    with torch.no_grad():
        enc.train()
        gnn.train()
        feats = enc(images.float().flatten(0, 1)).view(TASKS, images.shape[1], -1)
        edge = trainer.label2edge(torch.cat([support_labels, query_labels], 1).float())
        edge[:, :, s:, :] = 0.5
        edge[:, :, :, s:] = 0.5
        gnn(node_feat=feats, edge_feat=edge)


def run_official_eval(tt, trainer, transductive: bool) -> dict:
    """``trainer.eval`` once, recording what the official code computes."""
    tt.arg.test_transductive = transductive
    rec = {"emb": [], "gnn_in": [], "gnn_out": [], "full_logit": [], "bmm": []}
    h1 = trainer.enc_module.register_forward_hook(lambda m, i, o: rec["emb"].append(o.detach().clone()))

    def gnn_hook(m, args, kwargs, out):
        rec["gnn_in"].append((kwargs["node_feat"].detach().clone(), kwargs["edge_feat"].detach().clone()))
        rec["gnn_out"].append([e.detach().clone() for e in out])
    h2 = trainer.gnn_module.register_forward_hook(gnn_hook, with_kwargs=True)

    def hit(logit, label):  # the official eval passes its assembled full_logit here
        rec["full_logit"].append(logit.detach().clone())
        return type(trainer).hit(trainer, logit, label)
    trainer.hit = hit
    real_bmm = torch.bmm

    def bmm(a, b):
        out = real_bmm(a, b)
        rec["bmm"].append(out.detach().clone())
        return out
    torch.bmm = bmm  # the last bmm of eval is query_node_pred
    try:
        with torch.no_grad():
            acc = trainer.eval(partition="test", log_flag=False)
    finally:
        torch.bmm = real_bmm
        del trainer.hit
        h1.remove()
        h2.remove()
    assert len(rec["gnn_out"]) == 1 and len(rec["full_logit"]) == 1
    scores = rec["bmm"][-1]
    assert scores.shape == (TASKS, WAY, WAY)
    top2 = scores.topk(2, -1).values
    node_in, edge_in = rec["gnn_in"][0]
    out = {
        "embeddings": torch.stack(rec["emb"], 1),            # [T, N, 128] (one call per node index)
        "gnn_input_nodes": node_in,
        "gnn_input_edges": edge_in,
        "layer_edges": rec["gnn_out"][0],                     # per layer, as the graph returns them
        "full_edges": rec["full_logit"][0],                   # [T, 2, N, N], the edges eval scores
        "scores": scores,                                     # [T, Q, way]
        "predictions": scores.max(-1)[1],
        "accuracy": float(acc),
        "min_margin": float((top2[..., 0] - top2[..., 1]).min()),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("official_dir")
    ap.add_argument("out_dir")
    args = ap.parse_args()
    tt, official_model, official_train = import_official(args.official_dir)
    torch.set_num_threads(1)
    tt.arg.device = torch.device("cpu")
    for k, v in dict(num_ways_test=WAY, num_shots_test=SHOT, num_unlabeled=0, test_batch_size=TASKS,
                     test_iteration=TASKS, lr=1e-3, weight_decay=1e-6, num_gpus=1, num_layers=LAYERS,
                     emb_size=EMB, dropout=DROPOUT).items():
        tt.arg[k] = v

    torch.manual_seed(SEED)
    enc = official_model.EmbeddingImagenet(emb_size=EMB)
    gnn = official_model.GraphNetwork(in_features=EMB, node_features=NODE_F, edge_features=EDGE_F,
                                      num_layers=LAYERS, dropout=DROPOUT)
    gen = torch.Generator().manual_seed(SEED + 1)
    images, support_labels, query_labels = make_episode(gen)
    trainer = official_train.ModelTrainer(enc_module=enc, gnn_module=gnn, data_loader={
        "test": EpisodeLoader(images, support_labels, query_labels)})

    packed = {"enc": round_weights_int8(enc), "gnn": round_weights_int8(gnn)}
    calibrate_batchnorm(trainer, images, support_labels, query_labels)
    randomise_batchnorm(enc, gen)
    randomise_batchnorm(gnn, gen)

    outputs = {"non_transductive": run_official_eval(tt, trainer, False),
               "transductive": run_official_eval(tt, trainer, True)}

    def pack(state, weights):
        out = {}
        for k, v in state.items():
            if k in weights:
                q, scale = weights[k]
                assert torch.equal(q.float() * scale, v)
                out[k] = {"int8": q, "scale": scale}
            else:
                out[k] = v.detach().clone()
        return out

    fixture = {
        "format": "egnn-official-fixture",
        "version": 1,
        "official": {"repository": "khy0809/fewshot-egnn",
                     "model.py sha256": sha256(os.path.join(args.official_dir, "model.py")),
                     "train.py sha256": sha256(os.path.join(args.official_dir, "train.py")),
                     "torch": str(torch.__version__)},
        "settings": {"way": WAY, "shot": SHOT, "tasks": TASKS, "image_size": IMAGE, "emb_size": EMB,
                     "num_node_features": NODE_F, "num_edge_features": EDGE_F,
                     "num_layers": LAYERS, "dropout": DROPOUT, "seed": SEED},
        # the official checkpoint's two state dicts; conv / linear weights as
        # {"int8": codes, "scale": float32 scalar} meaning codes.float() * scale
        "enc_module_state_dict": pack(enc.state_dict(), packed["enc"]),
        "gnn_module_state_dict": pack(gnn.state_dict(), packed["gnn"]),
        "episode": {"images": images, "support_labels": support_labels, "query_labels": query_labels},
        "outputs": outputs,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "fixture.pt")
    torch.save(fixture, path)
    torch.load(path, weights_only=True)  # readable the way the tests read it
    for mode, o in outputs.items():
        print(f"{mode}: accuracy {o['accuracy']:.2f}, predictions {o['predictions'].tolist()}, "
              f"min score margin {o['min_margin']:.4g}")
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

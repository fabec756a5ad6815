"""AQD and SQD self-distillation (paper sections 3.3, 3.4), attached by forward hooks.

Neither module is a submodule of the model: the model's state dict (what ``fold`` sees)
never contains them, and with the hooks removed the forward pass is untouched. Their
own parameters (AQD's channel-attention MLPs) are saved under a separate checkpoint
key (``"distill"``) by the trainer.

AQD, on every quantized conv of the backbone (eqs. 8-12)::

    A_f = W * A                   (FP weight on the layer's FP input; detached teacher)
    A_q = PQ(W) * PQ(A)           (the layer's output in the forward pass)
    H(A) = flatten(BN(A))         [B, C, HW], BN over the batch without affine/running stats
    alpha = softmax_C(MLP(H(A_f)))  MLP shared over the channels of a layer:
                                  avg-pool to <= 8x8 -> 32 -> 1 (pooling = a fixed linear layer)
    L = sum_i alpha_i || H_i(A_f)/||H_i(A_f)|| - H_i(A_q)/||H_i(A_q)|| ||^2
        (mean over the batch, then over the monitored layers)

Both are family-agnostic: for EGNN (paper section 4.7: AQD on the visual network, SQD on
the graph network) AQD monitors the encoder's quantized convs (``backbone.conv_{2,3,4}.0``;
the first conv is FP32) and SQD the graph's node-update convs
(``gnn.edge2node_net{l}.network.conv{0,1}``); in training mode the EGNN encoder runs once per
node position, so each AQD layer contributes one term per position.

SQD, on the quantized layers that produce graph nodes (DPGN: each generation's D2P
node-update convs and P2D linear), eqs. 13-18::

    SQ(X)   = PQ(X) with probability p, else X (one draw per tensor and step)
    P_rand  = SQ(W) (x) SQ(A)     (the layer's product with each operand's quantizer kept
                                  with probability p: our reading of "SQ(W A)", whose only
                                  quantizers are those of W and A); detached teacher
    P_full  = PQ(W) (x) PQ(A)     (the layer's output in the forward pass)
    G(P)    = P P^T / ||P P^T||_F over the nodes of a task, P as [T, N, D]
    L       = || G(P_rand) - G(P_full) ||_F  (mean over tasks, then over layers)
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import QConv2d, QLinear

EPS = 1e-8
ATTENTION_SIDE = 8


def aqd_layers(model: nn.Module) -> Dict[str, QConv2d]:
    """The backbone's quantized convs (the stem conv is FP32 and not monitored)."""
    return {n: m for n, m in model.named_modules()
            if n.startswith("backbone.") and isinstance(m, QConv2d) and m.quantized}


def sqd_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The quantized layers whose outputs are graph nodes. DPGN: the D2P node MLP convs and
    the P2D linears; EGNN (``model.family == "egnn"``): the node-update MLP convs of every
    layer (``gnn.edge2node_net{l}.network.conv{0,1}``, outputs [T, F, N, 1])."""
    egnn = getattr(model, "family", "dpgn") == "egnn"
    out = {}
    for n, m in model.named_modules():
        if not getattr(m, "quantized", False):
            continue
        if egnn:
            if n.startswith("gnn.edge2node_net") and ".network." in n and isinstance(m, QConv2d):
                out[n] = m
        elif ".point_node_transform." in n and isinstance(m, QConv2d):
            out[n] = m
        elif ".p2d_transform." in n and isinstance(m, QLinear):
            out[n] = m
    return out


def channel_normalized(h: torch.Tensor) -> torch.Tensor:
    """[B, C, HW] -> each (sample, channel) row scaled to unit L2 norm."""
    return h / h.norm(dim=-1, keepdim=True).clamp_min(EPS)


def attention_side(h: int, w: int) -> int:
    """Side of the average-pooled map AQD's attention MLP reads (at most 8 x 8)."""
    return min(h, w, ATTENTION_SIDE)


def aqd_layer_loss(a_f: torch.Tensor, a_q: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
    """Eq. 12 for one layer. a_f, a_q: [B, C, H, W]; mlp maps [..., k*k] -> [..., 1] with
    k = attention_side(H, W).

    The attention MLP's first stage is a fixed average pooling of each channel's map to at
    most 8 x 8 (a linear map, so still an MLP of H(A_f)); it keeps the cost of AQD at
    32 x 32 maps small. The distance term uses the full H (all HW positions)."""
    b, c = a_f.shape[:2]
    n_f = F.batch_norm(a_f, None, None, training=True)
    h_f = n_f.reshape(b, c, -1)
    h_q = F.batch_norm(a_q, None, None, training=True).reshape(b, c, -1)
    k = attention_side(a_f.shape[-2], a_f.shape[-1])
    pooled = F.adaptive_avg_pool2d(n_f, k).reshape(b, c, -1)
    alpha = torch.softmax(mlp(pooled).squeeze(-1), dim=1)            # [B, C]
    dist = (channel_normalized(h_f) - channel_normalized(h_q)).pow(2).sum(-1)  # [B, C]
    return (alpha * dist).sum(1).mean()


def gram(p: torch.Tensor) -> torch.Tensor:
    """[T, N, D] -> P P^T / ||P P^T||_F per task, [T, N, N]."""
    g = torch.bmm(p, p.transpose(1, 2))
    return g / g.flatten(1).norm(dim=1).clamp_min(EPS).view(-1, 1, 1)


def sqd_layer_loss(p_rand: torch.Tensor, p_full: torch.Tensor) -> torch.Tensor:
    """Eq. 18 for one layer: ``||G(P_rand) - G(P_full)||_F`` averaged over tasks. [T, N, D] each."""
    return (gram(p_rand) - gram(p_full)).flatten(1).norm(dim=1).mean()


def _as_nodes(y: torch.Tensor, tasks: int) -> torch.Tensor:
    """A node-producing layer's output as [T, N, D]: conv [T, D, N, 1] or linear [T, N, D]."""
    if y.dim() == 4:
        return y.squeeze(-1).transpose(1, 2)
    return y.reshape(tasks, -1, y.shape[-1])


class _Hooked(nn.Module):
    """Shared hook bookkeeping: attach to named layers, collect per-forward losses."""

    def __init__(self, names: List[str]):
        super().__init__()
        self.layer_names = list(names)
        self._handles: list = []
        self._losses: List[torch.Tensor] = []
        self.enabled = True

    def attach(self, model: nn.Module) -> "_Hooked":
        self.detach()
        mods = dict(model.named_modules())
        for name in self.layer_names:
            self._handles.append(mods[name].register_forward_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pop_loss(self) -> torch.Tensor:
        """Mean of the layer losses since the last call (0 when none ran); clears them."""
        losses, self._losses = self._losses, []
        if not losses:
            return torch.zeros(())
        return torch.stack(losses).mean()

    def _make_hook(self, name: str):  # pragma: no cover - overridden
        raise NotImplementedError


class AQD(_Hooked):
    """Attention quantization distillation on the backbone's quantized convs.

    Args: model (to find the layers and their output sizes), hidden width of the
    attention MLPs. Parameters: ``mlps[<name with dots as __>]``.
    """

    def __init__(self, model: nn.Module, hidden: int = 32, layers: Optional[List[str]] = None):
        names = list(layers) if layers is not None else list(aqd_layers(model))
        super().__init__(names)
        self.hidden = hidden
        self.mlps = nn.ModuleDict()
        self._sizes = self._spatial_sizes(model, names)
        for name in names:
            self.mlps[name.replace(".", "__")] = nn.Sequential(
                nn.Linear(self._sizes[name], hidden), nn.ReLU(), nn.Linear(hidden, 1))

    @staticmethod
    def _spatial_sizes(model: nn.Module, names: List[str]) -> Dict[str, int]:
        """HW of each layer's output, from one dummy backbone pass (no quantizer init)."""
        sizes: Dict[str, int] = {}
        mods = dict(model.named_modules())
        cfg = model.config
        handles = [mods[n].register_forward_hook(
            lambda m, i, o, n=n: sizes.__setitem__(n, attention_side(o.shape[-2], o.shape[-1]) ** 2))
            for n in names]
        # Run the FP path (fp_forward) so no quantizer range gets initialised from a dummy.
        for n in names:
            mods[n].forward = mods[n].fp_forward
        try:
            was = model.backbone.training
            model.backbone.eval()
            with torch.no_grad():
                model.backbone(torch.zeros(2, 3, cfg.image_size, cfg.image_size))
            model.backbone.train(was)
        finally:
            for n in names:
                del mods[n].forward  # back to the class's forward (no instance attribute left)
            for h in handles:
                h.remove()
        return sizes

    def _make_hook(self, name: str):
        mlp = self.mlps[name.replace(".", "__")]

        def hook(module, inputs, output):
            if not (self.enabled and module.training):
                return
            with torch.no_grad():
                a_f = module.fp_forward(inputs[0])
            self._losses.append(aqd_layer_loss(a_f, output, mlp))
        return hook


class SQD(_Hooked):
    """Stochastic quantization distillation on the layers that produce graph nodes."""

    def __init__(self, model: nn.Module, p: float = 0.5, layers: Optional[List[str]] = None,
                 generator: Optional[torch.Generator] = None):
        super().__init__(list(layers) if layers is not None else list(sqd_layers(model)))
        self.p = float(p)
        self.generator = generator

    def _draw(self) -> bool:
        return bool(torch.rand((), generator=self.generator) < self.p)

    def stochastic_product(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``SQ(W) (x) SQ(A)`` for a QConv2d / QLinear on input x."""
        w = module.weight_quant(module.weight) if self._draw() else module.weight
        a = module.act_quant(x) if self._draw() else x
        if isinstance(module, QConv2d):
            return module._conv_forward(a, w, module.bias)
        return F.linear(a, w, module.bias)

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not (self.enabled and module.training):
                return
            tasks = output.shape[0]
            with torch.no_grad():
                p_rand = self.stochastic_product(module, inputs[0])
            self._losses.append(sqd_layer_loss(_as_nodes(p_rand, tasks), _as_nodes(output, tasks)))
        return hook


class Distillation(nn.Module):
    """AQD + SQD with their weights: ``loss = lambda1 * L_AQD + lambda2 * L_SQD``."""

    def __init__(self, model: nn.Module, aqd: bool = True, sqd: bool = True, lambda1: float = 0.7,
                 lambda2: float = 1.0, p: float = 0.5):
        super().__init__()
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.aqd = AQD(model) if aqd and aqd_layers(model) else None
        self.sqd = SQD(model, p) if sqd and sqd_layers(model) else None

    def attach(self, model: nn.Module) -> "Distillation":
        for d in (self.aqd, self.sqd):
            if d is not None:
                d.attach(model)
        return self

    def detach(self) -> None:
        for d in (self.aqd, self.sqd):
            if d is not None:
                d.detach()

    def pop_losses(self) -> Dict[str, torch.Tensor]:
        aqd = self.aqd.pop_loss() if self.aqd is not None else torch.zeros(())
        sqd = self.sqd.pop_loss() if self.sqd is not None else torch.zeros(())
        return {"aqd": aqd, "sqd": sqd, "total": self.lambda1 * aqd + self.lambda2 * sqd}

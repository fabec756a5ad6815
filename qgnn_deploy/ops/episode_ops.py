"""The episode-op vocabulary: everything an integer model does between and around its layers.

A model family's episode is written once against this vocabulary (``IntModel.episode``
and the container modules of :mod:`qgnn_deploy.intmodel` take an ``ops`` argument):

* :class:`TorchEpisodeOps` (this file) runs each op eagerly on torch tensors. It is the
  specification of the non-integer steps, as :mod:`qgnn_deploy.ops.reference` is of the
  integer ones; the ``reference``, ``cpu-eager`` and ``triton`` backends run it, and the
  float / fake-quant model (:mod:`qgnn_deploy.models`) computes the same steps with the
  same functions, so the fold compares like with like;
* :class:`qgnn_deploy.plan.builder.PlanBuilder` records the same calls as the steps of
  a compiled plan, which the ``cpu`` backend runs in one native call
  (``csrc/plan.cpp``, ``csrc/episode_kernels.cpp`` reproduce this file).

Tensors carry the tasks axis first: backbone maps are ``[T, N, H, W, C]`` (NHWC per
image), graph tensors ``[T, N, ...]``.

Exactness. Elementwise fp32 arithmetic (``+ - * /``, max) is IEEE and identical
everywhere. Results that depend on an implementation's summation order or on a
transcendental -- FP32 conv / linear layers, row sums, means, the sigmoid -- are
computed in float64 and rounded once to float32: products of two float32 values are
exact in float64 and a float64 sum of a few thousand of them is within ~1e-13 of the
exact value, so every engine, whatever its order or thread count, rounds to the same
float32 except when the exact value lies within that distance of a float32 rounding
boundary (probability ~1e-8 per element). That keeps every quantizer's input -- and so
every integer intermediate -- identical between this file and the compiled plan.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError

Tensor = torch.Tensor
#: a concat part: a tensor, or (tensor, start, stop) for its last-dim columns [start, stop)
Part = Union[Tensor, Tuple[Tensor, int, int]]

#: F.normalize's default eps (a float32 value once applied to float32 tensors)
L1_EPS = 1e-12
#: DPGN adds ``eye + EDGE_EPS`` before the final row normalisation
EDGE_EPS = 1e-6


def f32_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias`` summed in float64, rounded once: [..., K] x [O, K] -> [..., O]."""
    b = None if bias is None else bias.double()
    return F.linear(x.double(), weight.double(), b).float()


def f32_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int) -> Tensor:
    """Float32 conv summed in float64 (NCHW, as F.conv2d): x [B, C, H, W], weight [O, C, k, k]."""
    b = None if bias is None else bias.double()
    return F.conv2d(x.double(), weight.double(), b, stride, padding).float()


def f32_row_sum(x: Tensor) -> Tensor:
    """Sum over the last dim in float64, rounded once: [..., C] -> [..., 1]."""
    return x.double().sum(-1, keepdim=True).float()


def _offdiag(x: Tensor) -> Tensor:
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return x * (1.0 - eye)


def l1_normalize_rows(x: Tensor) -> Tensor:
    """``F.normalize(x, p=1, dim=-1)`` with the norm summed in float64."""
    norm = x.abs().double().sum(-1, keepdim=True).float()
    return x / norm.clamp_min(L1_EPS)


class TorchEpisodeOps:
    """Eager torch implementation of the episode ops (the specification)."""

    # -- layers ----------------------------------------------------------
    @staticmethod
    def layer(module, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """A folded layer: a linear (or pointwise conv) on the last dim of ``[..., C]``, a
        conv on ``[T, N, H, W, C]`` maps; ``residual`` has the output's shape."""
        if not getattr(module, "is_conv", False):
            return module(x)
        dims = 1 if module.pointwise else 3   # trailing dims a conv call sees besides the batch
        if module.pointwise:
            to_call = lambda t: t.reshape(-1, 1, 1, t.shape[-1])  # noqa: E731
        else:
            to_call = lambda t: t.reshape(-1, *t.shape[-3:])  # noqa: E731
        y = module(to_call(x), residual=None if residual is None else to_call(residual))
        return y.reshape(*x.shape[:-dims], *y.shape[4 - dims:])

    @staticmethod
    def aggregate(module, adj: Tensor, nodes: Tensor) -> Tensor:
        """The graph aggregation layer: adj [T, N, N], nodes [T, N, D] -> [T, N, D]; with
        more leading dims (several graphs per task, [T, G, N, N] and [T, G, N, D]) each
        graph is aggregated on its own."""
        if adj.dim() == 3:
            return module(adj, nodes)
        n, d = nodes.shape[-2:]
        y = module(adj.reshape(-1, n, n), nodes.reshape(-1, n, d))
        return y.reshape(*nodes.shape[:-2], n, d)

    # -- maps ------------------------------------------------------------
    @staticmethod
    def images_nhwc(images: Tensor) -> Tensor:
        """[T, N, 3, S, S] -> [T, N, S, S, 3] float32."""
        return images.permute(0, 1, 3, 4, 2).contiguous().float()

    @staticmethod
    def max_pool(x: Tensor, kernel: int, stride: int, padding: int = 0) -> Tensor:
        """Max-pool of [T, N, H, W, C] maps (padding never wins: it is -inf)."""
        lead = x.shape[:2]
        y = F.max_pool2d(x.reshape(-1, *x.shape[2:]).permute(0, 3, 1, 2), kernel, stride, padding)
        return y.permute(0, 2, 3, 1).reshape(*lead, *y.shape[2:], y.shape[1]).contiguous()

    @staticmethod
    def mean_hw(x: Tensor) -> Tensor:
        """Global average pool [T, N, H, W, C] -> [T, N, C] (float64 sum)."""
        return x.double().mean((2, 3)).float()

    @staticmethod
    def flatten_hwc(x: Tensor) -> Tensor:
        """[T, N, H, W, C] -> [T, N, H*W*C] in (h, w, c) order."""
        return x.reshape(*x.shape[:2], -1)

    # -- graph -----------------------------------------------------------
    @staticmethod
    def pairwise_sqdiff(v: Tensor) -> Tensor:
        """``(v_i - v_j)^2``: [T, N, C] -> [T, N, N, C]."""
        d = v.unsqueeze(2) - v.unsqueeze(1)
        return d * d

    @staticmethod
    def pairwise_absdiff(v: Tensor) -> Tensor:
        """``|v_i - v_j|`` per graph: [..., N, C] -> [..., N, N, C] (EGNN's edge features)."""
        if v.dim() < 3:
            raise ConfigError(f"pairwise_absdiff needs nodes [T, ..., N, C], got {tuple(v.shape)}")
        return (v.unsqueeze(-2) - v.unsqueeze(-3)).abs()

    @staticmethod
    def take_rows(x: Tensor, index) -> Tensor:
        """Rows of each task's ``x`` [T, ..., C] (its leading per-task dims flattened to rows
        R) picked by the constant ``index`` (ints in [0, R), any shape L):
        [T, *L, C]. A copy: graphs made of chosen nodes, chosen edge rows."""
        idx = torch.as_tensor(index, dtype=torch.long)
        if x.dim() < 3:
            raise ConfigError(f"take_rows needs [T, ..., C], got {tuple(x.shape)}")
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= rows.shape[1]:
            raise ConfigError(f"take_rows of {tuple(x.shape)} needs row indices in [0, {rows.shape[1]})")
        out = rows.index_select(1, idx.reshape(-1).to(x.device))
        return out.reshape(x.shape[0], *idx.shape, x.shape[-1])

    @staticmethod
    def neg_sum_last(x: Tensor) -> Tensor:
        """``-sum`` over the last dim (float64): [..., C] -> [...]."""
        return -f32_row_sum(x).squeeze(-1)

    @staticmethod
    def squeeze_last(x: Tensor) -> Tensor:
        """[..., 1] -> [...]."""
        return x.squeeze(-1)

    @staticmethod
    def sigmoid(x: Tensor) -> Tensor:
        """``1 / (1 + exp(-x))`` in float64, rounded once."""
        return torch.sigmoid(x.double()).float()

    @staticmethod
    def edge_update(sim: Tensor, prev_edge: Tensor) -> Tensor:
        """DPGN's edge update on [T, N, N]: mask the diagonal of ``prev_edge``, weight by
        ``sim``, L1-normalise each row and rescale it to its previous sum, add
        ``eye + EDGE_EPS``, normalise the rows to sum 1."""
        eye = torch.eye(prev_edge.shape[-1], dtype=prev_edge.dtype, device=prev_edge.device)
        prev = prev_edge * (1.0 - eye)
        prev_sum = f32_row_sum(prev)
        edge = l1_normalize_rows(sim * prev) * prev_sum
        edge = edge + (eye + EDGE_EPS)
        return edge / f32_row_sum(edge)

    @staticmethod
    def edge_update_2ch(sim: Tensor, prev_sim: Tensor, prev_dsim: Tensor) -> Tuple[Tensor, Tensor]:
        """EGNN's edge update on the two channels of [..., N, N] edges (similarity,
        dissimilarity), with ``M_c = prev_c * (1 - I)``:
        ``E_c = l1_normalize_rows(w_c * M_c) * rowsum(M_c)`` for ``w = (sim, 1 - sim)``;
        ``E_sim += I``, ``E_dsim += 0``, both ``+= EDGE_EPS``, then each is divided by
        ``E_sim + E_dsim`` (the channels sum to 1). Float64 row sums and norms."""
        if (sim.dim() < 3 or sim.shape[-1] != sim.shape[-2] or prev_sim.shape != sim.shape
                or prev_dsim.shape != sim.shape):
            raise ConfigError(f"edge_update_2ch needs three [T, ..., N, N] tensors, got {tuple(sim.shape)}, "
                              f"{tuple(prev_sim.shape)}, {tuple(prev_dsim.shape)}")
        eye = torch.eye(sim.shape[-1], dtype=sim.dtype, device=sim.device)
        outs = []
        for w, prev, force in ((sim, prev_sim, eye), (1.0 - sim, prev_dsim, torch.zeros_like(eye))):
            masked = prev * (1.0 - eye)
            edge = l1_normalize_rows(w * masked) * f32_row_sum(masked)
            outs.append((edge + force) + EDGE_EPS)
        total = outs[0] + outs[1]
        return outs[0] / total, outs[1] / total

    @staticmethod
    def offdiag_l1_normalize(x: Tensor) -> Tensor:
        """``F.normalize(x * (1 - I), p=1, dim=-1)`` on [T, ..., N, N] (float64 norm): every
        N x N matrix (each graph, each edge channel) on its own."""
        return l1_normalize_rows(_offdiag(x))

    @staticmethod
    def concat_last(parts: Sequence[Part]) -> Tensor:
        """Concatenate on the last dim; a part ``(t, a, b)`` contributes ``t[..., a:b]``."""
        cols = [p[0][..., p[1]:p[2]] if isinstance(p, tuple) else p for p in parts]
        return torch.cat(cols, dim=-1)

    @staticmethod
    def label_scores(edge: Tensor, onehot: Tensor, first_row: Optional[int] = None) -> Tensor:
        """Query rows x support columns of ``edge`` [T, N, N] times the support one-hot
        labels [T, NS, way] (float64 sum): [T, N - NS, way]. ``first_row`` (default NS):
        the first query row; ``edge`` may then be any [T, R, W] with W >= NS, giving
        [T, R - first_row, way] from its first NS columns."""
        ns = onehot.shape[1]
        r0 = ns if first_row is None else int(first_row)
        return torch.bmm(edge[:, r0:, :ns].double(), onehot.double()).float()


TORCH_OPS = TorchEpisodeOps()

__all__ = ["TorchEpisodeOps", "TORCH_OPS", "f32_linear", "f32_conv2d", "f32_row_sum",
           "l1_normalize_rows", "L1_EPS", "EDGE_EPS"]

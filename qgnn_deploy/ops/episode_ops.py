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
        """The graph aggregation layer: adj [T, N, N], nodes [T, N, D] -> [T, N, D]."""
        return module(adj, nodes)

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
    def offdiag_l1_normalize(x: Tensor) -> Tensor:
        """``F.normalize(x * (1 - I), p=1, dim=-1)`` on [T, N, N] (float64 norm)."""
        return l1_normalize_rows(_offdiag(x))

    @staticmethod
    def concat_last(parts: Sequence[Part]) -> Tensor:
        """Concatenate on the last dim; a part ``(t, a, b)`` contributes ``t[..., a:b]``."""
        cols = [p[0][..., p[1]:p[2]] if isinstance(p, tuple) else p for p in parts]
        return torch.cat(cols, dim=-1)

    @staticmethod
    def label_scores(edge: Tensor, onehot: Tensor) -> Tensor:
        """Query rows x support columns of ``edge`` [T, N, N] times the support one-hot
        labels [T, NS, way] (float64 sum): [T, N - NS, way]."""
        ns = onehot.shape[1]
        return torch.bmm(edge[:, ns:, :ns].double(), onehot.double()).float()


TORCH_OPS = TorchEpisodeOps()

__all__ = ["TorchEpisodeOps", "TORCH_OPS", "f32_linear", "f32_conv2d", "f32_row_sum",
           "l1_normalize_rows", "L1_EPS", "EDGE_EPS"]

"""Pauta quantization against the paper's equations 4-7 on hand-computed cases."""
import pytest
import torch

from qgnn_deploy.errors import ConfigError
from qgnn_deploy.quant.pauta import (PautaQuantizer, pauta_codes, pauta_fake_quant,
                                     pauta_init_range, pauta_step)


def test_init_range_is_mean_pm_3_std():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    l, r = pauta_init_range(x)
    mean, std = 2.5, (1.25) ** 0.5  # population std
    assert l.item() == pytest.approx(mean - 3 * std)
    assert r.item() == pytest.approx(mean + 3 * std)


def test_per_channel_init_range():
    x = torch.stack([torch.zeros(6), torch.arange(6.0)])
    l, r = pauta_init_range(x, dim=0)
    assert l.shape == (2,)
    assert l[0].item() == 0.0 and r[0].item() > 0.0  # constant channel keeps s > 0
    assert l[1].item() == pytest.approx(2.5 - 3 * torch.arange(6.0).std(unbiased=False).item())


def test_codes_hand_computed_with_ties_and_clipping():
    # 2 bits, l = 0, r = 3 -> s = 1: codes are round-half-even of x, clipped to [0, 3]
    l, r = torch.tensor(0.0), torch.tensor(3.0)
    s = pauta_step(l, r, 2)
    assert s.item() == 1.0
    x = torch.tensor([-5.0, -0.5, 0.4, 0.5, 1.5, 2.5, 2.6, 3.0, 9.0])
    codes = pauta_codes(x, l, s, 2)
    assert codes.tolist() == [0, 0, 0, 0, 2, 2, 3, 3, 3]  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (ties to even)
    assert codes.dtype == torch.uint8
    fq = pauta_fake_quant(x, l, r, 2)
    assert fq.tolist() == [0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 3.0, 3.0, 3.0]


def test_codes_with_offset_and_3_bits():
    # l = -1, r = 6 -> s = 1 (3 bits, 7 steps); x - l then /s then round
    l, r = torch.tensor(-1.0), torch.tensor(6.0)
    x = torch.tensor([-1.0, -0.4, 0.5, 2.49, 5.5, 7.0])
    assert pauta_codes(x, l, pauta_step(l, r, 3), 3).tolist() == [0, 1, 2, 3, 6, 7]
    assert pauta_fake_quant(x, l, r, 3).tolist() == [-1.0, 0.0, 1.0, 2.0, 5.0, 6.0]


def test_nan_maps_to_code_zero_not_ub():
    codes = pauta_codes(torch.tensor([float("nan"), float("inf"), -float("inf")]),
                        torch.tensor(0.0), torch.tensor(1.0), 4)
    assert codes.tolist() == [0, 15, 0]


def test_gradients_reach_l_and_r():
    q = PautaQuantizer(2)
    x = torch.linspace(-3, 3, 50, requires_grad=True)
    q(x)  # initialises the range
    y = q(x)
    (y * torch.linspace(0.1, 2, 50)).sum().backward()
    assert q.l.grad is not None and q.r.grad is not None
    assert q.l.grad.abs().item() > 0 and q.r.grad.abs().item() > 0
    # straight-through: inside the range the gradient to x is 1, outside 0
    inside = (x.detach() > q.l.detach()) & (x.detach() < q.r.detach())
    assert torch.all(x.grad[inside] > 0)


def test_quantizer_initialises_on_first_batch_only():
    q = PautaQuantizer(4)
    a = torch.randn(1000)
    q(a)
    l0, r0 = q.l.item(), q.r.item()
    assert l0 == pytest.approx((a.mean() - 3 * a.std(unbiased=False)).item(), rel=1e-5)
    q(a * 10)
    assert (q.l.item(), q.r.item()) == (l0, r0)
    assert bool(q.initialized)


def test_codes_match_fake_quant_values():
    q = PautaQuantizer(3, channels=4)
    w = torch.randn(4, 9)
    fq = q(w)
    codes = q.codes(w).float()
    recon = q.l.detach().view(-1, 1) + q.step().view(-1, 1) * codes
    assert torch.equal(fq.detach(), recon)


@pytest.mark.parametrize("bits", [1, 5, 16, 32])
def test_bad_bits(bits):
    with pytest.raises(ConfigError):
        PautaQuantizer(bits)

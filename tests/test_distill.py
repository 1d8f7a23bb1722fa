"""Knowledge distillation and full-activation transfer against independent computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from at.distill import ActivationProjection, factt_loss, kd_loss
from at import terms

# the kd term's options where a term writes none (its record holds them, not kd_loss)
KD = terms.KD.defaults()


def _logits(b=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (b,), generator=g)
    return zs, zt, y


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_kd(zs, zt, y, T, alpha):
    zs, zt, y = zs.numpy(), zt.numpy(), y.numpy()
    log_ps, log_pt = _np_log_softmax(zs / T), _np_log_softmax(zt / T)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum() / zs.shape[0]
    ce = -_np_log_softmax(zs)[np.arange(len(y)), y].mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T,alpha", [(4, 0.9), (2, 0.5), (1, 1.0)])
def test_kd_loss_against_numpy(T, alpha):
    zs, zt, y = _logits()
    got = kd_loss(zs, zt, y, T=T, alpha=alpha)
    assert got.dtype == torch.float64
    assert abs(got.item() - _np_kd(zs, zt, y, T, alpha)) < 1e-12


def test_kd_loss_hand_worked_two_classes():
    # z_s = [0, 0] -> p_s = [1/2, 1/2]; z_t = [4 ln 3, 0], T = 4 -> p_t = [3/4, 1/4]
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2); CE(z_s, y=0) = ln 2
    zs = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    zt = torch.tensor([[4 * np.log(3.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    expected = 0.9 * 16 * kl + 0.1 * np.log(2.0)
    assert abs(kd_loss(zs, zt, y, **KD).item() - expected) < 1e-12


def test_kd_with_T1_alpha0_is_cross_entropy():
    zs, zt, y = _logits()
    torch.testing.assert_close(kd_loss(zs, zt, y, T=1, alpha=0), F.cross_entropy(zs, y), rtol=1e-14, atol=0)


def test_kd_identical_logits_has_zero_kl_part():
    zs, _, y = _logits()
    assert abs(kd_loss(zs, zs.clone(), y, T=4, alpha=1.0).item()) < 1e-14
    torch.testing.assert_close(kd_loss(zs, zs.clone(), y, T=4, alpha=0.9), 0.1 * F.cross_entropy(zs, y))


def test_kd_loss_teacher_gets_no_gradient_and_is_float32_for_bf16():
    zs, zt, y = _logits()
    zs = zs.float().requires_grad_(True)
    zt = zt.float().requires_grad_(True)
    kd_loss(zs, zt, y, **KD).backward()
    assert zs.grad is not None and zt.grad is None
    assert kd_loss(zs.bfloat16(), zt.bfloat16(), y, **KD).dtype == torch.float32


@pytest.mark.parametrize(
    "args,needle",
    [
        ({"T": 0}, "T must be"),
        ({"alpha": 1.5}, "alpha must be"),
        ({"alpha": -0.1}, "alpha must be"),
    ],
)
def test_kd_loss_rejects_bad_parameters(args, needle):
    zs, zt, y = _logits()
    with pytest.raises(ValueError, match=needle):
        kd_loss(zs, zt, y, **{**KD, **args})


def test_kd_loss_rejects_shape_mismatch():
    zs, zt, y = _logits()
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 4\)"):
        kd_loss(zs, zt[:, :4], y, **KD)
    with pytest.raises(ValueError, match="one label per sample"):
        kd_loss(zs, zt, y[:3], **KD)


# ------------------------------------------------------------------------------ F-ActT


def test_projection_maps_student_channels_to_teacher_channels():
    proj = ActivationProjection(3, 5)
    out = proj(torch.randn(2, 3, 4, 4))
    assert out.shape == (2, 5, 4, 4)
    assert [tuple(p.shape) for p in proj.parameters()] == [(5, 3, 1, 1)]  # no bias
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(2, 4, 4, 4\)"):
        proj(torch.randn(2, 4, 4, 4))


def test_equal_channels_means_no_projection_parameters():
    proj = ActivationProjection(4, 4)
    assert list(proj.parameters()) == []
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(proj(x), x)


def test_projection_rejects_bad_channel_counts():
    with pytest.raises(ValueError, match="student_channels"):
        ActivationProjection(0, 4)


def test_factt_loss_against_numpy():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, 5, 2, generator=g, dtype=torch.float64)
    t = torch.randn(3, 4, 5, 2, generator=g, dtype=torch.float64)
    sn, tn = s.numpy().reshape(3, -1), t.numpy().reshape(3, -1)
    sn = sn / np.linalg.norm(sn, axis=1, keepdims=True)
    tn = tn / np.linalg.norm(tn, axis=1, keepdims=True)
    expected = ((sn - tn) ** 2).sum(1).mean() / (5 * 2)
    assert abs(factt_loss(s, t).item() - expected) < 1e-14


def test_factt_loss_range_and_scale_invariance():
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert factt_loss(s, 7 * s).item() < 1e-25
    assert abs(factt_loss(s, -s).item() - 4 / 16) < 1e-14
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(factt_loss(10 * s, t), factt_loss(s, t))


def test_factt_projection_gets_gradients_teacher_does_not():
    torch.manual_seed(0)
    proj = ActivationProjection(3, 6).double()
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    factt_loss(proj(s), t).backward()
    (w,) = proj.parameters()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert s.grad is not None and t.grad is None
    # the projection is a 1x1 conv: compare with an einsum
    manual = torch.einsum("oc,bchw->bohw", w.detach()[:, :, 0, 0], s.detach())
    torch.testing.assert_close(proj(s.detach()), manual)


def test_factt_loss_rejects_mismatches():
    with pytest.raises(ValueError, match=r"channel counts.*\(2, 3, 4, 4\).*\(2, 6, 4, 4\)"):
        factt_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 6, 4, 4))
    with pytest.raises(ValueError, match=r"spatial.*\(2, 3, 4, 4\).*\(2, 3, 2, 2\)"):
        factt_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))

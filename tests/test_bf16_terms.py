"""Under bf16 autocast the transfer losses keep float32 arithmetic: AT (every registered mapping),
KD and F-ActT computed from bf16 activations stay within RTOL of a float64 reference computed
from the same bf16-rounded activations, while the same formula evaluated in bf16 throughout
misses that reference by more than BF16_MISS.

Why these bounds. bf16 keeps 8 significant bits: one rounding moves a value by up to
2^-9 ~ 0.2% (0.4% between neighbours). The inputs here are already bf16 numbers, so a float32
computation from them only adds float32 roundings (2^-24 ~ 6e-8 each; the reductions below sum
at most a few thousand terms): measured <= 1e-6 relative, and RTOL = 1e-5 leaves a margin.
RTOL is 1/400 of one bf16 rounding, so a single intermediate rounded to bf16 inside the loss
would break it. The student's activations are the teacher's plus 2% noise (a student that
matches its teacher, as AT and KD push it to): the loss is then a small difference of nearly
equal normalised maps or distributions, and bf16 roundings of those maps change it by 0.3% to
20% (measured) -- hence BF16_MISS = 1e-3, 100 times RTOL, as the proof that the check can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from at.attention import MAPPINGS, at_loss
from at.distill import ActivationProjection, factt_loss, kd_loss
from at.method import Progress
from at.objective import Objective

RTOL = 1e-5
BF16_MISS = 1e-3
CLOSENESS = 0.02  # student = teacher + CLOSENESS * noise

# Independent, dtype-generic formulas: evaluated in float64 they are the reference, in bf16
# the "bf16 throughout" computation. Mappings written out per registered name.
REDUCE = {"sum": lambda a: a.sum(dim=1), "max": lambda a: a.amax(dim=1)}


def _attention(a, mapping, p):
    m = REDUCE[mapping](a.abs().pow(p)).flatten(1)
    return m / m.pow(2).sum(dim=1, keepdim=True).sqrt()


def _at_formula(s, t, mapping, p, form):
    d = _attention(s, mapping, p) - _attention(t, mapping, p)
    return d.pow(2).mean() if form == "code" else 0.5 * d.pow(2).sum(dim=1).sqrt().mean()


def _log_softmax(z):
    z = z - z.amax(dim=1, keepdim=True)
    return z - z.exp().sum(dim=1, keepdim=True).log()


def _kd_formula(zs, zt, y, T, alpha):
    log_ps, log_pt = _log_softmax(zs / T), _log_softmax(zt / T)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum() / zs.shape[0]
    ce = -_log_softmax(zs).gather(1, y[:, None]).mean()
    return alpha * T * T * kl + (1 - alpha) * ce


def _factt_formula(s, t):
    height, width = s.shape[2:]
    s, t = s.flatten(1), t.flatten(1)
    s = s / s.pow(2).sum(dim=1, keepdim=True).sqrt()
    t = t / t.pow(2).sum(dim=1, keepdim=True).sqrt()
    return (s - t).pow(2).sum(dim=1).mean() / (height * width)


def _close_pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(*shape, generator=g)
    student = teacher + CLOSENESS * torch.randn(*shape, generator=g)
    return student.bfloat16(), teacher.bfloat16()


def _relative(a, b):
    return abs(a.item() - b.item()) / abs(b.item())


def _check(ours, s, t, formula, *args):
    """ours (float32, from bf16 s, t) against the float64 formula; bf16 throughout misses it."""
    reference = formula(s.double(), t.double(), *args)
    assert ours.dtype == torch.float32
    assert _relative(ours, reference) < RTOL, (_relative(ours, reference), RTOL)
    in_bf16 = formula(s, t, *args)
    assert in_bf16.dtype == torch.bfloat16
    assert _relative(in_bf16.float(), reference) > BF16_MISS, "the tolerance would not catch bf16 arithmetic"


def test_every_registered_mapping_has_a_formula_here():
    assert set(MAPPINGS) == set(REDUCE)


@pytest.mark.parametrize("mapping", list(REDUCE))
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("form", ["code", "paper"])
def test_at_loss_under_bf16_autocast_matches_float64(mapping, p, form):
    s, t = _close_pair((8, 16, 8, 8), seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = at_loss(s, t, mapping, p, form)
    _check(ours, s, t, _at_formula, mapping, p, form)


def test_kd_loss_under_bf16_autocast_matches_float64():
    zs, zt = (3 * z for z in _close_pair((64, 10), seed=1))  # bf16 logits of spread ~3
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = kd_loss(zs, zt, y, T=4, alpha=0.9)
    _check(ours, zs, zt, _kd_formula, y, 4, 0.9)


def test_factt_loss_under_bf16_autocast_matches_float64():
    # the student's projection runs under autocast (a bf16 conv); its bf16 output is what the
    # loss and the reference both start from
    torch.manual_seed(3)
    projection = ActivationProjection(16, 24)
    s, _ = _close_pair((8, 16, 8, 8), seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        t = projection(s.float())
        t = (t + CLOSENESS * t.std() * torch.randn(t.shape, generator=g)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = projection(s)
        ours = factt_loss(projected, t)
    assert projected.dtype == torch.bfloat16
    _check(ours, projected.detach(), t, _factt_formula)


class _ConvTaps(nn.Module):
    """conv-tanh (8x8 tap) -> conv stride 2-tanh (4x4 tap) -> mean -> linear; no BN, so a
    second forward pass gives the same taps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        a = torch.tanh(self.conv1(x))
        b = torch.tanh(self.conv2(a))
        return self.fc(b.mean((2, 3))), [a, b]


def test_objective_terms_under_bf16_autocast_match_float64_from_the_networks_outputs():
    # the student is the teacher with its weights moved by 2%: close, as above
    torch.manual_seed(0)
    teacher = _ConvTaps().eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for w in student.parameters():
            w.add_(CLOSENESS * w.abs().mean() * torch.randn_like(w))
    spec = {"terms": [{"type": "kd"}, {"type": "at", "schedule": "lr"}, {"type": "factt", "name": "factt_1",
                                                                          "layers": [1], "beta": 10.0}]}
    objective = Objective(spec, student, teacher, (3, 8, 8))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    progress = Progress(0, 2, lr_factor=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = objective(x, y, progress)
        s_logits, s_taps = student(x)
        t_logits, t_taps = teacher(x)
    assert all(a.dtype == torch.bfloat16 for a in [s_logits, t_logits, *s_taps, *t_taps])
    assert all(v.dtype == torch.float32 for v in result.terms.values())
    d = [a.detach().double() for a in (s_logits, t_logits, *s_taps, *t_taps)]
    s_logits, t_logits, s_taps, t_taps = d[0], d[1], d[2:4], d[4:6]
    reference = {
        "kd": _kd_formula(s_logits, t_logits, y, 4, 0.9),
        "at": 1000 * 0.5 * sum(_at_formula(s_taps[i], t_taps[i], "sum", 2, "code") for i in (0, 1)),
        "factt_1": 10 * _factt_formula(s_taps[1], t_taps[1]),  # equal widths: no projection
    }
    for name, value in reference.items():
        assert _relative(result.terms[name], value) < RTOL, (name, _relative(result.terms[name], value))

"""Attention maps, the activation-based AT loss and the gradient-based losses, each against an
independent computation (hand-worked numbers, float64 formulas, finite differences, gradcheck)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

from at import terms
from at.attention import (
    MAPPINGS,
    abs_pow,
    at_loss,
    attention_map,
    grad_at_loss,
    input_gradient,
    min_l2_loss,
    register_mapping,
    symmetry_loss,
)

# One sample, two channels, 2x2:
#   channel 0 = [[1, -2], [0, 3]],  channel 1 = [[2, 1], [-1, 0]]
HAND = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[2.0, 1.0], [-1.0, 0.0]]]], dtype=torch.float64)
HAND_EXPECTED = {
    # sum_c |A_c|^p, flattened row-major, then / its L2 norm
    ("sum", 1): [3, 3, 1, 3],  # norm sqrt(28)
    ("sum", 2): [5, 5, 1, 9],  # norm sqrt(132)
    ("sum", 4): [17, 17, 1, 81],  # norm sqrt(7140)
    ("max", 1): [2, 2, 1, 3],  # norm sqrt(18)
    ("max", 2): [4, 4, 1, 9],  # norm sqrt(114)
}

# the at term's options where a term writes none (its record holds them, not at_loss)
AT = terms.AT.defaults()


@pytest.mark.parametrize("mapping,p", list(HAND_EXPECTED))
def test_attention_map_hand_worked(mapping, p):
    raw = HAND_EXPECTED[(mapping, p)]
    norm = math.sqrt(sum(v * v for v in raw))
    expected = torch.tensor([[v / norm for v in raw]], dtype=torch.float64)
    got = attention_map(HAND, mapping=mapping, p=p)
    assert got.shape == (1, 4)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# Every registered mapping, worked by hand on HAND before normalisation: (p, raw map) pairs. A
# mapping registered without a hand case here fails the test below.
HAND_BY_MAPPING = {
    "sum": [(1, [3, 3, 1, 3]), (2, [5, 5, 1, 9]), (0.5, [1 + 2**0.5, 2**0.5 + 1, 1, 3**0.5])],
    "max": [(1, [2, 2, 1, 3]), (2, [4, 4, 1, 9]), (0.5, [2**0.5, 2**0.5, 1, 3**0.5])],
}


def test_every_registered_mapping_equals_its_hand_computation():
    assert list(MAPPINGS) == list(HAND_BY_MAPPING)
    for mapping, cases in HAND_BY_MAPPING.items():
        for p, raw in cases:
            norm = math.sqrt(sum(v * v for v in raw))
            expected = torch.tensor([[v / norm for v in raw]], dtype=torch.float64)
            got = attention_map(HAND, mapping=mapping, p=p)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"{mapping} p={p}")


def test_a_new_mapping_is_one_registry_entry():
    from at.method import validate_method

    def min_map(activation, p):
        return abs_pow(activation, p).amin(dim=1)

    with pytest.raises(ValueError, match="unknown attention mapping 'min'; allowed: sum, max"):
        attention_map(HAND, "min", 1)
    register_mapping("min", min_map)
    try:
        # min_c |A_c| of HAND = [1, 1, 0, 0]: neither F_sum nor F_max, so no fallback can pass
        expected = torch.tensor([[1, 1, 0, 0]], dtype=torch.float64) / math.sqrt(2)
        torch.testing.assert_close(attention_map(HAND, "min", 1), expected, rtol=1e-12, atol=1e-12)
        validate_method({"terms": [{"type": "at", "mapping": "min"}]})
    finally:
        MAPPINGS.unregister("min")
    with pytest.raises(ValueError, match="unknown mapping 'min'; allowed: sum, max"):
        validate_method({"terms": [{"type": "at", "mapping": "min"}]})


def test_a_mapping_that_does_not_reduce_the_channels_is_refused():
    register_mapping("identity", lambda activation, p: activation)
    try:
        with pytest.raises(ValueError, match=r"mapping 'identity' returned shape \(1, 2, 2, 2\), expected \(B, H, W\)"):
            attention_map(HAND, "identity", 1)
    finally:
        MAPPINGS.unregister("identity")


def test_sum_and_max_differ_and_p_matters():
    assert not torch.allclose(attention_map(HAND, "sum", 1), attention_map(HAND, "max", 1))
    assert not torch.allclose(attention_map(HAND, "sum", 2), attention_map(HAND, "sum", 4))


@pytest.mark.parametrize("mapping", ["sum", "max"])
@pytest.mark.parametrize("p", [0.5, 1, 2, 4])
def test_attention_map_rows_are_unit_vectors(mapping, p):
    x = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = attention_map(x, mapping, p)
    assert q.shape == (3, 24)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert (q >= 0).all()


def test_all_zero_map_gives_zero_not_nan_and_finite_gradient():
    for p in (0.5, 1, 2):
        x = torch.zeros(2, 3, 4, 4, requires_grad=True)
        q = attention_map(x, "sum", p)
        assert torch.equal(q, torch.zeros(2, 16))
        q.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_p_below_one_has_finite_gradient_at_exact_zeros():
    # ReLU outputs are exactly zero in places; |a|^0.5 has an infinite slope there.
    x = torch.relu(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)))
    x.requires_grad_(True)
    t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    at_loss(x, t, "sum", 0.5, "code").backward()
    assert (x == 0).any() and torch.isfinite(x.grad).all()


def test_attention_map_is_float32_for_bf16_input_and_under_autocast():
    x = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    assert attention_map(x, "sum", 2).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = nn.Conv2d(3, 3, 1)
        a = conv(torch.randn(2, 3, 4, 4))
        assert a.dtype == torch.bfloat16
        assert attention_map(a, "sum", 2).dtype == torch.float32
        assert at_loss(a, a.detach() + 1, **AT).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,needle",
    [({"mapping": "mean"}, "'mean'"), ({"p": 0}, "p must be"), ({"p": -1}, "p must be"), ({"p": float("nan")}, "p must be")],
)
def test_attention_map_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as err:
        attention_map(HAND, **{"mapping": "sum", "p": 2, **kwargs})
    if "mapping" in kwargs:
        assert "sum, max" in str(err.value)


def test_attention_map_rejects_non_4d():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(2, 3\)"):
        attention_map(torch.zeros(2, 3), "sum", 2)


# ------------------------------------------------------------------------------ at_loss


def _authors_at(x):
    # The authors' code, written out in float64: at(x) = normalize(x.pow(2).mean(1).view(B, -1))
    x = x.double()
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def _pair(seed=0, cs=4, ct=7, h=5, w=3, b=3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, cs, h, w, generator=g, dtype=torch.float64)
    t = torch.randn(b, ct, h, w, generator=g, dtype=torch.float64)
    return s, t


def test_at_loss_code_form_equals_authors_formula():
    s, t = _pair()
    expected = (_authors_at(s) - _authors_at(t)).pow(2).mean()
    torch.testing.assert_close(at_loss(s, t, "sum", 2, "code"), expected, rtol=1e-12, atol=0)


def test_mean_or_sum_over_channels_is_the_same_after_normalisation():
    s, _ = _pair()
    by_mean = F.normalize(s.pow(2).mean(1).flatten(1))
    by_sum = F.normalize(s.pow(2).sum(1).flatten(1))
    torch.testing.assert_close(by_mean, by_sum, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(attention_map(s, "sum", 2), by_mean, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mapping,p", [("sum", 1), ("sum", 2), ("sum", 4), ("max", 1)])
def test_at_loss_paper_form_against_numpy(mapping, p):
    s, t = _pair(seed=3)

    def q(a):
        a = np.abs(a.numpy()) ** p
        f = a.sum(1) if mapping == "sum" else a.max(1)
        f = f.reshape(f.shape[0], -1)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    expected = 0.5 * np.mean(np.linalg.norm(q(s) - q(t), axis=1))
    got = at_loss(s, t, mapping, p, form="paper")
    assert got.dtype == torch.float64
    assert abs(got.item() - expected) < 1e-12
    # and the code form, same maps: mean of squared differences
    code = np.mean((q(s) - q(t)) ** 2)
    assert abs(at_loss(s, t, mapping, p, form="code").item() - code) < 1e-14


def test_at_loss_identical_maps_is_zero_with_finite_gradient():
    s, _ = _pair()
    s.requires_grad_(True)
    for form in ("code", "paper"):
        loss = at_loss(s, s.detach() * 2, **{**AT, "form": form})  # same map: scale drops out
        assert loss.item() < 1e-20
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(g).all()


def test_at_loss_spatial_mismatch_names_both_shapes():
    s = torch.zeros(2, 4, 8, 8)
    t = torch.zeros(2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 8\).*\(2, 4, 4, 4\)"):
        at_loss(s, t, **AT)


def test_at_loss_bad_form():
    s, t = _pair()
    with pytest.raises(ValueError, match="'l1'.*code, paper"):
        at_loss(s, t, **{**AT, "form": "l1"})


def test_at_loss_gradient_reaches_student_only():
    s, t = _pair()
    s.requires_grad_(True)
    t.requires_grad_(True)
    at_loss(s, t, **AT).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# ------------------------------------------------------------------ gradient-based attention


class TinyNet(nn.Module):
    """conv3x3 -> tanh -> global mean -> linear; tanh keeps every derivative smooth for
    gradcheck. symmetric=True uses horizontally mirrored kernels, which (with symmetric zero
    padding and global pooling) make the network's output invariant to horizontal flips."""

    def __init__(self, in_ch=1, hidden=2, classes=3, symmetric=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(in_ch, hidden, 3, padding=1).double()
        self.fc = nn.Linear(hidden, classes).double()
        self.symmetric = symmetric

    def forward(self, x):
        w = self.conv.weight
        if self.symmetric:
            w = 0.5 * (w + w.flip(-1))
        h = torch.tanh(F.conv2d(x, w, self.conv.bias, padding=1))
        return self.fc(h.mean((2, 3))), [h]


def _data(b=2, c=1, h=3, w=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y


def test_input_gradient_matches_finite_differences():
    net = TinyNet()
    x, y = _data()

    def summed_ce(inp):
        return F.cross_entropy(net(inp)[0], y, reduction="sum").item()

    eps = 1e-6
    fd = torch.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.clone(), x.clone()
        plus[idx] += eps
        minus[idx] -= eps
        fd[idx] = (summed_ce(plus) - summed_ce(minus)) / (2 * eps)
    j = input_gradient(net, x, y)
    torch.testing.assert_close(j, fd, rtol=1e-6, atol=1e-9)
    assert not j.requires_grad


def test_input_gradient_of_a_sample_does_not_depend_on_the_batch():
    net = TinyNet()
    x, y = _data(b=4)
    whole = input_gradient(net, x, y)
    alone = input_gradient(net, x[1:2], y[1:2])
    torch.testing.assert_close(whole[1:2], alone, rtol=1e-12, atol=1e-15)


def test_gradient_losses_against_numpy():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 2, 3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, 2, 3, 4, generator=g, dtype=torch.float64)
    an, bn = a.numpy(), b.numpy()
    sq = lambda d: (d.reshape(d.shape[0], -1) ** 2).sum(1)  # noqa: E731
    assert abs(grad_at_loss(a, b).item() - 0.5 * sq(an - bn).mean()) < 1e-12
    assert abs(symmetry_loss(a, b).item() - 0.5 * sq(an - bn[..., ::-1]).mean()) < 1e-12
    assert abs(min_l2_loss(a).item() - 0.5 * sq(an).mean()) < 1e-12


def test_gradient_losses_reject_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 1, 3, 3\).*\(2, 1, 3, 4\)"):
        grad_at_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 4))
    with pytest.raises(ValueError, match="symmetry_loss"):
        symmetry_loss(torch.zeros(2, 1, 3, 3), torch.zeros(1, 1, 3, 3))


def _weights_fn(net, make_loss):
    """The loss as a function of the network's weights (for gradcheck)."""
    names = [n for n, _ in net.named_parameters()]

    def fn(*weights):
        params = dict(zip(names, weights))
        return make_loss(lambda inp: functional_call(net, params, (inp,)))

    weights = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    return fn, weights


def test_grad_at_loss_double_backprop_gradcheck():
    student, teacher = TinyNet(seed=0), TinyNet(hidden=3, seed=1)
    x, y = _data()
    j_t = input_gradient(teacher, x, y)
    fn, weights = _weights_fn(student, lambda m: grad_at_loss(input_gradient(m, x, y, create_graph=True), j_t))
    assert fn(*weights).item() > 0
    assert gradcheck(fn, weights, eps=1e-6, atol=1e-6)
    assert gradgradcheck(fn, weights, eps=1e-6, atol=1e-5)


def test_symmetry_loss_double_backprop_gradcheck():
    x, y = _data()

    def loss(m):
        return symmetry_loss(
            input_gradient(m, x, y, create_graph=True), input_gradient(m, x.flip(-1), y, create_graph=True)
        )

    fn, weights = _weights_fn(TinyNet(seed=2), loss)
    assert gradcheck(fn, weights, eps=1e-6, atol=1e-6)


def test_min_l2_loss_double_backprop_gradcheck():
    x, y = _data()
    fn, weights = _weights_fn(TinyNet(seed=3), lambda m: min_l2_loss(input_gradient(m, x, y, create_graph=True)))
    assert gradcheck(fn, weights, eps=1e-6, atol=1e-6)


def test_symmetry_loss_zero_for_flip_invariant_network_positive_otherwise():
    x, y = _data(b=3, h=5, w=6)
    for symmetric, expect_zero in ((True, True), (False, False)):
        net = TinyNet(symmetric=symmetric, seed=4)
        value = symmetry_loss(input_gradient(net, x, y), input_gradient(net, x.flip(-1), y)).item()
        if expect_zero:
            assert value < 1e-25
        else:
            assert value > 1e-6


def test_grad_at_loss_teacher_side_is_constant():
    a = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_at_loss(a, b).backward()
    assert a.grad is not None and b.grad is None

"""Method specs and the Objective that composes the terms, on tiny models defined here."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from at.attention import (
    at_least_float32,
    at_loss,
    forward_with_input_gradient,
    grad_at_loss,
    min_l2_loss,
    symmetry_loss,
)
from at.distill import factt_loss, kd_loss
from at.method import (
    Progress,
    requires_teacher,
    resolve_method,
    schedule_factor,
    validate_method,
)
from at.objective import Objective

INPUT_SHAPE = (3, 8, 8)


class TapNet(nn.Module):
    """conv-BN-tanh (8x8 tap) -> conv stride 2-BN-tanh (4x4 tap) -> mean -> linear.
    tanh keeps double backprop smooth; BN lets us check running statistics."""

    def __init__(self, width, classes=5, stride2=2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=stride2, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        a = torch.tanh(self.bn1(self.conv1(x)))
        b = torch.tanh(self.bn2(self.conv2(a)))
        return self.fc(b.mean((2, 3))), [a, b]


def term_names(spec) -> list[str]:
    """The keys of StepResult.terms for a method, in spec order."""
    return [term.name for term in resolve_method(spec)]


def _nets(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    student = TapNet(2).to(dtype)
    teacher = TapNet(3).to(dtype)
    # give the teacher's BN non-trivial running statistics, then freeze it as the trainer does
    with torch.no_grad():
        teacher(torch.randn(8, *INPUT_SHAPE, dtype=dtype))
    teacher.eval().requires_grad_(False)
    return student, teacher


def _batch(dtype=torch.float64, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *INPUT_SHAPE, generator=g, dtype=dtype), torch.randint(0, 5, (b,), generator=g)


def _at(**kw):
    return {"type": "at", **kw}


METHODS = {
    "baseline": [{"type": "ce"}],
    "at-sum-p1": [{"type": "ce"}, _at(mapping="sum", p=1)],
    "at-sum-p2": [{"type": "ce"}, _at(mapping="sum", p=2)],
    "at-sum-p4": [{"type": "ce"}, _at(mapping="sum", p=4)],
    "at-max-p1": [{"type": "ce"}, _at(mapping="max", p=1)],
    "at-paper-form": [{"type": "ce"}, _at(form="paper", beta=2.0, layers=[1])],
    "factt": [{"type": "ce"}, {"type": "factt"}],
    "kd": [{"type": "kd", "T": 4, "alpha": 0.9}],
    "at+kd": [{"type": "kd"}, _at(schedule="lr")],
    "grad_at": [{"type": "ce"}, {"type": "grad_at", "beta": 10.0}],
    "symmetry": [{"type": "ce"}, {"type": "symmetry", "beta": 10.0}],
    "min_l2": [{"type": "ce"}, {"type": "min_l2", "beta": 10.0}],
}
PROGRESS = Progress(epoch=3, epochs=10, lr_factor=0.2)


def _summed_ce_grad(model, x, y, create_graph):
    """dL/dx with L = sum_b CE_b, written out here independently of at.attention."""
    leaf = x.detach().clone().requires_grad_(True)
    logits = model(leaf)[0]
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), leaf, create_graph=create_graph)
    return g


def _manual_total(spec, objective, student, teacher, x, y, progress):
    """The weighted sum of the spec's terms, computed by hand from the models."""
    s_logits, s_taps = student(x)
    with torch.no_grad():
        t_logits, t_taps = teacher(x)
    total = {}
    for term in spec["terms"]:
        kind = term["type"]
        factor = {"constant": 1.0, "lr": progress.lr_factor, "linear": 1 - progress.epoch / progress.epochs}[
            term.get("schedule", "constant")
        ]
        if kind == "ce":
            value = term.get("beta", 1.0) * F.cross_entropy(s_logits, y)
        elif kind == "kd":
            value = term.get("beta", 1.0) * kd_loss(s_logits, t_logits, y, term.get("T", 4), term.get("alpha", 0.9))
        elif kind == "at":
            layers = term.get("layers", [0, 1])
            value = term.get("beta", 1000.0) * sum(
                at_loss(s_taps[i], t_taps[i], term.get("mapping", "sum"), term.get("p", 2), term.get("form", "code"))
                for i in layers
            )
        elif kind == "factt":
            value = 0.0
            for i in (0, 1):
                w = objective.term_state["factt"][str(i)].proj.weight
                s = F.normalize(F.conv2d(s_taps[i], w).flatten(1))
                t = F.normalize(t_taps[i].flatten(1))
                value = value + (s - t).pow(2).sum(1).mean() / (s_taps[i].shape[2] * s_taps[i].shape[3])
            value = term.get("beta", 1000.0) * value
        elif kind == "grad_at":
            j_s = _summed_ce_grad(student, x, y, True)
            j_t = _summed_ce_grad(teacher, x, y, False)
            value = term["beta"] * 0.5 * (j_s - j_t).pow(2).flatten(1).sum(1).mean()
        elif kind == "symmetry":
            j = _summed_ce_grad(student, x, y, True)
            j_f = _summed_ce_grad(student, x.flip(-1), y, True)
            value = term["beta"] * 0.5 * (j - j_f.flip(-1)).pow(2).flatten(1).sum(1).mean()
        elif kind == "min_l2":
            j = _summed_ce_grad(student, x, y, True)
            value = term["beta"] * 0.5 * j.pow(2).flatten(1).sum(1).mean()
        total[kind] = factor * value
    return total


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_and_total_equals_hand_sum(name):
    spec = {"terms": copy.deepcopy(METHODS[name])}
    student, teacher = _nets()
    objective = Objective(spec, student, teacher, input_shape=INPUT_SHAPE)
    x, y = _batch()
    result = objective(x, y, PROGRESS)
    assert list(result.terms) == [t["type"] for t in METHODS[name]] == objective.term_names
    assert torch.isfinite(result.loss) and result.loss.ndim == 0
    assert result.logits.shape == (4, 5)
    assert all(not v.requires_grad for v in result.terms.values())
    torch.testing.assert_close(result.loss.detach(), sum(result.terms.values()), rtol=1e-12, atol=0)

    manual = _manual_total(spec, objective, student, teacher, x, y, PROGRESS)
    for key, value in manual.items():
        torch.testing.assert_close(result.terms[key], value.detach(), rtol=1e-9, atol=1e-15, msg=key)
    torch.testing.assert_close(result.loss.detach(), sum(manual.values()).detach(), rtol=1e-9, atol=0)

    # the gradients too: a term whose value is right but whose graph is cut (e.g. a J computed
    # without create_graph) would pass the value checks above
    params = list(student.parameters())
    got = torch.autograd.grad(result.loss, params, retain_graph=True)
    want = torch.autograd.grad(sum(manual.values()), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)

    result.loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    for p in objective.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def _pre_refactor_terms(spec, objective, student, teacher, x, y, progress):
    """The step's weighted terms as at.method computed them before term types became records
    (commit 90ee42e: one if-chain per type), from the same library calls in the same order."""
    terms = resolve_method(spec)
    kinds = {term.type for term in terms}
    j = {}
    if "grad_at" in kinds:
        t_output, j["teacher"] = forward_with_input_gradient(teacher, x, y, create_graph=False)
        t_logits, t_taps = t_output
    elif kinds & {"kd", "at", "factt"}:
        with torch.no_grad():
            t_logits, t_taps = teacher(x)
    if kinds & {"grad_at", "symmetry", "min_l2"}:
        output, j["student"] = forward_with_input_gradient(student, x, y, create_graph=True)
        s_logits, s_taps = output
        if "symmetry" in kinds:
            _, j["student_flipped"] = forward_with_input_gradient(student, x.flip(-1), y, create_graph=True)
    else:
        s_logits, s_taps = student(x)
    contributions = {}
    for term in terms:
        o = term.options
        layers = [0, 1] if o.get("layers") == "all" else o.get("layers")
        if term.type == "ce":
            value = F.cross_entropy(at_least_float32(s_logits), y)
        elif term.type == "kd":
            value = kd_loss(s_logits, t_logits, y, T=o["T"], alpha=o["alpha"])
        elif term.type == "at":
            value = sum(at_loss(s_taps[i], t_taps[i], mapping=o["mapping"], p=o["p"], form=o["form"]) for i in layers)
        elif term.type == "factt":
            value = sum(factt_loss(objective.term_state["factt"][str(i)](s_taps[i]), t_taps[i]) for i in layers)
        elif term.type == "grad_at":
            value = grad_at_loss(j["student"], j["teacher"])
        elif term.type == "symmetry":
            value = symmetry_loss(j["student"], j["student_flipped"])
        else:
            value = min_l2_loss(j["student"])
        contributions[term.type] = (term.beta * schedule_factor(term.schedule, progress)) * value
    return contributions


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_bit_identical_to_the_pre_refactor_composition(name):
    spec = {"terms": copy.deepcopy(METHODS[name])}
    student, teacher = _nets()
    student.eval()  # the two computations must see the same BN statistics
    objective = Objective(spec, student, teacher, input_shape=INPUT_SHAPE)
    x, y = _batch()
    result = objective(x, y, PROGRESS)
    before = _pre_refactor_terms(spec, objective, student, teacher, x, y, PROGRESS)
    assert list(result.terms) == list(before)
    for key in before:
        assert torch.equal(result.terms[key], before[key].detach()), key
    assert torch.equal(result.loss.detach(), sum(before.values()).detach())


def test_two_terms_of_one_type_coexist_under_distinct_names():
    spec = {"terms": [
        {"type": "ce"},
        _at(name="at_early", layers=[0], p=2),
        _at(name="at_late", layers=[1], mapping="max", p=4, beta=10.0, schedule="linear"),
        {"type": "factt", "name": "factt_early", "layers": [0]},
        {"type": "factt", "name": "factt_late", "layers": [1], "beta": 3.0},
    ]}
    assert term_names(spec) == ["ce", "at_early", "at_late", "factt_early", "factt_late"]
    student, teacher = _nets()
    student.eval()
    objective = Objective(spec, student, teacher, INPUT_SHAPE)
    # each F-ActT term owns the projection of its own layer only
    assert sorted(objective.state_dict()) == [
        "term_state.factt_early.0.proj.weight", "term_state.factt_late.1.proj.weight"]
    x, y = _batch()
    result = objective(x, y, PROGRESS)
    assert list(result.terms) == term_names(spec) == objective.term_names
    s_logits, s_taps = student(x)
    t_logits, t_taps = teacher(x)

    def q(a, reduce, p):  # the attention map, written out in float64
        m = reduce(a.abs().pow(p))
        return m.flatten(1) / m.flatten(1).norm(dim=1, keepdim=True)

    early = ((q(s_taps[0], lambda a: a.sum(1), 2) - q(t_taps[0], lambda a: a.sum(1), 2)) ** 2).mean()
    late = ((q(s_taps[1], lambda a: a.amax(1), 4) - q(t_taps[1], lambda a: a.amax(1), 4)) ** 2).mean()
    torch.testing.assert_close(result.terms["at_early"], 1000 * early.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(result.terms["at_late"], 10 * 0.7 * late.detach(), rtol=1e-10, atol=0)
    for name, i, beta in (("factt_early", 0, 1000.0), ("factt_late", 1, 3.0)):
        w = objective.term_state[name][str(i)].proj.weight
        s = F.normalize(F.conv2d(s_taps[i], w).flatten(1))
        t = F.normalize(t_taps[i].flatten(1))
        want = beta * (s - t).pow(2).sum(1).mean() / (s_taps[i].shape[2] * s_taps[i].shape[3])
        torch.testing.assert_close(result.terms[name], want.detach(), rtol=1e-10, atol=0)


def test_every_nonbaseline_term_changes_the_loss():
    # guards against a term silently computing 0: each of them is > 0 on random models
    student, teacher = _nets()
    x, y = _batch()
    for name, terms in METHODS.items():
        result = Objective({"terms": terms}, student, teacher, INPUT_SHAPE)(x, y, PROGRESS)
        for key, value in result.terms.items():
            assert value.item() > 0, (name, key)


def test_gradient_terms_backpropagate_through_the_input_gradient():
    # the symmetry term's gradient w.r.t. the weights exists only through double backprop
    student, teacher = _nets()
    x, y = _batch()
    objective = Objective({"terms": [{"type": "symmetry", "beta": 1.0}]}, student, None, INPUT_SHAPE)
    objective(x, y, PROGRESS).loss.backward()
    assert student.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "schedule,progress,factor",
    [
        ("constant", Progress(5, 20, 0.04), 1.0),
        ("lr", Progress(5, 20, 0.04), 0.04),
        ("linear", Progress(5, 20, 0.04), 0.75),
        ("linear", Progress(0, 20, 1.0), 1.0),
    ],
)
def test_schedules_scale_beta(schedule, progress, factor):
    assert schedule_factor(schedule, progress) == pytest.approx(factor)
    student, teacher = _nets()
    x, y = _batch()
    student.eval()  # same outputs in both calls
    plain = Objective({"terms": [_at(), {"type": "kd"}]}, student, teacher, INPUT_SHAPE)
    scheduled = Objective({"terms": [_at(schedule=schedule), {"type": "kd"}]}, student, teacher, INPUT_SHAPE)
    a = plain(x, y, progress).terms
    b = scheduled(x, y, progress).terms
    torch.testing.assert_close(b["at"], factor * a["at"], rtol=1e-12, atol=0)
    torch.testing.assert_close(b["kd"], a["kd"], rtol=1e-12, atol=0)


def test_progress_rejects_bad_values():
    with pytest.raises(ValueError, match="epochs"):
        Progress(0, 0)
    with pytest.raises(ValueError, match="epoch"):
        Progress(10, 10)
    with pytest.raises(ValueError, match="lr_factor"):
        Progress(0, 10, -1.0)


BAD_SPECS = [
    ([], "mapping with key 'terms'"),
    ({"terms": []}, "non-empty list"),
    ({"terms": [{"type": "ce"}], "name": "x"}, "unknown key 'name'"),
    ({"terms": ["ce"]}, "must be a mapping"),
    ({"terms": [{"type": "attention"}]},
     "unknown term type 'attention'; allowed: ce, kd, at, factt, grad_at, symmetry, min_l2"),
    ({"terms": [{"beta": 1}]}, "unknown term type None"),
    ({"terms": [_at(mappin="sum")]},
     "unknown key 'mappin'; allowed: beta, form, layers, mapping, name, p, schedule, type"),
    ({"terms": [_at(mapping="mean")]}, "unknown mapping 'mean'; allowed: sum, max"),
    ({"terms": [_at(p=0)]}, "p must be a finite number > 0, got 0"),
    ({"terms": [_at(p=-2)]}, "p must be"),
    ({"terms": [_at(p="2")]}, "p must be"),
    ({"terms": [_at(form="l1")]}, "unknown form 'l1'; allowed: code, paper"),
    ({"terms": [_at(schedule="cosine")]}, "unknown schedule 'cosine'; allowed: constant, lr, linear"),
    ({"terms": [_at(beta=-1)]}, "beta must be a finite number >= 0, got -1"),
    ({"terms": [_at(beta="1e3")]}, "beta must be"),
    ({"terms": [_at(beta=True)]}, "beta must be"),
    ({"terms": [_at(beta=float("inf"))]}, "beta must be"),
    ({"terms": [{"type": "kd", "T": 0}]}, "T must be"),
    ({"terms": [{"type": "kd", "alpha": 1.5}]}, "alpha must be"),
    ({"terms": [{"type": "kd", "p": 2}]}, "unknown key 'p'"),
    ({"terms": [_at(layers=[])]}, "layers must be"),
    ({"terms": [_at(layers=[-1])]}, "layers must be"),
    ({"terms": [_at(layers=[0, 0])]}, "layers must be"),
    ({"terms": [_at(layers="some")]}, "layers must be"),
    ({"terms": [{"type": "factt", "layers": [1.5]}]}, "layers must be"),
    ({"terms": [{"type": "grad_at"}]}, "key 'beta' is required"),
    ({"terms": [{"type": "symmetry"}]}, "key 'beta' is required"),
    ({"terms": [{"type": "min_l2"}]}, "key 'beta' is required"),
    ({"terms": [{"type": "ce"}, {"type": "ce"}]}, "term name 'ce' appears twice; give the terms distinct 'name' keys"),
    ({"terms": [{"type": "ce", "name": "x"}, _at(name="x")]}, "term name 'x' appears twice"),
    ({"terms": [_at(), _at(layers=[1])]}, "term name 'at' appears twice"),
    ({"terms": [{"type": "ce", "name": ""}]}, "name must be letters, digits"),
    ({"terms": [{"type": "ce", "name": "loss.ce"}]}, "name must be letters, digits"),
    ({"terms": [{"type": "ce", "name": "2ce"}]}, "name must be letters, digits"),
    ({"terms": [{"type": "ce", "name": 3}]}, "name must be letters, digits"),
    ({"terms": [{"type": "factt", "name": "update"}]}, "name 'update' is taken by torch's ModuleDict"),
    ({"terms": [{"type": "ce"}], "plugins": "x"}, "plugins must be a list"),
]


@pytest.mark.parametrize("spec,needle", BAD_SPECS)
def test_validate_method_rejects_bad_specs(spec, needle):
    with pytest.raises(ValueError) as err:
        validate_method(spec)
    assert needle in str(err.value)


def test_the_built_in_term_names_are_free_module_dict_keys():
    # at.method asks torch only about other names (at.lazy: the grid checks built-in terms
    # without torch), so the built-in ones must never collide with ModuleDict's attributes
    from at.terms import BUILT_IN_TERM_TYPES

    assert BUILT_IN_TERM_TYPES == {"ce", "kd", "at", "factt", "grad_at", "symmetry", "min_l2"}
    assert not [name for name in BUILT_IN_TERM_TYPES if hasattr(nn.ModuleDict(), name)]


def test_validate_method_names_the_term_index():
    with pytest.raises(ValueError, match=r"method term 1 \(type 'at'\)"):
        validate_method({"terms": [{"type": "ce"}, _at(p=0)]})


def test_validate_method_accepts_every_named_method_and_helpers():
    for terms in METHODS.values():
        assert validate_method({"terms": terms}) is None
    assert not requires_teacher({"terms": METHODS["baseline"]})
    assert not requires_teacher({"terms": METHODS["symmetry"]})
    assert requires_teacher({"terms": METHODS["grad_at"]})
    assert term_names({"terms": METHODS["at+kd"]}) == ["kd", "at"]
    assert term_names({"terms": [{"type": "ce", "name": "xent"}, _at(name="at_0", layers=[0])]}) == ["xent", "at_0"]


@pytest.mark.parametrize("name", ["kd", "at-sum-p2", "factt", "grad_at"])
def test_teacher_terms_without_teacher_are_refused(name):
    student, _ = _nets()
    with pytest.raises(ValueError, match="need a teacher"):
        Objective({"terms": METHODS[name]}, student, None, INPUT_SHAPE)


def test_methods_without_teacher_terms_run_without_teacher():
    student, _ = _nets()
    x, y = _batch()
    for name in ("baseline", "symmetry", "min_l2"):
        result = Objective({"terms": METHODS[name]}, student, None, INPUT_SHAPE)(x, y, PROGRESS)
        assert torch.isfinite(result.loss)


def test_layer_errors_name_layers_and_shapes():
    student, teacher = _nets()
    with pytest.raises(ValueError, match="tap index 2 out of range"):
        Objective({"terms": [_at(layers=[2])]}, student, teacher, INPUT_SHAPE)
    other = TapNet(3, stride2=1).double().eval().requires_grad_(False)
    with pytest.raises(ValueError, match=r"tap 1 has \(C, H, W\) \(4, 4, 4\) in the student and \(6, 8, 8\)"):
        Objective({"terms": [_at()]}, student, other, INPUT_SHAPE)
    # tap 0 alone matches
    Objective({"terms": [_at(layers=[0])]}, student, other, INPUT_SHAPE)
    wrong_classes = TapNet(3, classes=7).double().eval().requires_grad_(False)
    with pytest.raises(ValueError, match="number of classes"):
        Objective({"terms": [{"type": "kd"}]}, student, wrong_classes, INPUT_SHAPE)


def test_objective_owns_only_the_projections():
    student, teacher = _nets()
    objective = Objective({"terms": METHODS["factt"]}, student, teacher, INPUT_SHAPE)
    # student taps (2, 8, 8) and (4, 4, 4), teacher (3, 8, 8) and (6, 4, 4): two 1x1 convs
    assert sorted(objective.state_dict()) == ["term_state.factt.0.proj.weight", "term_state.factt.1.proj.weight"]
    assert [tuple(p.shape) for p in objective.parameters()] == [(3, 2, 1, 1), (6, 4, 1, 1)]
    assert all(p.dtype == torch.float64 for p in objective.parameters())
    assert list(Objective({"terms": METHODS["at-sum-p2"]}, student, teacher, INPUT_SHAPE).parameters()) == []
    # same widths: identity projections, no parameters
    same = TapNet(2).double().eval().requires_grad_(False)
    assert list(Objective({"terms": METHODS["factt"]}, student, same, INPUT_SHAPE).parameters()) == []


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_construction_leaves_student_bn_statistics_and_modes_alone():
    student, teacher = _nets()
    student.train()
    student.bn2.eval()  # a mixed state must come back as it was
    before = _bn_state(student)
    Objective({"terms": METHODS["at+kd"] + [{"type": "factt"}]}, student, teacher, INPUT_SHAPE)
    after = _bn_state(student)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert student.training and student.bn1.training and not student.bn2.training


@pytest.mark.parametrize("name", ["kd", "at-sum-p2", "factt", "grad_at"])
def test_teacher_bn_statistics_do_not_change(name):
    student, teacher = _nets()
    before = _bn_state(teacher)
    objective = Objective({"terms": METHODS[name]}, student, teacher, INPUT_SHAPE)
    x, y = _batch()
    for _ in range(2):
        objective(x, y, PROGRESS).loss.backward()
    after = _bn_state(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # while the student's, in training mode, did change
    assert not torch.equal(_bn_state(student)["bn1.running_mean"], torch.zeros(2, dtype=torch.float64))


def test_unfrozen_teacher_is_refused_at_the_step():
    student, teacher = _nets()
    objective = Objective({"terms": METHODS["kd"]}, student, teacher, INPUT_SHAPE)
    x, y = _batch()
    teacher.train()
    with pytest.raises(RuntimeError, match="eval"):
        objective(x, y, PROGRESS)
    teacher.eval()
    teacher.fc.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires_grad"):
        objective(x, y, PROGRESS)


@pytest.mark.parametrize("name", ["at+kd", "factt", "grad_at", "symmetry"])
def test_objective_under_bf16_autocast(name):
    student, teacher = _nets(dtype=torch.float32)
    objective = Objective({"terms": METHODS[name]}, student, teacher, INPUT_SHAPE)
    x, y = _batch(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = objective(x, y, PROGRESS)
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
    result.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())
    if name in ("grad_at", "symmetry"):
        # gradient methods run the networks in float32: same result as without autocast
        reference = objective(x, y, PROGRESS)
        torch.testing.assert_close(result.loss, reference.loss, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ with the project's models


@pytest.mark.parametrize("name", ["at+kd", "factt", "grad_at"])
def test_objective_with_wrn_student_and_teacher(name):
    models = pytest.importorskip("at.models")
    torch.manual_seed(0)
    student = models.build("wrn-10-1")
    teacher = models.build("wrn-10-2").eval().requires_grad_(False)
    before = _bn_state(teacher)
    objective = Objective({"terms": METHODS[name]}, student, teacher, input_shape=(3, 16, 16))
    if name == "factt":
        # WRN-10-1 groups have 16/32/64 channels, WRN-10-2 32/64/128: three projections
        assert [tuple(p.shape) for p in objective.parameters()] == [(32, 16, 1, 1), (64, 32, 1, 1), (128, 64, 1, 1)]
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])  # WRN pools globally: 16x16 is cheaper
    result = objective(x, y, PROGRESS)
    assert list(result.terms) == [t["type"] for t in METHODS[name]]
    assert torch.isfinite(result.loss) and result.logits.shape == (2, 10)
    assert all(v.item() > 0 for v in result.terms.values())
    result.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    after = _bn_state(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_objective_symmetry_on_nin_thin_without_bn():
    models = pytest.importorskip("at.models")
    torch.manual_seed(0)
    student = models.build("nin-thin-nobn")
    objective = Objective({"terms": METHODS["symmetry"]}, student, None, input_shape=(3, 16, 16))
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])  # NIN pools globally: 16x16 is cheaper
    result = objective(x, y, PROGRESS)
    assert torch.isfinite(result.loss) and result.terms["symmetry"].item() > 0
    result.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())

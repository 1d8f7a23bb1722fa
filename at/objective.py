"""A method's objective: its terms built for one student (and teacher), and one step's loss.

The training side of at.method (which reads and checks method specs without torch, at.lazy):
`Objective` composes the resolved terms of a spec into the step loss
sum_k beta_k * s_k(progress) * term_k.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from at.attention import at_least_float32, forward_with_input_gradient, full_precision
from at.method import BoundTerm, Method, Progress, StepInputs, StepResult, TeacherOutput
from at.term_type import GradientSource


def _split_output(output: object, who: str) -> tuple[Tensor, list[Tensor]]:
    if not (isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], (tuple, list))):
        raise ValueError(f"the {who} must return (logits, taps) with taps a list of activations")
    return output[0], list(output[1])


def _dry_run(model: nn.Module, input_shape: tuple[int, ...], who: str) -> tuple[Tensor, list[Tensor]]:
    """One forward pass of a zero batch, to learn the shapes of logits and taps.

    Eval mode (BatchNorm uses, and does not update, its running statistics) and no_grad; every
    submodule's training flag is restored afterwards, whatever it was.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        # eagerly, should the model be compiled: a dry run is no reason to compile it
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            output = model(torch.zeros((2, *input_shape), device=device, dtype=dtype))
    finally:
        for module, flag in flags:
            module.training = flag
    return _split_output(output, who)


class Objective(nn.Module):
    """The loss of one training step of a method, for one student (and teacher).

    Its only parameters/state are those of its terms (the F-ActT projections), in the
    submodule `term_state.<term name>`: add `objective.parameters()` to the optimizer and save
    `objective.state_dict()` in the checkpoint. The student and teacher are kept outside its
    module tree (their state dicts stay separate); the trainer owns them, moves them to the
    device, freezes the teacher (eval mode, requires_grad False: checked at every step) and
    sets the student's mode.

    Precision: without gradient terms the networks run under the caller's autocast and every
    loss is computed in float32. With a gradient term (one that reads input gradients:
    grad_at, symmetry, min_l2) the whole step, networks included, runs with autocast off
    (float32): the input gradients are differentiated a second time, and we prefer an exact
    double backprop to bf16 speed there (the paper's gradient experiments use the small
    NIN-thin).
    """

    def __init__(
        self,
        spec: Method | dict,
        student: nn.Module,
        teacher: nn.Module | None = None,
        input_shape: tuple[int, ...] = (3, 32, 32),
    ) -> None:
        super().__init__()
        # a run spec's method comes resolved (at.spec); a dict (a test's, a notebook's) is checked here
        self.terms = list(Method.resolve(spec).terms)
        self._types = [term.kind for term in self.terms]
        need_teacher = [term.name for term, kind in zip(self.terms, self._types) if kind.needs_teacher]
        if need_teacher and teacher is None:
            raise ValueError(f"method terms {need_teacher} need a teacher, but none was given")
        self.needs_teacher = bool(need_teacher)
        self._gradients = frozenset().union(*(kind.input_gradients for kind in self._types))
        self.needs_teacher_gradient = GradientSource.TEACHER in self._gradients
        self.has_gradient_terms = bool(self._gradients)
        # A plain tuple: nn.Module does not register what it holds as submodules.
        self._nets = (student, teacher if self.needs_teacher else None)
        self.term_state = nn.ModuleDict()
        self._bound = [BoundTerm(term.name, term.options) for term in self.terms]
        if any(kind.compares_logits or kind.tap_pairs for kind in self._types):
            self._check_shapes(tuple(input_shape))

    @property
    def term_names(self) -> list[str]:
        return [term.name for term in self.terms]

    def _check_shapes(self, input_shape: tuple[int, ...]) -> None:
        """Check what each term compares on a dry run, pick its tap pairs and build its state."""
        student, teacher = self._nets
        s_logits, s_taps = _dry_run(student, input_shape, "student")
        t_logits, t_taps = _dry_run(teacher, input_shape, "teacher")
        for term, kind, bound in zip(self.terms, self._types, self._bound):
            where = f"term {term.name!r}"
            if kind.compares_logits and s_logits.shape != t_logits.shape:
                raise ValueError(
                    f"{where}: student logits {tuple(s_logits.shape[1:])} and teacher logits "
                    f"{tuple(t_logits.shape[1:])} differ in the number of classes"
                )
            if not kind.tap_pairs:
                continue
            layers = term.options["layers"]
            if layers == "all":
                if len(s_taps) != len(t_taps):
                    raise ValueError(
                        f"{where} with layers 'all': the student has {len(s_taps)} taps "
                        f"and the teacher {len(t_taps)}; list the tap indices to pair"
                    )
                layers = list(range(len(s_taps)))
            pairs = []
            for i in layers:
                if i >= len(s_taps) or i >= len(t_taps):
                    raise ValueError(
                        f"{where}: tap index {i} out of range (student has "
                        f"{len(s_taps)} taps, teacher {len(t_taps)})"
                    )
                s_shape, t_shape = tuple(s_taps[i].shape[1:]), tuple(t_taps[i].shape[1:])
                if len(s_shape) != 3 or len(t_shape) != 3:
                    raise ValueError(
                        f"{where}: tap {i} must be (C, H, W) activations, got {s_shape} in the "
                        f"student and {t_shape} in the teacher"
                    )
                if kind.same_spatial and s_shape[1:] != t_shape[1:]:
                    raise ValueError(
                        f"{where}: tap {i} has (C, H, W) {s_shape} in the student and "
                        f"{t_shape} in the teacher; spatial sizes must match"
                    )
                pairs.append((i, s_shape, t_shape))
            bound.layers = list(layers)
            if kind.build is not None:
                state = kind.build(pairs)
                first = next(iter(student.parameters()), None)
                if first is not None:
                    state = state.to(device=first.device, dtype=first.dtype)
                self.term_state[term.name] = state
                bound.state = state

    def _check_frozen(self, teacher: nn.Module) -> None:
        if any(module.training for module in teacher.modules()):
            raise RuntimeError("the teacher must be frozen: call teacher.eval() (BatchNorm in eval mode)")
        if any(p.requires_grad for p in teacher.parameters()):
            raise RuntimeError("the teacher must be frozen: set requires_grad_(False) on its parameters")

    @property
    def teacher_pass(self) -> tuple[bool, bool] | None:
        """How this objective runs its teacher on a batch: None (no teacher), else (input
        gradient needed, full precision). Objectives of one cohort with the same teacher and
        pass can share one `teacher_output` per batch: it is the same computation."""
        if not self.needs_teacher:
            return None
        return (self.needs_teacher_gradient, self.has_gradient_terms)

    def _precision(self, x: Tensor):
        return full_precision(x) if self.has_gradient_terms else contextlib.nullcontext()

    def teacher_output(self, x: Tensor, y: Tensor) -> TeacherOutput:
        """The teacher's logits and taps on x (and its input gradient for grad_at), frozen."""
        teacher = self._nets[1]
        self._check_frozen(teacher)
        with self._precision(x):
            if self.has_gradient_terms:
                x = at_least_float32(x)
            if self.needs_teacher_gradient:
                output, gradient = forward_with_input_gradient(teacher, x, y, create_graph=False)
                logits, taps = _split_output(output, "teacher")
                return TeacherOutput(logits, taps, gradient)
            with torch.no_grad():
                logits, taps = _split_output(teacher(x), "teacher")
            return TeacherOutput(logits, taps)

    def forward(self, x: Tensor, y: Tensor, progress: Progress,
                teacher_output: TeacherOutput | None = None) -> StepResult:
        """The step's loss. `teacher_output` (from `teacher_output`, possibly computed once for
        several objectives) is computed here when not given and a term needs the teacher."""
        student = self._nets[0]
        if self.needs_teacher and teacher_output is None:
            teacher_output = self.teacher_output(x, y)
        gradients: dict[str, Tensor] = {}
        t_logits = t_taps = None
        derived: dict = {}
        if teacher_output is not None:
            t_logits, t_taps, derived = teacher_output.logits, teacher_output.taps, teacher_output.derived
            if teacher_output.input_gradient is not None:
                gradients[GradientSource.TEACHER] = teacher_output.input_gradient
        with self._precision(x):
            if self.has_gradient_terms:
                x = at_least_float32(x)
            if self._gradients & {GradientSource.STUDENT, GradientSource.STUDENT_FLIPPED}:
                output, gradients[GradientSource.STUDENT] = forward_with_input_gradient(student, x, y, create_graph=True)
                s_logits, s_taps = _split_output(output, "student")
                if GradientSource.STUDENT_FLIPPED in self._gradients:
                    _, gradients[GradientSource.STUDENT_FLIPPED] = forward_with_input_gradient(
                        student, x.flip(-1), y, create_graph=True
                    )
            else:
                s_logits, s_taps = _split_output(student(x), "student")
            step = StepInputs(y, s_logits, s_taps, t_logits, t_taps, gradients, derived)

            contributions: dict[str, Tensor] = {}
            for term, kind, bound in zip(self.terms, self._types, self._bound):
                contributions[term.name] = (term.beta * term.factor(progress)) * kind.value(step, bound)
            loss = sum(contributions.values())
        terms = {name: value.detach() for name, value in contributions.items()}
        return StepResult(loss=loss, logits=s_logits, terms=terms)

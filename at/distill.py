"""Transfer losses other than attention: knowledge distillation and full-activation transfer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from at.attention import at_least_float32, check_same_spatial, full_precision


def check_kd_params(T: float, alpha: float) -> None:
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not (0 < T < math.inf):
        raise ValueError(f"KD temperature T must be a finite number > 0, got {T!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 <= alpha <= 1):
        raise ValueError(f"KD alpha must be a number in [0, 1], got {alpha!r}")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    T: float,
    alpha: float,
) -> Tensor:
    """Knowledge distillation (Hinton et al. 2015) as in the authors' code:

        alpha * T^2 * sum_{b,k} p_t log(p_t / p_s) / B  +  (1 - alpha) * mean_b CE(z_s, y)

    with p = softmax(z / T). T^2 keeps the soft term's gradient scale independent of T. The
    teacher's logits are constants (detached). Computed in at least float32 under autocast.
    T and alpha have no default here: the kd term's record holds them (at.terms, T=4 and
    alpha=0.9 as the authors' code), and a term passes its resolved options.
    """
    check_kd_params(T, alpha)
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "kd_loss needs (B, classes) logits of equal shape, got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"kd_loss needs one label per sample: logits {tuple(student_logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    with full_precision(student_logits):
        dtype = torch.promote_types(
            at_least_float32(student_logits).dtype, at_least_float32(teacher_logits).dtype
        )
        z_s = student_logits.to(dtype)
        z_t = teacher_logits.detach().to(dtype)
        log_p_s = F.log_softmax(z_s / T, dim=1)
        log_p_t = F.log_softmax(z_t / T, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / z_s.shape[0]
        ce = F.cross_entropy(z_s, labels)
        return alpha * T * T * kl + (1 - alpha) * ce


# ---------------------------------------------------------------------------------------------
# F-ActT: full-activation transfer
#
# The paper only says "L2 loss on full activations" (its F-ActT column). Our choices:
#
# - Normalisation: each activation is divided by its L2 norm over (C, H, W), per sample, as AT
#   normalises its maps. Without it the loss would mostly ask the student to match the
#   teacher's activation MAGNITUDE, which differs between networks (pre-activation WRN group
#   outputs grow with depth and width) and would need a beta tuned per pair.
# - Reduction: sum of squared differences over channels, mean over batch and H*W, i.e.
#   ||s_hat - t_hat||^2 / (B * H * W). Per sample this lies in [0, 4/(H*W)], the same range as
#   AT's "code" form (mean over B and H*W of (Q_s - Q_t)^2 with ||Q|| = 1), so the same
#   beta = 1000 gives a term of the same size: that is our proposed default (at.method).
# - Projection: where channel counts differ, the STUDENT's activation goes through a learned
#   1x1 convolution to the teacher's channel count (FitNets' regressor on the guided layer).
#   Projecting the frozen teacher instead would let the learned map throw away what the
#   student cannot match. The 1x1 conv has no bias: the compared activations are normalised
#   afterwards, and a bias would only let the regressor absorb the teacher's mean activation
#   that the student should learn to produce. Equal channel counts: no projection (identity).
#   Because of the normalisation, the projection's scale does not change the loss.


class ActivationProjection(nn.Module):
    """Student activation (B, C_s, H, W) -> (B, C_t, H, W) by a learned bias-free 1x1 conv;
    the identity, without parameters, when C_s == C_t."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ActivationProjection: {name} must be an int >= 1, got {value!r}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.proj: nn.Module = (
            nn.Identity()
            if student_channels == teacher_channels
            else nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        )

    def forward(self, student_act: Tensor) -> Tensor:
        if student_act.ndim != 4 or student_act.shape[1] != self.student_channels:
            raise ValueError(
                f"ActivationProjection expects (B, {self.student_channels}, H, W), "
                f"got {tuple(student_act.shape)}"
            )
        return self.proj(student_act)

    def extra_repr(self) -> str:
        return f"{self.student_channels} -> {self.teacher_channels}"


def factt_loss(student_act: Tensor, teacher_act: Tensor) -> Tensor:
    """F-ActT for one layer pair: ||s/||s|| - t/||t|| ||^2 summed over (C, H, W), divided by
    H*W, averaged over the batch (norms per sample over C*H*W; teacher detached).

    The student's activation must already have the teacher's channel count (see
    ActivationProjection).
    """
    check_same_spatial(student_act, teacher_act, "factt_loss")
    if student_act.shape[1] != teacher_act.shape[1]:
        raise ValueError(
            "factt_loss needs equal channel counts (project the student with "
            f"ActivationProjection), got student {tuple(student_act.shape)} and teacher "
            f"{tuple(teacher_act.shape)}"
        )
    with full_precision(student_act):
        s = F.normalize(at_least_float32(student_act).flatten(1), p=2, dim=1, eps=1e-12)
        t = F.normalize(at_least_float32(teacher_act.detach()).flatten(1), p=2, dim=1, eps=1e-12)
        height, width = student_act.shape[2:]
        return (s - t).pow(2).sum(dim=1).mean() / (height * width)


__all__ = ["ActivationProjection", "factt_loss", "kd_loss"]

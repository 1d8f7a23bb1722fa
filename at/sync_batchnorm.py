"""BatchNorm over the global batch of a data-parallel run (the protocol key ``sync_bn``).

In a run on N processes each rank sees B/N images of a batch of B. A plain BatchNorm then
normalises by the mean and variance of those B/N images (noisier statistics than the
one-process run's, and running statistics of rank 0's slices alone). With ``sync_bn: true``
every BatchNorm layer normalises by the statistics of the whole batch, summed over the ranks,
so the run computes what the one-process run computes, up to float rounding.

On CUDA that is torch's own ``nn.SyncBatchNorm`` (fused kernels). torch has no CPU version
(2.14: "SyncBatchNorm expected input tensor to be on GPU"), so on the CPU :class:`GlobalBatchNorm2d`
does it with two differentiable all-reduces: the sums, then the squared
deviations from the global mean. Two passes, like BatchNorm's own variance, rather than a
sum of squares, which loses digits where the mean is large against the spread.

Either way the layer keeps BatchNorm's parameter and buffer names, so checkpoints load into
the plain model (at.checkpoint.load_model) and a one-process run reads them as its own.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GlobalBatchNorm2d", "convert"]


class _SumOverRanks(torch.autograd.Function):
    """A sum over the ranks that gradients flow through: each rank's input enters every rank's
    output, so the gradient of an input is the sum of the output gradients over the ranks."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        x32 = x.float()   # statistics in float32 under autocast too, as BatchNorm computes them
        count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
        totals = all_reduce(torch.cat([x32.sum((0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centered = x32 - mean[None, :, None, None]
        var = all_reduce(centered.pow(2).sum((0, 2, 3))) / n
        y = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                # the running variance is the unbiased one, as in BatchNorm
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
        return y.to(x.dtype)


def convert(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d of ``model`` in place by its global-batch version (torch's
    SyncBatchNorm on CUDA, :class:`GlobalBatchNorm2d` elsewhere), keeping its parameters and
    buffers (the same tensors). Returns ``model``."""
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            if device.type == "cuda":
                new = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            else:
                new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats)
            # the same Parameter and buffer objects: the optimizer built on them stays valid
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert(child, device)
    return model

"""The arithmetic a run trains in: ``precision: auto | float32 | bf16`` (a protocol key).

- ``float32``: everything in float32, contiguous (NCHW) tensors by default.
- ``bf16``: the networks run under bf16 autocast, channels_last tensors by default; the losses
  stay in float32 (at.method and at.attention cast what they need).

The layout (and torch.compile) of each network is an execution option chosen by measurement
(at.execution); the defaults above are what it keeps where the layouts measure the same.
- ``auto``: bf16 where the hardware computes it natively — CUDA, and CPUs with the avx512_bf16 or
  AMX instructions — and float32 elsewhere. On a CPU without native bf16, autocast emulates it
  and is slower than float32 (measured: 680 against 804 images/s for a WRN-16-1 step on a
  2-core EPYC without avx512_bf16), so auto must follow the hardware, never a constant.

The precision a run actually used is recorded in its metrics.json, its MLflow run and the
report's provenance line, because ``auto`` means different things on different machines.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from at import lazy
from at.choices import Compile, Layout, names

torch = lazy.module("torch")   # at.lazy: the schema reads PRECISIONS without torch

class Precision(StrEnum):
    """A protocol's ``precision`` (the module docstring says what each computes in)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BF16 = "bf16"


PRECISIONS = names(Precision)
# CPU flags (Linux /proc/cpuinfo) of instructions that compute bf16 natively
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo does not exist)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def machine(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What computed a run, in words, for its record: the GPU's name, or the CPU's model and the
    threads torch used (speeds differ ~3x between the CPUs a run may land on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    native = ", native bf16" if cpu_has_native_bf16() else ""
    return f"{model} ({torch.get_num_threads()} threads{native})"


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve(precision: str, device: torch.device, flags: set[str] | None = None) -> str:
    """``float32`` or ``bf16``: what ``precision`` means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != Precision.AUTO:
        return precision
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16(flags))
    return (Precision.BF16 if native else Precision.FLOAT32).value


STUDENT, TEACHER = "student", "teacher"   # the roles a network model plays in a cohort


@dataclass(frozen=True)
class Arithmetic:
    """How the tensors of a step are computed, resolved for one device: the precision, and for
    each network, keyed by (role, model name), its memory layout and compile mode (at.execution;
    a network not listed has its precision's usual layout, eager)."""

    device: torch.device
    precision: str  # float32 | bf16
    layouts: tuple[tuple[tuple[str, str], str], ...] = ()
    compiles: tuple[tuple[tuple[str, str], str], ...] = ()

    @property
    def channels_last(self) -> bool:
        """Whether the precision's usual layout is channels_last (bf16)."""
        return self.precision == Precision.BF16

    def layout_of(self, network: tuple[str, str] | None = None) -> str:
        # no network, or one the cohort did not decide: the precision's usual layout
        usual = Layout.CHANNELS_LAST if self.channels_last else Layout.CONTIGUOUS
        return dict(self.layouts).get(network, usual.value)

    def compile_of(self, network: tuple[str, str] | None = None) -> str:
        return dict(self.compiles).get(network, Compile.OFF.value)

    def autocast(self):
        if self.precision == Precision.BF16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def layout(self, x: torch.Tensor, network: tuple[str, str] | None = None) -> torch.Tensor:
        """``x`` in the layout of ``network`` (by default the precision's usual one)."""
        if self.layout_of(network) == Layout.CHANNELS_LAST:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def prepare(self, model: torch.nn.Module, network: tuple[str, str] | None = None) -> torch.nn.Module:
        """Move a model to the device, in the layout of ``network``."""
        model.to(self.device)
        if self.layout_of(network) == Layout.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)
        return model

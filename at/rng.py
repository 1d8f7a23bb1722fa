"""The global random state a training step draws from (dropout; on CUDA the device's own), as
saved in a run's resume state and restored from it (at.member; per rank: at.distributed)."""

from __future__ import annotations

import torch


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

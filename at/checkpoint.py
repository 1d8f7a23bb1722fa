"""Checkpoints: atomic writes, safe loads, clear errors.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads
with ``torch.load(weights_only=True)``: nothing in it can execute code when it is opened.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from at import atomic

FORMAT = "at-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, foreign or from an incompatible version."""


def save(payload: dict, path: Path) -> None:
    """Write ``payload`` to ``path`` so that a reader never sees a partial file.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over the target: a kill at any moment leaves either the old or the new checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_with(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def load(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save`, refusing anything else with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a trusted attention-transfer checkpoint "
            f"(loaded with weights_only=True): {str(e).splitlines()[0]}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not an attention-transfer checkpoint "
            f"(expected format {FORMAT!r}, found {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')!r}; this code reads version {VERSION}"
        )
    return payload


def load_model(path: Path, map_location="cpu"):
    """Rebuild the trained model of a run from its checkpoint: returns ``(model, spec)``.

    The model comes back in eval mode with the checkpoint's weights.
    """
    from at import models

    payload = load(path, map_location)
    spec = payload["spec"]
    model = models.build(spec["student"], num_classes=spec.get("num_classes", 10))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: weights do not fit model {spec['student']!r}: {e}") from e
    model.eval()
    return model, spec

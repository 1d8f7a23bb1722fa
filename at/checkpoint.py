"""Checkpoints: atomic writes, safe loads, clear errors.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads
with ``torch.load(weights_only=True)``: nothing in it can execute code when it is opened.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

from at import atomic, lazy, models
from at.spec import RunSpec

torch = lazy.module("torch")   # at.lazy: the report reads records and digests without torch

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


# What every checkpoint holds; a resume state (``last.pt``) holds more (optimizer, RNG states).
REQUIRED_KEYS = ("spec", "model")


def _torch_reason(error: Exception) -> str:
    """The part of torch's error that says what is wrong with the file, without its advice.

    torch's refusal of a pickled object suggests re-running with ``weights_only=False``: for a
    file of unknown origin that is the advice to run its code, so no message of ours repeats it.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    refused = [line for line in lines if line.startswith("Trying to load unsupported")]
    if refused:
        return f"it holds Python objects that a safe load refuses ({refused[0].rstrip('.')})"
    if not lines:
        return type(error).__name__
    sentences = [s for s in lines[0].split(". ") if "weights_only" not in s]
    return (sentences[0] if sentences else type(error).__name__).rstrip(".")


# A final checkpoint binds the run's other outputs to itself: the sha256 of the bytes of its
# metrics.json and history.csv, as written. The report refuses a metrics.json that no longer
# matches (a hand edit would otherwise render as if measured).
OUTPUT_DIGESTS = "outputs_sha256"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(path: Path, map_location="cpu", required: tuple[str, ...] = REQUIRED_KEYS, mmap: bool = False) -> dict:
    """Load a checkpoint written by :func:`save`, refusing anything else with a clear error.

    ``required`` names the keys the caller needs; a checkpoint without one of them is an error
    that names the missing keys (not a KeyError later). ``mmap`` maps the tensors instead of
    reading them: for a caller that needs only the small entries.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a copy or a write that did not finish")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, IndexError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a trusted attention-transfer checkpoint "
            f"(loaded with weights_only=True): {_torch_reason(e)}"
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
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {' and no '.join(missing)}: it is incomplete")
    return payload


def load_model(path: Path, map_location="cpu"):
    """Rebuild the trained model of a run from its checkpoint: returns ``(model, spec)``, the
    spec resolved (at.spec.RunSpec). The model comes back in eval mode with the checkpoint's
    weights."""
    payload = load(path, map_location)
    try:
        spec = RunSpec.resolve(payload["spec"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: its run spec no longer resolves: {e}") from e
    return _trained(path, payload, spec.student, spec.num_classes), spec


def load_network(path: Path, map_location="cpu"):
    """The trained model of a run's checkpoint as a teacher uses it: returns ``(model, model
    name)``, built from the name and class count its spec records, without resolving that spec.
    The student's spec named the teacher and was resolved already; resolving the teacher's
    spec again would check its method and import its plugins, none of which a frozen network
    needs. The model comes back in eval mode with the checkpoint's weights."""
    payload = load(path, map_location)
    saved = payload["spec"]
    name = saved.get("student") if isinstance(saved, dict) else None
    num_classes = saved.get("num_classes") if isinstance(saved, dict) else None
    if not isinstance(name, str) or isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise CheckpointError(f"checkpoint {path}: its run spec names no model (student and num_classes)")
    return _trained(path, payload, name, num_classes), name


def _trained(path: Path, payload: dict, name: str, num_classes: int):
    model = models.build(name, num_classes=num_classes)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: weights do not fit model {name!r}: {e}") from e
    model.eval()
    return model

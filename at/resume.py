"""What a run's folder holds for its spec, read once per start: where the run continues from.

A run that starts finds, in its folder, one of four situations (:class:`Saved`):

- ``finished``: its final outputs, written for this very spec and teacher: left as they are;
- ``final``: a resume state at the last epoch but outputs missing (Snakemake and DVC delete a
  job's outputs before re-running it): the outputs are written again from it, without training;
- ``resume``: a resume state part-way: training continues from it, exactly;
- ``fresh``: nothing usable (nothing there, ``--force``, or a state saved for another spec or
  another teacher, discarded with a warning): training starts at epoch 1.

The resume state is ``last.pt`` or, where that is missing or unreadable (a kill between the
rotation and the write, a truncated copy), the one before it, ``last.prev.pt``, with a warning.
Each file is read once: the precision a run started in (:func:`started_precision`) and its
situation come from the same read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from at import checkpoint
from at.member import final_outputs_exist
from at.spec import RunSpec


def load_resume_state(out: Path, run_id: str) -> tuple[dict | None, Path | None]:
    """A run's resume state and the file it came from: ``last.pt``, else ``last.prev.pt`` with
    a warning; (None, None) where there is neither; a clear error where neither can be read."""
    out = Path(out)
    current, previous = out / "last.pt", out / "last.prev.pt"
    problems = []
    for path in (current, previous):
        if not path.exists():
            continue
        try:
            saved = checkpoint.load(path)
        except checkpoint.CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"[{run_id}] warning: {problems[0]}; resuming from the state before it, {path} "
                  f"(one epoch is trained again)", flush=True)
        return saved, path
    if problems:
        raise checkpoint.CheckpointError(
            f"run {run_id}: no readable resume state ({'; '.join(problems)}); delete {current} and "
            f"{previous} to start the run again from epoch 1")
    return None, None


@dataclass
class Saved:
    """What a run's folder held when it started: its final checkpoint (when the final outputs
    were all there) and its resume state, each read once."""

    spec: RunSpec
    final: dict | None = None
    state: dict | None = None
    state_path: Path | None = None
    # whether the resume state was saved for this spec (resolved once: precision and situation
    # both ask)
    state_is_this_spec: bool = False

    @classmethod
    def read(cls, spec: RunSpec, force: bool) -> Saved:
        if force:   # retrain: nothing of the folder counts
            return cls(spec)
        out = Path(spec.out_dir)
        final = None
        if final_outputs_exist(out):
            try:
                final = checkpoint.load(out / "checkpoint.pt")
            except checkpoint.CheckpointError:
                final = None   # written again from the resume state, or retrained
        state, path = load_resume_state(out, spec.id)
        return cls(spec, final, state, path, state is not None and spec.same_as(state.get("spec")))

    @property
    def precision(self) -> str | None:
        """The precision the run started in (its resume state's, when saved for this spec)."""
        if self.state_is_this_spec:
            return self.state.get("precision")
        return None

    def situation(self, teacher_sha256: str | None) -> str:
        """finished | final | resume | fresh (the module's docstring), warning about a state
        that is discarded."""
        spec = self.spec
        if self.final is not None and spec.same_as(self.final.get("spec")) \
                and self.final.get("teacher_sha256") == teacher_sha256:
            return "finished"
        if self.state is None:
            return "fresh"
        if not self.state_is_this_spec:
            saved = self.state.get("spec") or {}
            mine = spec.to_dict()
            differing = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            print(f"[{spec.id}] warning: discarding {self.state_path}: it was saved for a different spec "
                  f"(differs in {differing}); starting from epoch 1", flush=True)
            return "fresh"
        if self.state.get("teacher_sha256") != teacher_sha256:
            print(f"[{spec.id}] warning: discarding {self.state_path}: its teacher checkpoint has changed "
                  f"since it was saved; starting from epoch 1", flush=True)
            return "fresh"
        return "final" if self.state["epoch"] >= spec.protocol.epochs else "resume"


def started_precision(saved: list[Saved]) -> str | None:
    """The precision the runs were started in (None where none has a resume state). A run must
    not change arithmetic halfway: ``auto`` resolves by machine, and a job requeued on another
    node, or a pipeline resumed on another laptop, may resolve it differently. States saved for
    another spec do not count (they are discarded anyway); runs started in different precisions
    cannot continue as one cohort."""
    started = {s.spec.id: s.precision for s in saved if s.precision}
    if len(set(started.values())) > 1:
        listed = ", ".join(f"{run} in {p}" for run, p in sorted(started.items()))
        raise ValueError(f"these runs were started in different precisions and cannot resume as one "
                         f"cohort: {listed}; resume them separately, or retrain with --force")
    return next(iter(started.values()), None)


def started_execution(saved: list[Saved]) -> dict:
    """How each network of the runs started executing, by (role, model): ``layout``,
    ``compile`` and the ``runs`` that say so (at.execution; a resume continues as it started).
    A state saved before the choice existed started in its precision's usual layout, eagerly.
    Runs whose states disagree on one network cannot continue as one cohort."""
    from at.execution import default_layout
    from at.precision import STUDENT, TEACHER

    found: dict = {}
    for s in saved:
        if not s.state_is_this_spec:
            continue
        state = s.state
        recorded = state.get("execution")
        if recorded is None:   # saved before layouts and compile were chosen
            usual = default_layout(state.get("precision") or "float32")
            recorded = {"student": {"model": s.spec.student, "layout": usual, "compile": "off"},
                        "teacher": ({"model": s.spec.teacher, "layout": usual, "compile": "off"}
                                    if s.spec.teacher else None)}
        for role, key in ((STUDENT, "student"), (TEACHER, "teacher")):
            entry = recorded.get(key)
            if not entry:
                continue
            network = (role, entry["model"])
            mode = {"layout": entry["layout"], "compile": entry["compile"]}
            if network in found and {k: found[network][k] for k in mode} != mode:
                raise ValueError(
                    f"these runs were started with {role} {entry['model']} executing differently "
                    f"({', '.join(sorted(found[network]['runs']))}: {found[network]['layout']}, compile "
                    f"{found[network]['compile']}; {s.spec.id}: {mode['layout']}, compile {mode['compile']}) and "
                    f"cannot resume as one cohort; resume them separately, or retrain with --force")
            found.setdefault(network, {**mode, "runs": []})["runs"].append(s.spec.id)
    return found

"""One training run's MLflow traffic, without the training: started as a process by
tests/test_tracking_concurrency.py, many at once on one store.

It makes the calls at.train makes for a run, in the same order and through the same
RunTracker: start (tags, every spec parameter, the data set as an input), the history after
each epoch, the final sync, the final metrics and the files as artifacts, FINISHED. What a run
computes between those calls does not touch the store, so leaving it out changes nothing the
store sees, and 16 of these start within seconds of each other (no torch: the spec comes
resolved, as JSON, from the test).

Usage: python tests/tracking_writer.py SPEC_JSON EPOCHS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from at import atomic
from at.tracking import RunTracker


class ResolvedSpec:
    """What RunTracker reads of an at.spec.RunSpec, from the spec's JSON form (``to_dict()``)."""

    def __init__(self, values: dict):
        self._values = values
        for key in ("id", "profile", "dataset", "data_dir", "student", "method_name", "seed"):
            setattr(self, key, values[key])

    def to_dict(self) -> dict:
        return dict(self._values)


def main(spec_file: Path, epochs: int) -> None:
    spec = ResolvedSpec(json.loads(spec_file.read_text()))
    out = Path(spec._values["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    tracker = RunTracker(spec, out / "mlflow_run_id")
    tracker.start(None, tags={"student": spec.student, "teacher": "none", "method": spec.method_name,
                              "seed": spec.seed, "data_md5": "1c190744c9595cc62078be24b4b038fb",
                              "profile": spec.profile, "checkpoint_path": str(out / "checkpoint.pt"),
                              "device": "cpu", "precision": "float32"})
    history = []
    for epoch in range(1, epochs + 1):
        history.append({"epoch": epoch, "lr": 0.1, "train_loss": 2.3 / epoch, "loss_ce": 2.3 / epoch,
                        "train_error": 90.0 - epoch, "test_error": 89.0 - epoch, "test_error_top5": 50.0,
                        "images_per_s": 100.0 + spec.seed, "epoch_time_s": 0.5})
        tracker.log_epochs(history)
    tracker.sync(history)
    metrics = {"final_test_error": history[-1]["test_error"], "best_test_error": history[-1]["test_error"],
               "student_params": 78042, "wall_time_s": 1.0}
    atomic.write_text(out / "metrics.json", json.dumps(metrics) + "\n")
    tracker.finish(metrics, [out / "metrics.json"])


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))

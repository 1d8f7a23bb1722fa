"""Render our results beside published references: tables (Markdown, LaTeX, CSV), figures, a README.

Entry point: `render(runs, out_dir, context)`.

Honest reporting (docs/interfaces.md, section at.report):
- every cell shows n (the runs that finished), the mean and the sample std (ddof=1) of their
  final-epoch test error, the reference number and the difference (ours - reference), "—"
  where the cell has no reference (references.yaml is data, not a gate);
- every cell with a baseline also shows its paired difference to it (same seeds only), with a
  95% Student-t interval and whether its sign agrees with the reference's difference;
- a run without metrics.json is *missing*: it is shown as "missing", never as a number, and
  a cell whose runs are all missing has no mean; a metrics.json that is not its run's (run_id,
  profile, data md5) or holds impossible numbers is refused;
- a table the profile does not run (context["not_run"]) shows every cell as "not run", with the
  reason; a cell no run of the grid fills is "not run" as well;
- the reported epoch is the last one (metrics.json's final_epoch), stated per cell and per table;
- the profile's description (data, subset, epochs) is written into every table and figure, and
  its purpose (params.yaml) first of all, so that smoke numbers can never pass for real ones.

Outputs are a pure function of the inputs: everything is sorted, numbers have a fixed format,
there are no timestamps, figures are saved without creation dates; every file is written to a
temporary file beside its destination and renamed into place.

Modules, one concept each:
    inputs          the run list and context, checked; what each run folder holds
    layout          each table's rows, columns, labels and reference numbers
    statistics      mean, std, paired differences and their t intervals (pure functions)
    cells           one summary per cell of a table, from the runs that fill it
    tables          Markdown, LaTeX and CSV
    figures         curves, bars, paired differences; deterministic PNG and PDF
    attention_maps  teacher and student attention maps, inferred from checkpoints
    driver          render(): all of the above into one folder, with a README
"""

from at.report.driver import render
from at.report.inputs import ReportInputError

__all__ = ["render", "ReportInputError"]

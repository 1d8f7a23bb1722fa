"""Render our results beside published references: tables (Markdown, LaTeX, CSV), figures, a README.

Entry point: `render(runs, out_dir, context)`.

Honest reporting (docs/interfaces.md, section at.report):
- every cell shows n (the runs that finished), the mean and the sample std (ddof=1) of their
  final-epoch test error and the reference number ("—" where the cell has none: references.yaml
  is data, not a gate);
- every cell with a baseline also shows its paired difference to it (same seeds only), with a
  95% Student-t interval, beside the reference's own difference (reference Δ) and whether the
  signs agree. The difference to the reference's absolute error (diff = ours − reference) is
  shown only where the profile is on the reference's scale (context["full_scale"]: its protocol
  and data are the full ones); elsewhere it measures the scale, not the method, so the bars
  figure compares the Δs instead;
- a run without metrics.json is *missing*: it is shown as "missing", never as a number, and
  a cell whose runs are all missing has no mean; a metrics.json that is not its run's (run_id,
  profile, data md5) or holds impossible numbers is refused;
- a table the profile does not run (context["not_run"]) gets no file: the README names it once,
  with the reason; a cell no run of the grid fills is "not run";
- the reported epoch is the last one (metrics.json's final_epoch), stated per cell and per table;
- the profile's provenance (data, md5, epochs, seeds, precision, code) is said once, at the top
  of the README; each table file points there, each figure has a one-line footer (profile, data,
  epochs, short commit); the profile's purpose (params.yaml) comes first in the README and in
  every table file, so that smoke numbers can never pass for real ones.

Outputs are a pure function of the inputs: everything is sorted, numbers have a fixed format,
there are no timestamps, figures are saved without creation dates; the folder is rendered beside
its destination and put in its place as a whole, so no file of an earlier render survives. It
replaces only an empty folder or one it wrote (its mark, driver.MARKER, names its files): any
other folder is refused, nothing in it deleted.

Modules, one concept each:
    inputs          the run list and context, checked; what each run folder holds
    layout          each table's rows, columns, labels and reference numbers
    statistics      mean, std, paired differences and their t intervals (pure functions)
    cells           one summary per cell of a table, from the runs that fill it
    labels          mapping functions (F_sum^2) as mathematics: Unicode, LaTeX, mathtext
    tables          Markdown, LaTeX and CSV
    figures         curves, bars, paired differences; footer and legends; deterministic PNG and PDF
    attention_maps  teacher and student attention maps, inferred from checkpoints
    driver          render(): all of the above into one folder, with a README
"""

from at.report.driver import check_replaceable, render
from at.report.inputs import ReportInputError

__all__ = ["check_replaceable", "render", "ReportInputError"]

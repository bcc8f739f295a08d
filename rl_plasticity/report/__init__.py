"""``rlp report``: tables, plots and CSV files over the runs of a sweep (or any folder of runs).

- :mod:`~rl_plasticity.report.runs`: one run directory -> arm, seed, task visits, curves;
- :mod:`~rl_plasticity.report.stats`: mean, 95% percentile-bootstrap interval, IQM, the return relative to
  a fresh network, interpolation;
- :mod:`~rl_plasticity.report.aggregate`: per visit and arm statistics, curve bands, the fresh arm's alignment;
- :mod:`~rl_plasticity.report.plots`: the PNG plots;
- :mod:`~rl_plasticity.report.build`: :func:`make_report`, which writes ``report.md`` and the rest.
"""

from rl_plasticity.report.build import Report, ReportError, make_report
from rl_plasticity.report.stats import Summary, band, interpolate, iqm, relative_summary, summarize

__all__ = [
    "Report",
    "ReportError",
    "Summary",
    "band",
    "interpolate",
    "iqm",
    "make_report",
    "relative_summary",
    "summarize",
]

"""Tables and plots, rendered from stored run records only (never an attack).

* :mod:`asbound.report.console`: the rich tables ``asbound score``, ``transfer`` and ``predict`` print;
* :mod:`asbound.report.runs`: reading run directories (score, transfer, sweep, predict);
* :mod:`asbound.report.tables`: seed 001's tables as pandas DataFrames, rendered to Markdown,
  LaTeX (booktabs) or CSV with their provenance (``asbound table``);
* :mod:`asbound.report.plots`: the figures (``asbound plot``).
"""

from asbound.report.console import predict_table, summary_table, transfer_table

__all__ = ["predict_table", "summary_table", "transfer_table"]

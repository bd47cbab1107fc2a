"""Records of completed runs -> tables, text, plots and a report page.

One module per concern:

- :mod:`~fedbench.reporting.board`: which runs count, one row per run, and the tables built from them
  (leaderboard, versus, steps, expert usage, per-seed values);
- :mod:`~fedbench.reporting.text`: their cells and footnotes, rendered as a rich table, markdown or CSV;
- :mod:`~fedbench.reporting.terminal_table`: the leaderboard fitted to a terminal's width;
- :mod:`~fedbench.reporting.compare`: bytes and rounds to a target accuracy;
- :mod:`~fedbench.reporting.sweep`: a sweep's paired gains over its reference at every value;
- :mod:`~fedbench.reporting.statistics`: t-intervals over seeds, paired differences, Holm;
- :mod:`~fedbench.reporting.plots`: every plot (the PNGs of a run, of a sweep and of the report);
- :mod:`~fedbench.reporting.plot_layout`: row styles, label placement and PNG encoding for the plots;
- :mod:`~fedbench.reporting.html`: the self-contained HTML report page.

The names below are the API the CLI and the scripts use; each is imported from its module on first
access, so ``import fedbench.reporting`` stays cheap (no matplotlib or scipy until a plot or an
interval needs them).
"""

from fedbench.utils.lazy import lazy_exports

_API = {
    # board: tables
    "MixedProtocolsError": "board",
    "UnknownRowError": "board",
    "build_leaderboard": "board",
    "build_seed_values": "board",
    "build_steps": "board",
    "build_usage": "board",
    "build_versus": "board",
    "check_one_protocol": "board",
    "failed_rows": "board",
    "in_flight_runs": "board",
    "per_example_scores": "board",
    # text: tables rendered
    "FORMATS": "text",
    "render": "text",
    # terminal_table
    "UnknownColumnError": "terminal_table",
    "render_terminal": "terminal_table",
    "select_columns": "terminal_table",
    # compare
    "CompareError": "compare",
    "build_compare": "compare",
    "render_compare": "compare",
    # sweep
    "build_sweep": "sweep",
    "render_sweep": "sweep",
    "write_sweep_report": "sweep",
    # statistics
    # plots and the report page
    "plot": "plots",
    "plot_sweep_gain": "plots",
    "write_report": "html",
}

__all__ = sorted(_API)
__getattr__, __dir__ = lazy_exports(__name__, _API)

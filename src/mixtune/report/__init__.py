"""Run reports: PNG plots and one self-contained HTML page per run directory."""

from mixtune.report.html import write_report

__all__ = ["write_report"]

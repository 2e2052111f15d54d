"""``inrun inspect``: what a config or model type would cost (``target``), or what a run
directory holds (``run_dir``)."""

from .run_dir import audit_line, drop_line, inspect_run, is_run_dir, parse_window
from .target import inspect_run_dir, inspect_target

__all__ = ["audit_line", "drop_line", "inspect_run", "inspect_run_dir", "inspect_target", "is_run_dir", "parse_window"]

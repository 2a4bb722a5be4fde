"""defectlens's own error types. The CLI prints these as one line and exits 2 (or 1 for an input
file); anything else is an internal error and keeps its traceback."""

from __future__ import annotations


class DefectlensError(Exception):
    """Base of every error defectlens raises on purpose about what it was given."""

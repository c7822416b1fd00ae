"""Exceptions raised by regate_fx. Each message says what is wrong and how to fix it."""

from __future__ import annotations

__all__ = ["KeepMaskError", "RewriteError"]


class RewriteError(RuntimeError):
    """Some branches of the model cannot run on kept tokens (raised when ``strict=True``).

    Attributes:
        report: the :class:`~regate_fx.report.RewriteReport` naming every refused branch and why.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class KeepMaskError(ValueError):
    """A ``keep_mask`` that cannot be used: wrong shape/dtype/device, kept padding, an empty sample,
    or a model whose graph was not rewritten."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report

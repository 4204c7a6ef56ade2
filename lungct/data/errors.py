"""Errors for bad input data: one line each, naming the file (and row) and the problem.

`DataError` is the base class: a labels CSV, a data folder or a data option that cannot
be used. `ScanError` (a `DataError`) is one scan that cannot be used; the builder skips
it (`data.on_bad_scan="skip"`) or stops (`"fail"`). Both subclass ValueError, so
`lungct.main` prints them as `error: <message>` without a traceback.
"""
from __future__ import annotations

import os


class DataError(ValueError):
  """Input data that cannot be used: a CSV row, a folder layout, a data option."""


class ScanError(DataError):
  """A scan that cannot be used; the message is "<path>: <reason>" on one line."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = str(path)
    self.reason = " ".join(str(reason).split())  # One line, whatever the library said.
    super().__init__(f"{self.path}: {self.reason}")

  def __reduce__(self):  # Picklable across worker processes.
    return (type(self), (self.path, self.reason))

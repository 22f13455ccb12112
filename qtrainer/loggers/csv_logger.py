"""``CSVLogger``: metrics as rows of ``metrics.csv``, hyperparameters in ``hparams.json``."""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Mapping

from qtrainer._io import atomic_write_text
from qtrainer.loggers import _log_dir
from qtrainer.loggers.base import Logger

__all__ = ["CSVLogger"]


class CSVLogger(_log_dir.VersionedLogDir, Logger):
    """Append every ``log_metrics`` call as a row of ``save_dir/name/version_N/metrics.csv``.

    The columns are ``step`` followed by every metric name in the order it first appeared; a
    row leaves the metrics it does not have empty. When a call brings a new name, the file is
    rewritten (atomically) with the wider header, so no earlier row is lost. Each row is on disk
    when ``log_metrics`` returns. Nothing is created until the first write.

    Args:
        save_dir: parent directory of the logs; checked at construction (must be creatable/writable).
        name: sub-directory for this experiment ("" for none).
        version: None for the next free ``version_N``; an int ``N`` for ``version_N``; a str for
            that directory name (an existing ``metrics.csv`` there is extended, not replaced).
    """

    METRICS_FILE = "metrics.csv"

    def __init__(self, save_dir: str | os.PathLike, name: str = "csv_logs", version: int | str | None = None) -> None:
        self._init_log_dir(save_dir, name, version)
        self._columns: list[str] | None = None  # read from disk on the first write

    # -- where: name, save_dir, root_dir, version and log_dir come from VersionedLogDir ----

    @property
    def metrics_file_path(self) -> str:
        return os.path.join(self.log_dir, self.METRICS_FILE)

    # -- writing -------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        owner = type(self).__name__
        row: dict[str, Any] = {k: _log_dir.as_float(k, v, owner) for k, v in metrics.items()}
        if "step" in row:
            raise ValueError(f"{owner}.log_metrics: 'step' is the step column; log the metric under another name")
        row["step"] = "" if step is None else int(step)
        path = self.metrics_file_path
        if self._columns is None:
            self._columns = self._read_header(path)
        new = [k for k in row if k not in self._columns]
        if new or not os.path.exists(path):
            self._columns = self._columns + new
            self._rewrite(path, extra_row=row)
            return
        try:
            with open(path, "a", encoding="utf-8", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns, lineterminator="\n").writerow(row)
        except OSError as exc:
            raise OSError(exc.errno, f"{owner} cannot write {path!r}: {exc.strerror}") from exc

    def log_hyperparams(self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        """Write ``params`` to ``hparams.json`` (``metrics`` are already rows of ``metrics.csv``)."""
        if not isinstance(params, Mapping):
            raise TypeError(f"CSVLogger.log_hyperparams: params must be a mapping, got {type(params).__name__}")
        _log_dir.write_hparams_json(os.path.join(self.log_dir, "hparams.json"), params, type(self).__name__)

    def _read_header(self, path: str) -> list[str]:
        if not os.path.exists(path):
            return ["step"]
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), None)
        return list(header) if header else ["step"]

    def _rewrite(self, path: str, extra_row: dict[str, Any]) -> None:
        """Write the existing rows and ``extra_row`` under the current (wider) header."""
        rows: list[dict[str, Any]] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        rows.append(extra_row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self._columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue(), type(self).__name__)

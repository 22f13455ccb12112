"""Where a logger writes: ``<save_dir>/<name>/version_<N>``, checked early, written atomically (``qtrainer._io``)."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

from qtrainer._io import atomic_write_text
from qtrainer.paths import nearest_existing_ancestor

_VERSION_DIR = re.compile(r"^version_(\d+)$")


def check_save_dir(save_dir: str, owner: str) -> str:
    """Return ``save_dir`` as a path, or raise ``ValueError`` when it cannot be created or written.

    The check walks up to the nearest existing ancestor: it must be a directory we may write to.
    """
    if not isinstance(save_dir, (str, os.PathLike)):
        raise TypeError(f"{owner}(save_dir={save_dir!r}): save_dir must be a path (str or os.PathLike)")
    path = os.fspath(save_dir)
    if not path:
        raise ValueError(f"{owner}(save_dir=''): save_dir must not be empty")
    probe = nearest_existing_ancestor(path)
    if not os.path.isdir(probe):
        raise ValueError(
            f"{owner}(save_dir={path!r}): cannot create the log directory, {probe!r} is a file, not a directory"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{owner}(save_dir={path!r}): the directory {probe!r} is not writable")
    return path


def check_version(version: Any, owner: str) -> int | str | None:
    """Accept None (next free number), an int >= 0, or a non-empty directory name."""
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, (int, str)):
        raise TypeError(f"{owner}(version={version!r}): version must be None, an int >= 0 or a str")
    if isinstance(version, int) and version < 0:
        raise ValueError(f"{owner}(version={version}): version must be >= 0")
    if isinstance(version, str) and (not version or os.sep in version):
        raise ValueError(f"{owner}(version={version!r}): a str version must be a non-empty directory name")
    return version


def next_version(root_dir: str) -> int:
    """One more than the highest ``version_<N>`` directory under ``root_dir`` (0 when there is none)."""
    try:
        names = os.listdir(root_dir)
    except FileNotFoundError:
        return 0
    numbers = [
        int(m.group(1))
        for m in map(_VERSION_DIR.match, names)
        if m and os.path.isdir(os.path.join(root_dir, m.group(0)))
    ]
    return max(numbers) + 1 if numbers else 0


def version_dir_name(version: int | str) -> str:
    return f"version_{version}" if isinstance(version, int) else version


def make_dirs(path: str, owner: str) -> None:
    """Create ``path``; an ``OSError`` names the directory and the logger."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"{owner} cannot create its log directory {path!r}: {exc.strerror}") from exc


def write_hparams_json(path: str, params: Mapping[str, Any], owner: str) -> None:
    """Save hyperparameters as JSON (values JSON cannot hold are written with ``str``)."""
    atomic_write_text(path, json.dumps(dict(params), indent=2, sort_keys=True, default=str) + "\n", owner)


def as_float(name: str, value: Any, owner: str) -> float:
    """A metric value as a float; a ``TypeError`` names the metric when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{owner}.log_metrics: metric {name!r} = {value!r} is not a number") from exc


class VersionedLogDir:
    """``<save_dir>/<name>/version_<N>`` for a logger that sets ``_save_dir``, ``_name``, ``_version``."""

    _save_dir: str
    _name: str
    _version: int | str | None

    def _init_log_dir(self, save_dir: str | os.PathLike, name: str | None, version: int | str | None) -> None:
        """Check and keep ``save_dir``, ``name`` and ``version`` (errors name the logger class)."""
        owner = type(self).__name__
        self._save_dir = check_save_dir(save_dir, owner)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{owner}(name={name!r}): name must be a str")
        self._name = name or ""
        self._version = check_version(version, owner)

    @property
    def name(self) -> str:
        return self._name

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = next_version(self.root_dir)
        return self._version

    @property
    def log_dir(self) -> str:
        return os.path.join(self.root_dir, version_dir_name(self.version))

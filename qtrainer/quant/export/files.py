"""An export's files: the target check, the staging directory, and the hashed two-phase publish.

``check_export_target(prefix)`` says whether an export may be written at ``prefix`` (absent, this
run's own, or ``overwrite``); the callbacks call it before training (``callback_export_prefix``).
Publishing moves the files into place so that no kill leaves a model that looks checked.

An export is a set of model files plus a JSON report next to them (``model.quant.json`` of
``export_quantized_model``, ``model.dynamic_quant.json`` of the dynamic quantization). The files
are written in a staging directory next to the target (``.<stem>.<pid>.XXXX.export-tmp``), then
``publish`` moves them into place in this order:

1. the old report is replaced (atomically) by a *pending* one (``"state": "publishing"``, the run
   id, no hashes): from here on nothing vouches for the files at the target;
2. the model files are renamed into place one by one (files of the old export that the new one
   does not have are removed);
3. the final report is written atomically, last, with the SHA-256 of every file it describes.

``verify_export(prefix)`` (called by ``qtrainer.quant.export.inference`` whenever it opens a model) refuses
a model whose report is pending or whose files do not match the hashes, so a kill between two
renames gives a clear error instead of a mixed model (new ``.pdmodel``, old ``.pdiparams``) that
loads and computes something else. A model without a report (``paddle.jit.save``) or with a report
written before the hashes existed is opened as it is.

Staging directories of killed exports stay behind; ``make_staging_dir`` removes those of the same
target whose process is gone (same host; a directory from another host, or without an owner
file, after a day) before it creates its own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from qtrainer._io import atomic_write_text, fsync_directory, fsync_file
from qtrainer.quant.export.isa import EXPORT_TARGETS, int8_isa, isa_runs_target, target_note

__all__ = ["STATE_COMPLETE", "STATE_PUBLISHING", "ExportIntegrityError", "sha256_file", "make_staging_dir",
           "sweep_stale_staging", "publish", "read_report", "report_run_id", "verify_export", "new_run_id",
           "callback_export_prefix", "check_export_target", "MODEL_FILES", "JSON_SUFFIX"]

logger = logging.getLogger(__name__)

MODEL_FILES = (".pdmodel", ".pdiparams", ".pdiparams.info", ".xml", ".bin", ".onnx")
JSON_SUFFIX = ".quant.json"
STATE_PUBLISHING = "publishing"
STATE_COMPLETE = "complete"
STAGING_SUFFIX = ".export-tmp"
REPORT_SUFFIXES = (".quant.json", ".dynamic_quant.json")
_OWNER_FILE = "owner.json"
_FOREIGN_STALE_SECONDS = 24 * 3600.0
_CHUNK = 1 << 20


class ExportIntegrityError(ValueError):
    """The model files at a prefix are not the export their report describes (interrupted or mixed)."""


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_run_id() -> str:
    """A fresh run identity for the exports a run writes."""
    return uuid.uuid4().hex


def callback_export_prefix(owner: str, export_dir: str | None, log_dir: str, export_kwargs: Mapping[str, Any],
                           run_id: str | None) -> str:
    """The export prefix of a quantization callback (``<export_dir or log_dir/export>/model``), checked
    before training: absent, or this run's own (``run_id`` restored from the checkpoint), or
    ``overwrite=True`` in ``export_kwargs``; otherwise ``FileExistsError`` naming the ways out."""
    directory = export_dir or os.path.join(log_dir, "export")
    prefix = os.path.join(directory, "model")
    try:
        check_export_target(prefix, overwrite=bool(export_kwargs.get("overwrite", False)), run_id=run_id)
    except FileExistsError as err:
        raise FileExistsError(
            f"{owner}: {err}. Checked before training, so the fit does not end by failing there. Ways out: "
            f"{owner}(export_kwargs={{'overwrite': True}}) replaces it, {owner}(export_dir=...) writes "
            "elsewhere, a logger with versioned run directories (TensorBoardLogger/CSVLogger: "
            "<log_dir>/version_N/export) gives every run its own, or resume the run that wrote it "
            "(ckpt_path=...; its export is replaced)"
        ) from err
    return prefix


# ---------------------------------------------------------------------- the target
def check_export_target(path: Any, overwrite: bool = False, run_id: str | None = None) -> str:
    """Check that an export may be written at the prefix ``path``; return it as an absolute path.

    Absent: fine. Present and recorded with ``run_id`` (written earlier by this same run, e.g.
    before it was killed and resumed): it will be replaced. Present otherwise: ``FileExistsError``
    naming the files, unless ``overwrite``. Also refuses a directory, a path with an extension and
    an existing file (``ValueError``). Cheap: the callbacks call it before training.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str (a file prefix), got {type(path).__name__}")
    path = os.fspath(path)
    if not path or path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(
            f"path={path!r} is a directory; the export path is a file prefix, e.g. "
            f"{os.path.join(path or '.', 'model')!r} writes model.pdmodel, model.pdiparams and "
            "model.quant.json there"
        )
    for suffix in MODEL_FILES + (JSON_SUFFIX, ".json"):
        if path.endswith(suffix):
            raise ValueError(
                f"path={path!r} ends with {suffix!r}; give the prefix without extension, e.g. "
                f"{path[: -len(suffix)]!r}"
            )
    if os.path.isfile(path):
        raise ValueError(
            f"path={path!r} is an existing file; the export path is a prefix for new files "
            "(path.pdmodel, path.pdiparams, path.quant.json)"
        )
    existing = [path + s for s in MODEL_FILES + (JSON_SUFFIX,) if os.path.exists(path + s)]
    if existing and not overwrite:
        owner = report_run_id(path)
        if run_id is not None and owner == run_id:
            logger.info("export: %s was written by this run (run_id %s) before; it will be replaced", path, run_id)
            return os.path.abspath(path)
        whose = (f"written by another run (run_id {owner})" if owner is not None
                 else "not written by a qtrainer run with a run id")
        raise FileExistsError(
            f"an export already exists at {path!r} ({', '.join(existing)}; {whose}); pass overwrite=True "
            "to replace it or choose another path"
        )
    return os.path.abspath(path)


def make_export_staging(prefix: str) -> tuple[str, list[str]]:
    """A temporary directory next to the target, and the directories created for it (deepest first)."""
    parent = os.path.dirname(prefix)
    created = []
    directory = parent
    while directory and not os.path.exists(directory):
        created.append(directory)
        directory = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        return make_staging_dir(parent, os.path.basename(prefix)), created
    except OSError as err:
        remove_empty(created)
        raise PermissionError(
            f"cannot write the export to {prefix!r}: {err.strerror or err} ({parent!r} must be a "
            "writable directory)"
        ) from err


def remove_empty(directories: list[str]) -> None:
    for directory in directories:  # deepest first; rmdir refuses non-empty directories
        with contextlib.suppress(OSError):
            os.rmdir(directory)


# ---------------------------------------------------------------------- staging
def make_staging_dir(parent: str, stem: str) -> str:
    """A new staging directory in ``parent`` for the export ``stem``; stale ones are swept first."""
    sweep_stale_staging(parent, stem)
    staging = tempfile.mkdtemp(prefix=f".{stem}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=parent)
    atomic_write_text(os.path.join(staging, _OWNER_FILE),
                      json.dumps({"host": socket.gethostname(), "pid": os.getpid()}), "export")
    return staging


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _is_stale(directory: str) -> bool:
    try:
        with open(os.path.join(directory, _OWNER_FILE)) as handle:
            owner = json.load(handle)
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        host, pid = None, None
    if host == socket.gethostname():
        return not _process_alive(pid)
    try:  # another host's (or an unowned) directory: only when nobody touched it for a day
        return time.time() - os.path.getmtime(directory) > _FOREIGN_STALE_SECONDS
    except OSError:
        return False


def sweep_stale_staging(parent: str, stem: str) -> list[str]:
    """Remove the staging directories of ``stem`` in ``parent`` left by killed exports; return them."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not (name.startswith(f".{stem}.") and name.endswith(STAGING_SUFFIX) and os.path.isdir(path)):
            continue
        if _is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
                logger.info("export: removed %s, the staging directory of an interrupted export", path)
    return removed


# ---------------------------------------------------------------------- publishing
def publish(moves: Mapping[str, str], report_path: str, report: dict[str, Any],
            remove: Sequence[str] = ()) -> dict[str, str]:
    """Move ``{staged file: target}`` into place and write ``report`` (plain JSON data) last; see the
    module docstring.

    ``report`` gets ``state`` and ``sha256`` (``{path relative to the report's directory: hex}``);
    ``remove`` lists files of an earlier export at the target that the new one does not have.
    Returns the hashes.
    """
    base = os.path.dirname(os.path.abspath(report_path))
    hashes = {}
    for source, target in moves.items():
        hashes[os.path.relpath(os.path.abspath(target), base)] = sha256_file(source)
        fsync_file(source)  # on disk before the report vouches for it
    pending = {key: report[key] for key in ("format", "version", "run_id") if key in report}
    pending.update(state=STATE_PUBLISHING, publishing=sorted(hashes))
    atomic_write_text(report_path, json.dumps(pending, indent=2), "export")
    for path in remove:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    for source, target in moves.items():
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        os.replace(source, target)
    final = {**report, "state": STATE_COMPLETE, "sha256": hashes}
    atomic_write_text(report_path, json.dumps(final, indent=2), "export")
    fsync_directory(base)
    return hashes


def publish_export(directory: str, prefix: str, report: Any) -> dict[str, str]:
    """Move an attempt's ``model.*`` files from ``directory`` to ``prefix.*``, the JSON of ``report`` (an
    ``ExportReport``) last with their SHA-256 (``publish``: a kill in between leaves a model our
    loaders refuse); set ``report.files`` and ``report.sha256``, return ``{kind: path}``."""
    files, moves, obsolete = {}, {}, []
    for suffix in MODEL_FILES:
        source = os.path.join(directory, "model" + suffix)
        if os.path.exists(source):
            files[suffix.lstrip(".").replace(".", "_")] = prefix + suffix
            moves[source] = prefix + suffix
        elif os.path.exists(prefix + suffix):
            obsolete.append(prefix + suffix)  # the earlier export's, not part of this one
    files["quant_json"] = prefix + JSON_SUFFIX
    report.files = files
    content = json.loads(json.dumps(report.to_dict(), default=_json_default))
    report.sha256 = publish(moves, prefix + JSON_SUFFIX, content, remove=obsolete)
    return files


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------- reading
def read_report(prefix: str) -> tuple[str, dict[str, Any]] | None:
    """``(path, content)`` of the report next to the model ``prefix``, or None when there is none.

    Raises ``ExportIntegrityError`` when the report exists but is not readable JSON.
    """
    for suffix in REPORT_SUFFIXES:
        path = prefix + suffix
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as handle:
                content = json.load(handle)
        except (OSError, ValueError) as err:
            raise ExportIntegrityError(
                f"the export report {path!r} is unreadable ({err}); the model at {prefix!r} cannot be "
                "trusted: export it again"
            ) from err
        if not isinstance(content, dict):
            raise ExportIntegrityError(f"the export report {path!r} is not a JSON object; export {prefix!r} again")
        return path, content
    return None


def report_run_id(prefix: str) -> str | None:
    """The run id recorded in the report at ``prefix`` (pending or complete), or None."""
    try:
        found = read_report(prefix)
    except ExportIntegrityError:
        return None
    run_id = found[1].get("run_id") if found else None
    return run_id if isinstance(run_id, str) else None


def _warn_if_foreign_target(path: str, report: dict[str, Any]) -> None:
    """Warn when the export was written for CPUs this one is not (e.g. a VNNI model on AVX2)."""
    target = report.get("target")
    name = target.get("name") if isinstance(target, dict) else None
    if name in EXPORT_TARGETS and name != "auto" and not isa_runs_target(int8_isa(), name):
        warnings.warn(
            f"{path!r} was exported for target {name!r} and this CPU's int8 ISA is {int8_isa()!r}: "
            f"{target_note(name)}",
            RuntimeWarning,
            stacklevel=3,
        )


def verify_export(prefix: str, required: Sequence[str] = (".pdmodel", ".pdiparams")) -> bool:
    """Check the model files at ``prefix`` against their report; True when verified, False when no
    report vouches for them (a plain ``paddle.jit.save`` model, or a report without hashes).

    Raises ``ExportIntegrityError`` when the publish was interrupted or a file differs from the
    report's hash (files of two different exports).
    """
    found = read_report(prefix)
    if found is None:
        return False
    path, report = found
    _warn_if_foreign_target(path, report)
    if report.get("state") == STATE_PUBLISHING:
        raise ExportIntegrityError(
            f"the export at {prefix!r} is incomplete: its report {path!r} says a publish was interrupted "
            "(the model files may come from two different exports); export it again (overwrite=True)"
        )
    hashes = report.get("sha256")
    if not isinstance(hashes, dict):
        logger.debug("%s has no file hashes (written before they existed); not verified", path)
        return False
    base = os.path.dirname(os.path.abspath(path))
    names = {os.path.relpath(os.path.abspath(prefix + suffix), base) for suffix in required}
    missing = sorted(names - set(hashes))
    if missing:
        raise ExportIntegrityError(
            f"the export report {path!r} does not describe {missing} (it lists {sorted(hashes)}); the "
            f"files at {prefix!r} are not the export it describes: export it again"
        )
    stem = os.path.relpath(os.path.abspath(prefix), base)
    for name, expected in sorted(hashes.items()):
        if not name.startswith(stem + "."):
            continue  # another model the report describes (e.g. dynamic's test_model/): checked when opened
        file = os.path.join(base, name)
        if not os.path.isfile(file):
            raise ExportIntegrityError(f"{file!r}, listed by the export report {path!r}, is missing: export it again")
        if sha256_file(file) != expected:
            raise ExportIntegrityError(
                f"{file!r} does not match the export report {path!r} (SHA-256 differs): the files at "
                f"{prefix!r} come from different exports or were changed; export it again"
            )
    return True

"""The engine knows nothing of the Trainer: no module under qtrainer/quant/ imports the trainer or the
callbacks (its ``__init__`` re-exports the two quantization callbacks lazily, by name)."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

QUANT = pathlib.Path(__file__).resolve().parents[2] / "qtrainer" / "quant"
FORBIDDEN = ("qtrainer.trainer", "qtrainer.callbacks", "qtrainer.loops", "qtrainer.strategies", "qtrainer.strategy",
             "qtrainer.spawn", "qtrainer.distributed", "qtrainer.checkpointing", "qtrainer.loggers")


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):  # top-level and inside functions alike
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_no_engine_module_imports_the_trainer_or_the_callbacks():
    offending = {str(path.relative_to(QUANT)): name for path in QUANT.rglob("*.py") for name in _imports(path)
                 if name.startswith(FORBIDDEN)}
    assert offending == {}


def test_importing_the_engine_does_not_import_the_quantization_callbacks():
    code = ("import sys, qtrainer.quant; "
            "print(sorted(m for m in sys.modules if m in ('qtrainer.callbacks.qat', 'qtrainer.callbacks.ptq')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=QUANT.parents[1]).stdout.strip().splitlines()[-1]
    assert out == "[]"
    import qtrainer.callbacks
    import qtrainer.quant

    assert qtrainer.quant.QATCallback is qtrainer.callbacks.QATCallback
    assert qtrainer.quant.PTQCallback is qtrainer.callbacks.PTQCallback

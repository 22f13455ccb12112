"""Optional dependencies: import one, or say which extra installs it."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require_extra"]


def require_extra(module: str, extra: str, display: str | None = None, packages: str | None = None) -> ModuleType:
    """The module ``module``; ``ImportError`` naming ``qtrainer[extra]`` (or ``pip install packages``)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{display or module} is not installed: pip install 'qtrainer[{extra}]' "
            f"(or pip install {packages or module})"
        ) from err

"""Where a run's processes meet: rank queries, reductions and barriers.

``SingleProcess`` is the default; the distributed strategy implements the same methods on
``paddle.distributed`` so the Trainer keeps one code path.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SingleProcess"]


class SingleProcess:
    """One process, one device: every reduction is the identity."""

    global_rank = 0
    local_rank = 0
    world_size = 1

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def setup(self) -> None:
        """Prepare the process group (nothing to do for one process)."""

    def wrap_model(self, module):
        """The object whose forward the loops call (DataParallel in a distributed run)."""
        return module

    def all_reduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        return array

    def reduce_boolean_decision(self, decision: bool) -> bool:
        """True when any rank decided True (so that all ranks stop together)."""
        return bool(decision)

    def barrier(self) -> None:
        pass

"""A dataset's error reaches the consumer, named, instead of hanging Paddle's DataLoader.

Paddle 3.3.1's single-process loader waits forever when ``__getitem__`` raises, and its worker
loader raises ``SystemError: Blocking queue is killed`` (see ``qtrainer.data.iteration``). Each
case runs in a child process (run this file as a script) under a hard timeout, so a regression
fails the test instead of hanging the suite.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
TIMEOUT = 15.0  # the child imports paddle (~3 s); a hang is killed here
FAIL_AT = 12  # a user's dataset fails on this sample: batch 6 of 2, after the loaders' prefetch


def _corrupt_folder(tmp_path) -> tuple[str, str]:
    sys.path.insert(0, str(HERE.parent))
    from image_folders import write_folder

    root = write_folder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}}, size=8)
    bad = os.path.join(root, "train", "b", "001.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    return root, bad


def _run(case: str, workers: int, root: str = "-") -> dict:
    """Run ``case`` in a child; kill its whole session after TIMEOUT. Returns the child's facts."""
    from helpers import run_script  # here: the child runs this file with tests/data first on its path

    result = run_script(str(HERE), case, str(workers), root, timeout=TIMEOUT)
    out = result.stdout
    lines = [line for line in out.splitlines() if line.startswith("FACTS ")]
    assert result.returncode == 0 and lines, out[-4000:]
    return json.loads(lines[-1][len("FACTS "):])


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_make_loaders_raises_the_unreadable_image(tmp_path, workers):
    root, bad = _corrupt_folder(tmp_path)
    facts = _run("iterate", workers, root)
    assert facts["type"] == "UnreadableImageError" and facts["path"] == bad and bad in facts["message"]
    assert facts["cause"] == "UnidentifiedImageError"
    assert facts["seconds"] < 5


@pytest.mark.parametrize("workers", [0, 2])
def test_fit_on_make_loaders_raises_the_unreadable_image(tmp_path, workers):
    root, bad = _corrupt_folder(tmp_path)
    facts = _run("fit", workers, root)
    assert facts["type"] == "UnreadableImageError" and facts["path"] == bad
    assert facts["cause"] == "UnidentifiedImageError"


@pytest.mark.parametrize("workers", [0, 2])
def test_fit_on_a_users_failing_loader_raises_its_error(workers):
    facts = _run("fit-user", workers)
    assert facts["type"] == "BrokenSample" and f"sample {FAIL_AT} is broken" in facts["message"]


def test_fit_on_a_users_loader_failing_at_once_raises_instead_of_hanging():
    # The reader thread may die before the Trainer watches it: the error text may then be lost
    # (Paddle printed it), but fit must raise.
    facts = _run("fit-user-first", 0)
    assert facts["type"] in ("BrokenSample", "RuntimeError")
    assert "sample 0 is broken" in facts["message"] or "reader thread stopped" in facts["message"]


def test_a_failed_sample_pickles_with_its_error_and_cause(tmp_path):
    from qtrainer.data import UnreadableImageError
    from qtrainer.data.iteration import FailedSample

    try:
        try:
            raise OSError("truncated")
        except OSError as cause:
            raise UnreadableImageError("cannot read image 'x.png'", "x.png") from cause
    except UnreadableImageError as error:
        sample = FailedSample(error, 7)
    error = pickle.loads(pickle.dumps(sample)).error
    assert type(error) is UnreadableImageError and error.path == "x.png"
    assert type(error.__cause__) is OSError and str(error.__cause__) == "truncated"


def test_an_unpicklable_error_crosses_as_its_text():
    from qtrainer.data.iteration import FailedSample

    class Local(Exception):  # a local class cannot be pickled
        pass

    error = pickle.loads(pickle.dumps(FailedSample(Local("boom"), 3))).error
    assert type(error) is RuntimeError and str(error) == "Local: boom"


# ------------------------------------------------------------------------- child process
class BrokenSample(Exception):
    """What the user's dataset raises."""


def _child(case: str, workers: int, root: str) -> None:
    import numpy as np
    import paddle
    from paddle import nn

    from qtrainer import ClassificationModule, Trainer
    from qtrainer.data import make_loaders

    class Points(paddle.io.Dataset):
        def __init__(self, fail_at: int) -> None:
            self.fail_at = fail_at

        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int):
            if i == self.fail_at:
                raise BrokenSample(f"sample {i} is broken")
            return np.full([3, 8, 8], i / 16, dtype="float32"), np.int64(i % 2)

    def trainer() -> Trainer:
        return Trainer(max_epochs=1, default_root_dir=root if root != "-" else None, enable_progress_bar=False,
                       logger=False, enable_checkpointing=False, num_threads=1, num_sanity_val_steps=0)

    module = ClassificationModule(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)))
    start = time.monotonic()
    try:
        if case == "iterate":
            train, _ = make_loaders(root, image_size=8, batch_size=2, workers=workers)
            for _ in train:
                pass
        elif case == "fit":
            train, val = make_loaders(root, image_size=8, batch_size=2, workers=workers)
            trainer().fit(module, train, val)
        else:
            fail_at = FAIL_AT if case == "fit-user" else 0
            loader = paddle.io.DataLoader(Points(fail_at), batch_size=2, num_workers=workers)
            trainer().fit(module, loader)
        facts = {"type": None}
    except Exception as error:  # noqa: BLE001 - the facts of whatever was raised are the result
        cause = error.__cause__
        facts = {"type": type(error).__name__, "message": str(error), "path": getattr(error, "path", None),
                 "cause": None if cause is None else type(cause).__name__}
    facts["seconds"] = time.monotonic() - start
    print("FACTS " + json.dumps(facts), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3])


def test_stopping_a_partly_read_loader_is_quick_and_stops_its_thread():
    from helpers import make_loader
    from qtrainer.data.iteration import close_iterator

    iterator = iter(make_loader(n=160, batch_size=8))
    next(iterator), next(iterator)
    thread = iterator._thread
    start = time.perf_counter()
    close_iterator(iterator)
    elapsed = time.perf_counter() - start
    assert not thread.is_alive()
    assert elapsed < 0.9, f"closing took {elapsed:.2f} s (Paddle's own shutdown sleeps 1 s)"


def test_loader_length_is_inf_for_a_loader_without_len():
    import math

    from qtrainer.data.iteration import loader_length

    assert loader_length([1, 2, 3]) == 3
    assert math.isinf(loader_length(iter([1, 2, 3])))


@pytest.mark.parametrize("limit, expected", [(None, 10), (3, 3), (30, 10), (0.25, 2), (0.01, 1), (0.0, 0), (1.0, 10)])
def test_limited_length_of_a_sized_loader(limit, expected):
    from qtrainer.data.iteration import limited_length

    assert limited_length(list(range(10)), limit, "limit_train_batches") == expected


def test_limited_length_of_a_loader_without_len():
    import math

    from qtrainer.data.iteration import limited_length

    assert limited_length(iter([]), 4, "limit_val_batches") == 4
    assert math.isinf(limited_length(iter([]), 1.0, "limit_val_batches"))
    assert limited_length(iter([]), 0.0, "limit_val_batches") == 0
    with pytest.raises(ValueError, match=r"limit_val_batches=0.5 is a fraction but the loader has no length"):
        limited_length(iter([]), 0.5, "limit_val_batches")

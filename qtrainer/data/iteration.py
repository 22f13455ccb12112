"""Loader iterators that stop cleanly and raise a dataset's error in the consumer, instead of hanging.

Why Paddle 3.3.1's ``DataLoader`` needs this (``paddle/io/dataloader/dataloader_iter.py``):

- **One process** (``num_workers=0``): a reader *thread* fetches batches into a C++ blocking
  queue that ``next()`` reads. Its loop catches only ``StopIteration``; any other exception from
  the dataset or the collate function ends the thread without closing or killing the queue, so
  ``next()`` waits forever (``use_buffer_reader=False`` does not help: the read still blocks on
  the queue). The error is only printed by the thread's exception hook.
- **Worker processes**: the worker sends the exception's text; the reader thread kills the queue
  and re-raises it *in the thread*, so ``next()`` raises ``SystemError: Blocking queue is killed``
  and the real error (rebuilt from its message: no ``path``, no cause) is only printed.

Two remedies, used together:

- ``make_loaders``' datasets catch the error in ``__getitem__``, where it happens, and return it
  as a :class:`FailedSample`; :func:`collate_or_fail`
  turns a batch holding one into a one-tensor batch carrying it (Paddle's reader never sees an
  exception and passes the marker through its batch structure, pickled from a worker), and the
  guarded iterator raises the *original* error (its type, message, attributes and cause) in the
  consumer, after stopping the loader.
- :func:`guard_iterator` wraps any Paddle loader iterator (the Trainer wraps every loader it
  iterates): it watches the reader thread, kills the queue when the thread dies without finishing,
  and raises the thread's exception in the consumer instead of ``SystemError``.

:func:`close_iterator` stops a loader iterator's prefetching without Paddle's one-second sleep;
:func:`loader_length` and :func:`limited_length` say how many batches a loop takes from a loader.
"""
from __future__ import annotations

import logging
import math
import pickle
import sys
import threading
import traceback
from typing import Any, Iterable

import numpy as np
from paddle.io.dataloader.collate import default_collate_fn
from paddle.io.dataloader.dataloader_iter import _DataLoaderIterBase, _DataLoaderIterSingleProcess

__all__ = ["FailedSample", "close_iterator", "collate_or_fail", "guard_iterator", "limited_length", "loader_length"]

logger = logging.getLogger(__name__)


class FailedSample:
    """Stands in for a sample whose reading raised ``error``; the guarded iterator raises it.

    Pickled (from a loader worker process), it keeps the error itself when the error pickles
    (type, message, attributes), re-attaches its cause, and adds the worker's traceback as a note.
    """

    def __init__(self, error: BaseException, index: Any) -> None:
        self.error, self.index = error, index

    def __reduce__(self):
        error = self.error
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        direct = error.__cause__ is not None
        cause = error.__cause__ if direct else error.__context__
        return _rebuild_failed_sample, (_picklable(error), None if cause is None else _picklable(cause), direct,
                                        trace, self.index)


def _picklable(error: BaseException) -> BaseException:
    """``error`` itself if it survives pickling, else a ``RuntimeError`` with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to pickle or rebuild means "send the text"
        return RuntimeError(f"{type(error).__name__}: {error}")


def _rebuild_failed_sample(error: BaseException, cause: BaseException | None, direct: bool, trace: str,
                           index: Any) -> FailedSample:
    if direct:
        error.__cause__ = cause
    else:
        error.__context__ = cause
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(f"(raised in a DataLoader worker process reading sample {index!r}; its traceback:)\n{trace}")
    return FailedSample(error, index)


def collate_or_fail(samples: list) -> Any:
    """Paddle's default collation, or ``[uint8 [1], FailedSample]`` when a sample failed.

    The one-element tensor is there because Paddle's reader treats a batch without tensors as the
    end of the data, and cannot move a zero-size tensor out of a worker's shared memory.
    """
    for sample in samples:
        if isinstance(sample, FailedSample):
            return [np.zeros([1], dtype=np.uint8), sample]
    return default_collate_fn(samples)


def _failure_in(batch: Any) -> FailedSample | None:
    if isinstance(batch, list) and len(batch) == 2 and isinstance(batch[1], FailedSample):
        return batch[1]
    return None


class _ReaderWatch:
    """The exception that ended a Paddle loader's reader thread, and whether it died unfinished."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.died = False


def _watch_reader(iterator: _DataLoaderIterBase) -> _ReaderWatch | None:
    """Capture the reader thread's exception; for one process, kill its queue when it dies unfinished."""
    thread = getattr(iterator, "_thread", None)
    if not isinstance(thread, threading.Thread):
        return None
    watch = getattr(thread, "_qtrainer_reader_watch", None)
    if watch is not None:  # persistent workers: the same thread serves every epoch
        return watch
    watch = _ReaderWatch()
    thread._qtrainer_reader_watch = watch

    def capture(_thread: threading.Thread) -> None:  # runs in the dying thread, instead of printing
        watch.error = sys.exc_info()[1]
        logger.debug("the DataLoader reader thread failed", exc_info=True)

    thread._invoke_excepthook = capture  # a per-thread CPython attribute: no global hook is changed
    done, queue = iterator._thread_done_event, iterator._blocking_queue
    if isinstance(iterator, _DataLoaderIterSingleProcess) and queue is not None:
        def kill_queue_if_the_reader_dies() -> None:
            thread.join()
            if not done.is_set():  # the loop ended by an exception: nothing will ever fill the queue
                watch.died = True
                queue.kill()

        threading.Thread(target=kill_queue_if_the_reader_dies, name=f"{thread.name}-watch", daemon=True).start()
    return watch


class _GuardedIterator:
    """A Paddle loader iterator whose failures are raised by ``next()`` (see the module docstring).

    Other attributes are the wrapped iterator's, so code that stops Paddle iterators still works.
    """

    def __init__(self, inner: _DataLoaderIterBase) -> None:
        self._inner = inner
        self._watch = _watch_reader(inner)

    def __iter__(self) -> _GuardedIterator:
        return self

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __next__(self) -> Any:
        try:
            batch = next(self._inner)
        except SystemError:  # "Blocking queue is killed": the reader thread failed
            watch = self._watch
            if watch is None or (watch.error is None and not watch.died):
                raise
            error = watch.error or RuntimeError(
                "the DataLoader's reader thread stopped with an exception before it finished (its traceback "
                "was printed above); the loader's dataset or collate_fn raised it")
        else:
            failure = _failure_in(batch)
            if failure is None:
                return batch
            error = failure.error
        close_iterator(self._inner)
        raise error  # outside the except block: no "during handling of SystemError" chain

    def _try_shutdown_all(self, *args: Any) -> None:
        """Stop the wrapped iterator (the fast way; Paddle's own sleeps a second)."""
        close_iterator(self._inner)


def guard_iterator(iterator: Any) -> Any:
    """``iterator`` wrapped so a Paddle loader's failure is raised by ``next()``; others unchanged."""
    if isinstance(iterator, _DataLoaderIterBase):
        return _GuardedIterator(iterator)
    return iterator


def close_iterator(iterator: Any) -> None:
    """Stop a loader iterator's prefetching (it would keep drawing from the global RNGs).

    Paddle's single-process iterator (the one with ``_shutdown_thread``) polls its prefetch
    thread with ``time.sleep(1)``, so stopping one that has not run to the end (a sanity check,
    ``limit_*_batches``, ``max_steps``, an error) would cost a second: its thread is stopped and
    joined here first, the same steps without the sleep.
    """
    if isinstance(iterator, _GuardedIterator):
        iterator = iterator._inner
    shutdown = getattr(iterator, "_try_shutdown_all", None)
    if shutdown is None:
        return
    thread = getattr(iterator, "_thread", None)
    done = getattr(iterator, "_thread_done_event", None)
    if (hasattr(iterator, "_shutdown_thread") and isinstance(thread, threading.Thread) and done is not None
            and not getattr(iterator, "_shutdown", True)):
        done.set()
        queue = getattr(iterator, "_blocking_queue", None)
        if queue is not None:
            queue.close()  # unblocks a producer waiting to push
        if thread is not threading.current_thread():
            thread.join(timeout=5.0)
    shutdown()



def loader_length(loader: Iterable) -> float:
    """``len(loader)``, or ``math.inf`` for a loader without a length."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return math.inf


def limited_length(loader: Iterable, limit: int | float | None, name: str) -> float:
    """The batches to take from ``loader`` under ``limit`` (the Trainer's ``limit_*_batches``
    argument ``name``): all for None, at most ``limit`` for an int, a fraction (at least one
    batch unless 0.0) for a float; a fraction other than 0.0/1.0 of a loader without a length
    raises ``ValueError``."""
    length = loader_length(loader)
    if limit is None:
        return length
    if isinstance(limit, float):
        if math.isinf(length):
            if limit in (0.0, 1.0):
                return 0 if limit == 0.0 else length
            raise ValueError(f"{name}={limit} is a fraction but the loader has no length; use an int number of batches")
        return max(1, int(length * limit)) if limit > 0 else 0
    return min(length, limit)

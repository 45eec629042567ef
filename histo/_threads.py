"""Run a function that reports through a callback in a thread, as a generator of its reports.

Long work in the library is a generator that yields progress and returns the result (the CLI
wraps it in a progress bar, napari in a ``thread_worker``). Some work reports through a
callback instead (a pool of processes, a slide analysed while the next one waits); this turns
it into such a generator.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from typing import Any

_DONE = object()


def iter_in_thread(
    fn: Callable[..., Any],
    *args,
    thread_name: str = "lungmets-worker",
    cancel: threading.Event | None = None,
    **kwargs,
) -> Generator[Any, None, Any]:
    """Call ``fn(*args, emit=callback, **kwargs)`` in a thread; yield what it emits.

    Parameters
    ----------
    fn : callable
    thread_name : str
    cancel : threading.Event, optional
        Handed to `fn` as ``cancel=``, and set when this generator is closed before `fn`
        returns (the consumer stopped: napari's Cancel, Ctrl-C), so that `fn` can stop
        starting new work.

    Returns
    -------
    Whatever `fn` returns; an exception in `fn` is raised in the caller's thread.
    """
    q: queue.SimpleQueue = queue.SimpleQueue()
    box: dict = {}
    if cancel is not None:
        kwargs["cancel"] = cancel

    def work():
        try:
            box["value"] = fn(*args, emit=q.put, **kwargs)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        finally:
            q.put(_DONE)

    th = threading.Thread(target=work, name=thread_name, daemon=True)
    th.start()
    finished = False
    try:
        while (item := q.get()) is not _DONE:
            yield item
        finished = True
    finally:
        if not finished and cancel is not None:
            cancel.set()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_reporting(gen: Generator, progress: Callable[..., Any] | None = None) -> Any:
    """Run a progress generator to its end, calling ``progress(*step)`` for each step it
    yields (the inverse of `iter_in_thread`); returns what the generator returns."""
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(*step)

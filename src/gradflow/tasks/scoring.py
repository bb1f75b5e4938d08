"""Scoring a batch with a task's reward functions, so that a slow, raising or hanging function
costs the samples it fails on and never the run.

Each function is called on shares of the batch in a pool of worker processes
(`task.reward_workers`), each call under a timeout (`task.reward_timeout_s`; a hung worker is
killed and replaced). A share that fails (raises, times out, returns a wrong count or type) is
scored again sample by sample, so only the samples that fail score 0; those are counted in the
`failed` part. With no workers the functions run in the training process, without a timeout.
"""

import logging
import math
import multiprocessing
import os
import pickle
import threading
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from gradflow.tasks.reward_functions import Batch, RewardFunction, call, load_function

logger = logging.getLogger(__name__)

_worker_functions: list[RewardFunction] = []


def _load_in_worker(functions: list[RewardFunction | tuple]) -> None:
    """Worker initializer: functions named by a spec are imported here; the rest arrive
    pickled."""
    _worker_functions.clear()
    for entry in functions:
        if isinstance(entry, tuple):
            name, spec, weight, style = entry
            entry = RewardFunction(name, load_function(spec), weight, style, spec)
        _worker_functions.append(entry)


def _call_in_worker(index: int, batch: Batch) -> list[float | None]:
    return call(_worker_functions[index], batch)


def _portable(function: RewardFunction) -> RewardFunction | tuple:
    """What a worker process is sent: the spec when there is one, else the function itself."""
    if function.spec:
        return (function.name, function.spec, function.weight, function.style)
    return function


class Scorer:
    """Scores batches with reward functions.

    **Arguments:**

    - `functions`: the functions.
    - `workers`: worker processes (`-1`: one per CPU core; `0`: in this process, no timeout).
    - `timeout_s`: the longest one call (one function on one worker's share) may take.
    """

    def __init__(self, functions: tuple[RewardFunction, ...], *, workers: int, timeout_s: float):
        self.functions = functions
        self.timeout_s = timeout_s
        self.workers = (os.cpu_count() or 1) if workers < 0 else workers
        self._pool = None
        self._pool_lock = threading.Lock()
        self._starting: threading.Thread | None = None
        self._warned: set[tuple[str, str]] = set()
        if self.workers:
            try:
                pickle.dumps([_portable(f) for f in functions])
            except Exception as e:
                logger.warning(
                    "reward functions cannot be sent to worker processes (%s); scoring in this "
                    "process, without a timeout",
                    e,
                )
                self.workers = 0

    def _get_pool(self):
        with self._pool_lock:
            if self._pool is None:
                from pebble import ProcessPool

                context = multiprocessing.get_context("forkserver")
                if all(f.spec for f in self.functions):
                    # Workers import every function by its spec: the fork server need not
                    # import the main script (`__main__`, which pulls in JAX: seconds) first.
                    context.set_forkserver_preload([__name__])
                self._pool = ProcessPool(
                    max_workers=self.workers,
                    initializer=_load_in_worker,
                    initargs=([_portable(f) for f in self.functions],),
                    context=context,
                )
            return self._pool

    def start(self) -> None:
        """Starts the worker processes in the background, so that the first `score` finds them
        running (their start, seconds of imports, overlaps the run's model load and
        compilation); nothing without workers."""
        if not self.workers or self._starting is not None:
            return

        def warm_up() -> None:
            try:
                self._get_pool().schedule(os.getpid).result()
            except Exception:  # the first `score` meets the same failure and handles it
                pass

        self._starting = threading.Thread(target=warm_up, name="gradflow-scorer-start", daemon=True)
        self._starting.start()

    def close(self) -> None:
        """Stops the worker processes."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def _warn(self, function: RewardFunction, error: BaseException) -> None:
        key = (function.name, type(error).__name__)
        if key not in self._warned:
            self._warned.add(key)
            what = "timed out" if isinstance(error, FutureTimeout) else "failed"
            logger.warning(
                "reward %s %s (%s: %s); its samples score 0 and count in reward/failed "
                "(warned once)",
                function.name,
                what,
                type(error).__name__,
                error,
            )

    def _run(self, calls: list[tuple[int, int, int]], batch: Batch) -> list:
        """Runs `(function, start, stop)` calls; each result is a list of values or the error."""
        if not self.workers:
            results = []
            for index, start, stop in calls:
                try:
                    results.append(call(self.functions[index], batch.part(start, stop)))
                except Exception as e:
                    results.append(e)
            return results
        pool = self._get_pool()
        futures = [
            pool.schedule(
                _call_in_worker, args=(index, batch.part(start, stop)), timeout=self.timeout_s
            )
            for index, start, stop in calls
        ]
        results = []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as e:
                results.append(e)
        return results

    def score(self, batch: Batch, which: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Scores a batch.

        **Arguments:**

        - `batch`: the completions and their columns.
        - `which`: the indices of the functions to call, in `functions`.

        **Returns:**

        `(values, failed)`: float32 `[len(which), batch]` (NaN where a function returned `None`,
        0 where it failed) and float32 `[batch]`, the number of functions that failed on each
        sample.
        """
        size = len(batch)
        values = np.zeros((len(which), size), np.float32)
        failed = np.zeros(size, np.float32)
        share = max(1, math.ceil(size / max(self.workers, 1)))
        calls = [
            (f, start, min(start + share, size)) for f in which for start in range(0, size, share)
        ]
        row = {f: r for r, f in enumerate(which)}
        retry = []
        for (index, start, stop), result in zip(calls, self._run(calls, batch), strict=True):
            if isinstance(result, BaseException):
                self._warn(self.functions[index], result)
                if stop - start > 1:
                    retry.extend((index, i, i + 1) for i in range(start, stop))
                else:
                    failed[start] += 1
                continue
            self._place(values, failed, index, row[index], start, result)
        for (index, start, _), result in zip(retry, self._run(retry, batch), strict=True):
            if isinstance(result, BaseException):
                failed[start] += 1
            else:
                self._place(values, failed, index, row[index], start, result)
        return values, failed

    def _place(self, values, failed, index: int, row: int, start: int, result: list) -> None:
        for offset, value in enumerate(result):
            column = start + offset
            if value is None:
                values[row, column] = np.nan
            elif math.isfinite(value):
                values[row, column] = value
            else:
                key = (self.functions[index].name, "non-finite")
                if key not in self._warned:
                    self._warned.add(key)
                    logger.warning(
                        "reward %s returned %s; scored 0 (warned once)",
                        self.functions[index].name,
                        value,
                    )
                failed[column] += 1

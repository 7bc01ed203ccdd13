"""A pool of gloo worker processes on the CPU, started once and reused by many tests.

``pool.run(fn, *args)`` runs ``fn(*args)`` on every rank (``fn`` a module-level function, so it
pickles by name) and returns the per-rank results, rank order; an exception on any rank fails the
test with that rank's traceback. Starting processes costs seconds, a task milliseconds.
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

TIMEOUT_S = 120


def _worker(rank: int, world: int, store: str, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S // 2))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = pickle.loads(task)
        try:
            results.put((rank, True, pickle.dumps(_detached(fn(*args)))))
        except BaseException:  # noqa: BLE001 (reported to the test, which fails)
            results.put((rank, False, traceback.format_exc()))
    # As bench/comm_distributed.py's ranks end: DTensor's caches keep the group's gloo threads
    # alive past destroy_process_group, and one that releases a finished collective while the
    # interpreter finalizes aborts the process; so the ranks meet and the process ends without
    # finalizing (every result was received: the pool sends None after the last one).
    dist.barrier()
    dist.destroy_process_group()
    results.close()
    results.join_thread()
    os._exit(0)


def _detached(value):
    import torch
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, value)


class WorkerPool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self._dir = tempfile.TemporaryDirectory()
        store = os.path.join(self._dir.name, "store")
        self._tasks = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(r, world, store, self._tasks[r],
                                                         self._results), daemon=True)
                       for r in range(world)]
        for p in self._procs:
            p.start()
        self.broken = False

    def run(self, fn, *args) -> list:
        if self.broken:
            raise RuntimeError("the worker pool broke in an earlier test")
        # pickled here, not by the queue: a copy (the queue would share tensors' memory, and
        # an in-place step on a rank would write into the test's tensor)
        task = pickle.dumps((fn, args))
        for q in self._tasks:
            q.put(task)
        got = {}
        try:
            for _ in range(self.world):
                rank, ok, value = self._results.get(timeout=TIMEOUT_S)
                got[rank] = (ok, value)
        except queue.Empty:
            self.broken = True
            self.close()
            raise AssertionError(f"{fn.__name__}: ranks {sorted(set(range(self.world)) - set(got))}"
                                 f" gave no answer in {TIMEOUT_S} s") from None
        errors = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
        if errors:
            # a rank that failed alone may have left the others in a collective: start afresh
            self.broken = len(errors) < self.world
            if self.broken:
                self.close()
            raise AssertionError(f"{fn.__name__} failed\n" + "\n".join(errors))
        return [pickle.loads(got[r][1]) for r in range(self.world)]

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        self._dir.cleanup()

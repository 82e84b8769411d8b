"""Two forwards at once on a multi-core CPU: one on the caller's thread, one on a side thread.

A decode step feeds one token per row, so its matmuls are small: at a rollout's batch sizes they do
not keep several cores busy, and two decode forwards of different models (the policy's and the
env's reference LM) take less time side by side, each on part of the cores, than one after the
other, each on all of them. Measured on 2 cores (the shipped LM, two ``CachedLM`` s stepped 24
times, median of 5):

    batch                            32        64        256
    one after the other (2 threads)  16.1 ms   23.1 ms   58.9 ms
    side by side (1 thread each)     11.8 ms   18.1 ms   54.4 ms

While a :class:`SideThread` is open, the caller runs on ``n - n // 2`` of torch's ``n`` CPU threads
and the side thread on ``n // 2``; ``close()`` gives the caller its ``n`` back. The split lasts for
the whole block of steps, not for each call: splitting and restoring around every step was slower
than no side thread at all (0.97x on the rollout at batch 64), most likely because the caller's
parallel regions at full width between the calls leave OpenMP workers spinning, which then compete
with the side thread for the cores.

``alongside(fn, *args)`` runs ``fn(*args)`` on the side thread during its ``with`` body and waits
for it on leaving (re-raising its exception; when both raise, ``fn``'s, with the body's as its
``__context__``), so nothing of ``fn`` runs past the block. The side thread gets the caller's grad
and inference modes and CPU autocast (dtype and weight-cast cache), which torch keeps per thread.
The two functions must not share mutable state: not the same model, nor one whose mode the other
toggles (an adapter's reference, which switches the adapter off on the policy's own layers), and
neither may write an argument in place that the other reads.

Results are the same function of the inputs on either thread, but not always the same bits: a
kernel may round differently at another thread count (on this CPU, scaled-dot-product attention
with one query differs by ~1e-7 between 1 and 2 threads; the matmuls agree bit for bit), as any
change of ``torch.set_num_threads`` may. Runs with the same seeds and thread count repeat exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class SideThread:
    """One worker thread that runs a function alongside the caller, with torch's CPU threads split
    between them until :meth:`close` (or the end of ``with SideThread() as side:``)."""

    def __init__(self):
        self.threads = torch.get_num_threads()  # the caller's, given back by close()
        self.side_threads = max(1, self.threads // 2)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix="side-thread")
        torch.set_num_threads(max(1, self.threads - self.side_threads))

    @staticmethod
    def useful(device: torch.device | str) -> bool:
        """Whether a side thread can speed up work on ``device``: a CPU with at least 2 torch threads."""
        return torch.device(device).type == "cpu" and torch.get_num_threads() >= 2

    @contextlib.contextmanager
    def alongside(self, fn: Callable, *args) -> Iterator[Future]:
        """Run ``fn(*args)`` on the side thread while the ``with`` body runs on the caller's; yields
        its future (``future.result()`` after the block is ``fn``'s return value).

        Raises ``RuntimeError`` after :meth:`close`, and ``fn``'s exception on leaving the block."""
        if self._pool is None:
            raise RuntimeError("this SideThread is closed")
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        autocast = dict(enabled=torch.is_autocast_enabled("cpu"), dtype=torch.get_autocast_dtype("cpu"),
                        cache_enabled=torch.is_autocast_cache_enabled())
        side_threads = self.side_threads

        def run():
            torch.set_num_threads(side_threads)  # this thread's own count
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), torch.autocast("cpu", **autocast):
                return fn(*args)

        future = self._pool.submit(run)
        try:
            yield future
        finally:
            future.result()  # even when the body raised: fn must not run on past the block

    def close(self) -> None:
        """Wait for the side thread, end it, and give the caller back all its threads (idempotent)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                pool.shutdown(wait=True)
            finally:  # even if the wait is interrupted (a second Ctrl-C)
                torch.set_num_threads(self.threads)

    def __enter__(self) -> SideThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The progress display every training loop shows: bar, count, live status, elapsed, and an ETA.

The ETA is the remaining work divided by the rate measured over this session (completed units /
elapsed time), so it is shown from the first completed unit and stays right however long a unit
takes (rich's default estimate only looks at the last 30 s, so it showed ``-:--:--`` once an
update took longer than that, and about half the true time when it did show). When the output is
not a terminal (redirected to a file, a CI log), rich draws nothing until the end; there the
display prints a plain line instead (all of it on stderr), at most every ``plain_every`` seconds and at completion::

    ppo 12/32 (38%)  elapsed 0:01:10  eta 0:01:57  rm 0.512  gold 0.301  kl 4.120
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


def format_seconds(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(timedelta(seconds=int(round(seconds))))


def eta_seconds(task) -> float | None:
    """Remaining units x (elapsed / units completed in this session), or None before the first one."""
    start = task.fields.get("start_completed", 0)
    done = task.completed - start
    if task.total is None or done <= 0 or not task.elapsed:
        return None
    return max(task.total - task.completed, 0) * task.elapsed / done


class RateETAColumn(ProgressColumn):
    """``eta h:mm:ss`` from the session's measured rate (see the module docstring)."""

    def render(self, task) -> Text:
        return Text(f"eta {format_seconds(eta_seconds(task))}", style="progress.remaining")


class TrainingProgress(Progress):
    """rich's Progress on stderr (stdout stays for results: a benchmark's JSON, ``textgym eval``'s
    table), plus plain periodic lines when stderr is not a terminal."""

    def __init__(self, name: str, plain_every: float = 30.0):
        console = Console(stderr=True)
        # Neither a terminal nor a notebook: the plain lines alone (rich would print its bar once
        # more at the end). What the code inside the block prints to stdout goes to stdout, above
        # the bar only where stdout is the terminal too (not into the bar's stderr when redirected).
        super().__init__(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                         TimeElapsedColumn(), RateETAColumn(), console=console, disable=not self._live_display(console),
                         redirect_stdout=sys.stdout.isatty())
        self.name, self.plain_every = name, plain_every
        self._last_plain = float("-inf")

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields) -> int:
        fields.setdefault("status", "")
        return super().add_task(description, start=start, total=total, completed=completed, visible=visible,
                                start_completed=completed, **fields)

    @staticmethod
    def _live_display(console: Console) -> bool:
        return console.is_terminal or console.is_jupyter

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self._live_display(self.console):
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if task.visible and (finished or now - self._last_plain >= self.plain_every) and task.completed > task.fields["start_completed"]:
            self._last_plain = now
            percent = f" ({100 * task.completed / task.total:.0f}%)" if task.total else ""
            print(f"{self.name} {int(task.completed)}/{int(task.total or 0)}{percent}  elapsed {format_seconds(task.elapsed)}  "
                  f"eta {format_seconds(eta_seconds(task))}  {task.fields.get('status', '')}".rstrip(),
                  file=sys.stderr, flush=True)


def progress_bar(name: str, plain_every: float = 30.0) -> TrainingProgress:
    """``with progress_bar("dpo") as bar: task = bar.add_task("dpo", total=n)``; ``bar.update(task, advance=1, status=...)``."""
    return TrainingProgress(name, plain_every)

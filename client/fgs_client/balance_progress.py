"""The progress line of a balance run: images collected of the plan's, jobs failed, and what the run waits on."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class ProgressLine:
    """One rich progress bar for the whole run (silent without --progress); a context manager while it shows."""

    def __init__(self, console: Console, show: bool, total: int, done: int):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TaskProgressColumn(),
            _RateColumn(),
            TimeRemainingColumn(),
            TextColumn("[red]{task.fields[failures]} failed"),
            console=console,
            disable=not show,
        )
        self._task = self._progress.add_task("submitting", total=total, completed=done, failures=0)

    def __enter__(self) -> ProgressLine:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def describe(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    def advance(self, images: int, failures: int) -> None:
        self._progress.update(self._task, advance=images, failures=failures)


class _RateColumn(TextColumn):
    """Images collected per second over the run (queueing and downloads included; the final line states the
    generation speed on the service)."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} img/s" if speed else "-- img/s", style="green")

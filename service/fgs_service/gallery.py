"""Gallery and compare grid: the images of a set of job records, filtered, sorted, paged or laid out by setting.

Works on job records (`JobQueue.records_of`). A finished, failed or canceled job never changes, and its record
lives until its creation plus FGS_JOB_RECORD_TTL_S (the only expiry a record is given, never deleted before), so
its parsed request and gallery items are kept in `GalleryCache` (per process, bounded in images) until then: a
request reads the tenant's job ids and the records of the jobs still running, and at 10,000 images costs a filter
and a sort of items already built (bench/gallery.py, bench/RESULTS.md).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from fgs_common.job_record import JobRecord
from fgs_common.wire import (
    ClassCount,
    CompareGrid,
    CompareRow,
    CompareRows,
    GalleryItem,
    GalleryPage,
    GallerySort,
    GenerateRequest,
    ImageResult,
)

MAX_CONDITIONING_SHOWN = 16


@dataclass(frozen=True)
class GalleryFilter:
    class_index: int | None = None
    group: str | None = None
    disagrees: bool | None = None
    min_criterion: float | None = None
    max_criterion: float | None = None

    def admits(self, item: GalleryItem) -> bool:
        if self.class_index is not None and item.class_index != self.class_index:
            return False
        if self.group is not None and item.group != self.group:
            return False
        if self.disagrees is not None and item.disagrees is not self.disagrees:
            return False
        if self.min_criterion is not None and (
            item.criterion_value is None or item.criterion_value < self.min_criterion
        ):
            return False
        if self.max_criterion is not None and (
            item.criterion_value is None or item.criterion_value > self.max_criterion
        ):
            return False
        return True


@dataclass
class JobImages:
    """One job's request and results, as stored; its gallery items built once."""

    job_id: str
    request: GenerateRequest
    results: tuple[ImageResult, ...]
    class_names: list[str] | None = None  # its classifier spec's, when it names them
    _items: list[GalleryItem] | None = field(default=None, repr=False)

    @classmethod
    def from_records(cls, records: list[JobRecord]) -> list[JobImages]:
        return [cls(record.job_id, record.request, record.results or ()) for record in records]

    def class_name(self, index: int | None = None) -> str | None:
        """The team's name of class `index` (default: the job's): the spec's name, else the job's prompt for its
        own class; None for another class the spec does not name."""
        index = self.request.class_index if index is None else index
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return self.request.prompt if index == self.request.class_index else None

    def items(self) -> list[GalleryItem]:
        """The job's images as gallery items (built at the first call; read-only afterwards)."""
        if self._items is None:
            self._items = self._build_items()
        return self._items

    def _build_items(self) -> list[GalleryItem]:
        request = self.request
        generation = request.generation_params()
        class_name = self.class_name()
        # model_construct: the values come from our own records, already validated once
        return [
            GalleryItem.model_construct(
                image_id=result.image_id,
                seed=result.seed,
                criterion_value=result.criterion_value,
                predicted_class=result.predicted_class,
                job_id=self.job_id,
                class_index=request.class_index,
                class_name=class_name,
                group=request.group,
                prompt=request.prompt,
                predicted_name=None if result.predicted_class is None else self.class_name(result.predicted_class),
                generation=generation,
                disagrees=None if result.predicted_class is None else result.predicted_class != request.class_index,
            )
            for result in self.results
        ]


class GalleryCache:
    """Parsed jobs in a final state (they never change), least recently used dropped past `max_images` images, each
    until its record expires (its creation plus the records' TTL).

    Keyed by job id with its tenant: an entry is only ever returned for the tenant that owns the job.
    """

    def __init__(self, max_images: int, record_ttl_s: float):
        self.max_images, self.record_ttl_s = max_images, record_ttl_s
        self._jobs: OrderedDict[str, tuple[str, float, JobImages]] = OrderedDict()
        self._images = 0
        self._lock = threading.Lock()

    def get(self, tenant: str, job_id: str) -> JobImages | None:
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None or entry[0] != tenant:
                return None
            if time.time() >= entry[1]:  # its record has expired: so has the job
                self._images -= len(self._jobs.pop(job_id)[2].results)
                return None
            self._jobs.move_to_end(job_id)
            return entry[2]

    def put(self, tenant: str, job: JobImages, created_at: float) -> None:
        """Keep a job in a final state, created (its record written) at `created_at`."""
        with self._lock:
            if job.job_id in self._jobs or len(job.results) > self.max_images:
                return
            self._jobs[job.job_id] = (tenant, created_at + self.record_ttl_s, job)
            self._images += len(job.results)
            while self._images > self.max_images:
                _, (_, _, dropped) = self._jobs.popitem(last=False)
                self._images -= len(dropped.results)

    def __len__(self) -> int:
        return len(self._jobs)


def _sort_key(sort: GallerySort):
    if sort is GallerySort.seed:
        return None
    sign = 1.0 if sort is GallerySort.criterion_asc else -1.0
    # images without a value go last either way
    return lambda item: (item.criterion_value is None, sign * (item.criterion_value or 0.0))


def gallery_page(
    jobs: list[JobImages], where: GalleryFilter, sort: GallerySort, offset: int, limit: int
) -> GalleryPage:
    classes: dict[int, ClassCount] = {}
    groups: set[str] = set()
    items: list[GalleryItem] = []
    for job in jobs:
        if job.request.group is not None:
            groups.add(job.request.group)
        job_items = job.items()
        count = classes.setdefault(
            job.request.class_index,
            ClassCount(
                class_index=job.request.class_index,
                class_name=job.class_name(),
                prompt=job.request.prompt,
                images=0,
            ),
        )
        count.images += len(job_items)
        items += [item for item in job_items if where.admits(item)]
    key = _sort_key(sort)
    if key is not None:
        items.sort(key=key)
    shown_jobs = {item.job_id for item in items[offset : offset + limit]}
    conditioning = []
    for job in jobs:
        if job.job_id in shown_jobs:
            conditioning += [i for i in job.request.conditioning_image_ids if i not in conditioning]
    return GalleryPage(
        items=items[offset : offset + limit],
        total=len(items),
        offset=offset,
        limit=limit,
        classes=sorted(classes.values(), key=lambda c: c.class_index),
        groups=sorted(groups),
        conditioning_image_ids=conditioning[:MAX_CONDITIONING_SHOWN],
    )


def _row_of(item: GalleryItem, rows_by: CompareRows) -> tuple[tuple, str]:
    """The row key (for ordering) and label of an item."""
    setting = item.generation
    if rows_by is CompareRows.omega:
        return (setting.omega,), f"ω={setting.omega:g}"
    if rows_by is CompareRows.criterion:
        return (setting.criterion.value,), setting.criterion.value
    key = (setting.criterion.value, setting.omega, setting.gamma, setting.dropout_p)
    return key, f"{setting.criterion.value} ω={setting.omega:g} γ={setting.gamma:g} p={setting.dropout_p:g}"


def compare_grid(jobs: list[JobImages], class_index: int, rows_by: CompareRows, max_seeds: int) -> CompareGrid:
    """Rows: the settings; columns: the first `max_seeds` seeds; a cell is the first image of that row and seed."""
    chosen = [job for job in jobs if job.request.class_index == class_index]
    items = [item for job in chosen for item in job.items()]
    seeds = sorted({item.seed for item in items})[:max_seeds]
    column = {seed: index for index, seed in enumerate(seeds)}
    rows: dict[tuple, tuple[str, list[GalleryItem | None]]] = {}
    for item in items:
        key, label = _row_of(item, rows_by)
        cells = rows.setdefault(key, (label, [None] * len(seeds)))[1]
        if item.seed in column and cells[column[item.seed]] is None:
            cells[column[item.seed]] = item
    return CompareGrid(
        class_index=class_index,
        class_name=chosen[0].class_name() if chosen else str(class_index),
        rows_by=rows_by,
        seeds=seeds,
        rows=[CompareRow(label=label, cells=cells) for _, (label, cells) in sorted(rows.items())],
    )

"""`balance`: run a balance plan against the service and write the balanced dataset; resumable at any point.

Steps: 1. plan and fingerprint; 2. bind the state file (refuse a different plan); 3. carry the real files;
4. upload the conditioning images (content-addressed: known sha256s are never sent twice) and the classifier;
5. submit pending chunks through /v1/batches (Idempotency-Key derived from the plan, so a crash between the POST
and the state commit gets the same jobs back); 6. poll, download finished jobs (temp name + rename), retry failed
ones; 7. write the layout's index files, manifest.csv and the Hugging Face metadata.csv from the state.
Before 4, nothing is submitted until the checks pass (`fgs_client.preflight`): prompts against the model's classes
(refused unless --force), the classifier's classes against the dataset's, and the classifier on a sample of the
user's images.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from fgs_client.balance_planner import BalancePlan, JobSlot, UnitCounts, build_jobs, parse_target, plan_balance
from fgs_client.balance_state import STATE_NAME, BalanceState
from fgs_client.dataset_readers import RealImage, ScannedDataset, SyntheticImage, read_classifier_spec, read_dataset
from fgs_client.dataset_writer import (
    ManifestRow,
    carry_real_files,
    generation_columns,
    remove_temporary_files,
    write_hf_metadata,
    write_index_files,
    write_manifest,
    write_png_atomic,
)
from fgs_client.generation_options import validation_message
from fgs_client.http_client import ApiError, Client
from fgs_client.preflight import (
    PREFLIGHT_IMAGES_PER_CLASS,
    PREFLIGHT_MAX_IMAGES,
    WELL_FED_ACCURACY,
    match_classes,
    run_preflight,
)
from fgs_client.run_owner import RunOwner
from fgs_common.exceptions import UserInputError
from fgs_common.wire import (
    STORED,
    ClassifierSpec,
    Criterion,
    GenerateRequest,
    GenerationParams,
    JobPublic,
    JobState,
    ModelInfo,
)


@dataclass
class BalanceOptions:
    generation: GenerationParams = field(default_factory=GenerationParams)  # how every image is sampled
    text_only: bool = False  # condition on the prompt alone, never on a real image (the paper's "text only" ablation)
    images_per_job: int = 8
    seed: int = 0
    max_retries: int = 3
    classifier_id: str | None = None
    classifier: Path | None = None
    classifier_spec: Path | None = None
    hardness_stats: Path | None = None
    real_files: str = "link"
    chunk_size: int = 500
    poll_s: float = 0.5
    window: int = 64
    show_progress: bool = True
    force: bool = False  # submit even when the pre-flight refuses (unknown prompts, the classifier's score)

    def generation_fields(self) -> dict:
        """The generation parameters as JSON values (what the plan fingerprint and each request carry)."""
        return self.generation.model_dump(mode="json")


@dataclass
class BalanceReport:
    out: Path
    planned_images: int
    planned_jobs: int
    synthetic_written: int
    real_images: int
    skipped_files: int
    failed_jobs: list[tuple[str, str]] = field(default_factory=list)  # (plan slot, error)
    canceled_jobs: list[tuple[str, str]] = field(default_factory=list)  # canceled on the service, not resubmitted
    retried_jobs: int = 0
    manifest: Path | None = None
    hf_metadata: Path | None = None  # metadata.csv for Hugging Face datasets' imagefolder loader
    generation_speed: float | None = None  # images/s on the service: see BalanceRun._generation_speed

    @property
    def complete(self) -> bool:
        return not self.failed_jobs and not self.canceled_jobs and self.synthetic_written == self.planned_images


def plan_fingerprint(dataset: ScannedDataset, plan: BalancePlan, slots: list[JobSlot], options: BalanceOptions) -> str:
    body = {
        "dataset": dataset.name,
        "classes": dataset.class_names,
        "groups": dataset.groups,
        "entries": [(e.key, e.before, e.to_add) for e in plan.entries],
        "images_per_job": plan.images_per_job,
        "seed": options.seed,
        "generation": options.generation_fields(),
        "jobs": [(s.key, s.seed, s.prompt, [im.rel_path for im in s.conditioning]) for s in slots],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def synthetic_rel_path(dataset: ScannedDataset, slot: JobSlot, index: int) -> str:
    directory = dataset.layout.synthetic_dir(dataset, slot.entry.class_index, slot.entry.group)
    name = f"{slot.file_stem}_{index:03d}.png"
    return f"{directory}/{name}" if directory else name


def check_out_dir(dataset: ScannedDataset, out: Path) -> None:
    if dataset.root is None:
        return
    root, target = dataset.root.resolve(), out.resolve()
    if target == root or target.is_relative_to(root) or root.is_relative_to(target):
        raise UserInputError(f"--out {out} must lie outside the dataset root {dataset.root} (and not contain it)")


def check_balance_options(options: BalanceOptions) -> None:
    """Reject generation settings the service would refuse, before any scan, upload or file write."""
    for name in ("classifier", "classifier_spec", "hardness_stats"):
        path = getattr(options, name)
        if path is not None and not Path(path).is_file():
            raise UserInputError(f"--{name.replace('_', '-')} {path} does not exist")
    if options.classifier is not None and options.classifier_spec is None:
        raise UserInputError(
            "--classifier needs --classifier-spec (the JSON spec: num_classes, input_size, mean, std, output)"
        )
    has_classifier = options.classifier is not None or options.classifier_id is not None
    criterion = options.generation.criterion
    if criterion is not Criterion.none and not has_classifier:
        raise UserInputError(
            f"--criterion {criterion.value} scores images with your classifier: give --classifier FILE with "
            "--classifier-spec SPEC.json (or --classifier-id of one uploaded before), or run without feedback "
            "(--criterion none --omega 0)"
        )
    try:
        GenerateRequest(
            prompt="check",
            class_index=0,
            classifier_id="check" if has_classifier else None,
            **options.generation_fields(),
        )
    except ValidationError as error:
        raise UserInputError(validation_message(error)) from None


# The service's 404 for a referenced object (fgs_service.errors.not_found).
_MISSING_ID = re.compile(r"no (image|classifier) with id '([0-9a-f]+)'")


class BalanceRun:
    def __init__(
        self,
        client: Client,
        dataset: ScannedDataset,
        out: Path,
        plan: BalancePlan,
        options: BalanceOptions,
        console: Console | None = None,
    ):
        self.client = client
        self.dataset = dataset
        self.out = out
        self.plan = plan
        self.options = options
        self.console = console or Console(stderr=True)
        self.slots = build_jobs(plan, dataset, seed=options.seed)
        if options.text_only:
            self.slots = [replace(slot, conditioning=()) for slot in self.slots]
        self.by_key = {s.key: s for s in self.slots}
        self.fingerprint = plan_fingerprint(dataset, plan, self.slots, options)
        self.failures: list[tuple[str, str]] = []
        self.retries_this_run: dict[str, int] = {}
        self.retried = 0
        self.bad_conditioning: set[Path] = set()
        self.classifier_id: str | None = options.classifier_id
        self.classifier_index = list(range(len(dataset.class_names)))  # dataset class -> classifier output
        self._image_ids: dict[Path, str | None] = {}  # conditioning file -> uploaded id, for this run
        self._running = 0  # jobs seen running in the last poll: "generating" rather than "waiting for a worker"
        self._owner: RunOwner | None = None  # the lock on `out` while `run` runs
        self._reopened: set[str] = set()  # failed or canceled before this rerun: resubmitted when found ended
        self._generated: list[tuple[float, float, int]] = []  # (started, finished, images) of jobs collected now

    # 1-2. state
    def run(self) -> BalanceReport:
        check_balance_options(self.options)
        check_out_dir(self.dataset, self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        with RunOwner(self.out) as owner:  # one run, one owner: RunHeld naming the other client
            owner.clear_stop()
            self._owner = owner
            try:
                return self._run_owned()
            finally:
                self._owner = None

    def _run_owned(self) -> BalanceReport:
        state = BalanceState(self.out / STATE_NAME)
        try:
            state.bind_plan(
                self.fingerprint, [(s.key, i, s.num_images) for i, s in enumerate(self.slots)], self.options.chunk_size
            )
            self._reopened = state.reopen_failed()
            # 3. real files; leftovers of an interrupted write
            carry_real_files(self.dataset, self.out, self.options.real_files)
            written_dirs = {
                self.dataset.layout.synthetic_dir(self.dataset, e.class_index, e.group) for e in self.plan.entries
            }
            written_dirs |= {image.rel_path.rpartition("/")[0] for image in self.dataset.images}
            for directory in written_dirs:
                remove_temporary_files(self.out / directory)
            # 4. checks, then the classifier (conditioning images are uploaded per chunk, just before it is submitted)
            if state.pending_chunks() or state.active(1):
                self._check_before_submitting(state)
                self._resolve_classifier(state)
            self._generate(state)
            return self._finish(state)
        finally:
            state.close()

    def _say(self, message: str) -> None:
        """A status line, so that no phase of the run is silent."""
        if self.options.show_progress:
            self.console.print(f"[dim]fgs:[/] {message}", soft_wrap=True, highlight=False)

    def _check_before_submitting(self, state: BalanceState) -> None:
        """Prompts against the model's classes, the classifier's classes against the dataset's, and the classifier
        on the user's own images (once per classifier: its outcome is kept in the state file for the resumes): a
        UserInputError (nothing submitted) for what would ruin the run."""
        self._say("checking prompts against the model")
        check_prompts_against_model(self.client.model_info(), self.dataset, self.console, self.options.force)
        spec = self._classifier_spec()
        if spec is None:
            return
        match = match_classes(spec, self.dataset.class_names)
        self.classifier_index = match.classifier_index
        if match.note:
            self.console.print(f"[yellow]note:[/] {match.note}", soft_wrap=True)
        if self.options.classifier is None:
            self._say("pre-flight skipped: it needs the archive (--classifier), not only --classifier-id")
            return
        key = f"preflight:{self._classifier_digest(with_stats=False)}"
        if recorded := state.meta(key):
            self._say(f"pre-flight done before for this classifier: {recorded}")
            return
        self._say(
            f"pre-flight: scoring the classifier on up to {PREFLIGHT_IMAGES_PER_CLASS} images per class "
            f"({PREFLIGHT_MAX_IMAGES:,} at most)"
        )
        result = run_preflight(self.options.classifier, spec, self.dataset, match)
        if result is None:
            self.console.print(
                "[yellow]warning:[/] pre-flight skipped: scoring the classifier on your images needs torch "
                "(pip install 'fgs[train]')",
                soft_wrap=True,
            )
        elif result.passed and result.well_fed:
            self.console.print(result.summary(), soft_wrap=True)
            state.set_meta(key, result.summary())
        elif result.passed:  # above the threshold yet below what a well-fed classifier scores: said loudly
            self.console.print(f"[bold red]WARNING:[/] {result.warning()}", soft_wrap=True, highlight=False)
            state.set_meta(key, f"{result.summary()}; below {WELL_FED_ACCURACY:.0%}, warned")
        elif self.options.force:
            self.console.print(
                f"[yellow]warning:[/] {result.refusal()} — running anyway (--force)", soft_wrap=True, highlight=False
            )
            state.set_meta(key, f"{result.summary()}; run anyway (--force)")
        else:
            raise UserInputError(result.refusal())

    def _classifier_spec(self) -> ClassifierSpec | None:
        if self.options.classifier_spec is not None:
            return read_classifier_spec(self.options.classifier_spec)
        if self.options.classifier_id is not None:
            return self.client.classifier(self.options.classifier_id).spec
        return None

    def _resolve_classifier(self, state: BalanceState) -> None:
        options = self.options
        if options.classifier is None:
            return
        digest = self._classifier_digest(with_stats=True)
        known = state.meta(f"classifier:{digest}")
        if known:
            self.classifier_id = known
            return
        self._say(f"uploading the classifier {options.classifier.name} (the service checks it in a sandbox)")
        spec = read_classifier_spec(options.classifier_spec)
        uploaded = self.client.upload_classifier(options.classifier, spec, options.hardness_stats)
        state.set_meta(f"classifier:{digest}", uploaded.classifier_id)
        self.classifier_id = uploaded.classifier_id

    def _classifier_digest(self, with_stats: bool) -> str:
        """sha256 of the classifier archive and spec (and its hardness statistics): what the state keys it by."""
        options = self.options
        digest = hashlib.sha256(options.classifier.read_bytes() + options.classifier_spec.read_bytes())
        if with_stats and options.hardness_stats:  # can be several GB (ImageNet-LT at k = 2,048: 0.95 GB): in chunks
            with open(options.hardness_stats, "rb") as stats:
                while chunk := stats.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()

    def _image_id(self, state: BalanceState, image: RealImage) -> str | None:
        """Upload one conditioning image unless its sha256 is known; None when the file does not decode."""
        if image.path not in self._image_ids:
            self._image_ids[image.path] = self._upload_image(state, image)
        return self._image_ids[image.path]

    def _upload_image(self, state: BalanceState, image: RealImage) -> str | None:
        data = image.path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        known = state.uploaded_id(digest)
        if known:
            return known
        try:
            with Image.open(BytesIO(data)) as decoded:
                decoded.load()
        except (OSError, ValueError):
            self.bad_conditioning.add(image.path)
            return None
        uploaded = self.client.upload_image(data, filename=image.path.name)
        state.record_upload(digest, uploaded.image_id)
        return uploaded.image_id

    def _submit_current(self, state: BalanceState, build, submit, first=None):
        """`submit(build())`, and once more after each 404 for a saved conditioning image or classifier id that the
        service no longer has (its tenant deleted it since this run's state saved it): those ids are forgotten and
        uploaded again, where a rerun would otherwise be refused the same way forever. Returns (request, answer)."""
        request = build() if first is None else first
        for _ in range(2):  # at most one forget of the classifier, one of images
            try:
                return request, submit(request)
            except ApiError as error:
                if not self._forget_missing(state, error):
                    raise
            request = build()
        return request, submit(request)

    def _forget_missing(self, state: BalanceState, error: ApiError) -> bool:
        """After a 404 naming an id this run saved: forget the ids the service lost; False for any other error."""
        missing = _MISSING_ID.search(error.message) if error.status == 404 else None
        if missing is None:
            return False
        kind, object_id = missing.groups()
        if kind == "classifier":
            if object_id != self.classifier_id:
                return False
            if self.options.classifier is None:
                raise UserInputError(
                    f"the classifier {object_id} (--classifier-id) is no longer on the service (deleted?): upload it "
                    "again, or give --classifier and --classifier-spec"
                ) from error
            self._say(f"the classifier {object_id} is no longer on the service: uploading it again")
            state.forget_meta_value(object_id)
            self.classifier_id = None
            self._resolve_classifier(state)
            return True
        present = {image.image_id for image in self.client.images()}
        forgotten = state.forget_uploads_except(present)
        self._image_ids = {path: i for path, i in self._image_ids.items() if i is None or i in present}
        if forgotten:
            self._say(f"{forgotten} conditioning images are no longer on the service: uploading them again")
        return forgotten > 0

    def _request(self, state: BalanceState, slot: JobSlot) -> GenerateRequest:
        ids = [self._image_id(state, image) for image in slot.conditioning]
        good = [i for i in ids if i is not None]
        # A pick that does not decode is replaced by the slot's first good pick (deterministic on rerun).
        ids = [i if i is not None else good[0] for i in ids] if good else []
        return GenerateRequest(
            prompt=slot.prompt,
            class_index=self.classifier_index[slot.entry.class_index],
            conditioning_image_ids=ids,
            num_images=slot.num_images,
            classifier_id=self.classifier_id,
            seed=slot.seed,
            group=slot.entry.group,
            **self.options.generation_fields(),
        )

    # 5-6. submit, poll, download
    def _generate(self, state: BalanceState) -> None:
        total = self.plan.total_to_add
        done_images = sum(r.num_images for r in state.rows("done"))
        with self._progress() as progress:
            chunks = state.pending_chunks()
            if chunks:
                self._say(f"submitting the jobs ({len(chunks)} chunks of up to {self.options.chunk_size})")
            task = progress.add_task("submitting", total=total, completed=done_images, failures=0)
            for number, chunk in enumerate(chunks, start=1):
                self._check_stop()
                progress.update(task, description=f"uploading images, submitting jobs ({number}/{len(chunks)})")
                self._submit_chunk(state, chunk, progress, task)
                self._poll_once(state, progress, task)  # download early results while later chunks upload
            while state.active(1):
                if not self._poll_once(state, progress, task):
                    time.sleep(self.options.poll_s)

    def _poll_once(self, state: BalanceState, progress: Progress, task) -> bool:
        """One look at the oldest submitted jobs; True when any of them moved on."""
        self._check_stop()
        moved = False
        self._running = 0
        for row in state.active(self.options.window):
            finished_images = self._advance(state, row)
            if finished_images is not None:
                moved = True
                progress.update(task, advance=finished_images, failures=len(self.failures))
        waiting = "waiting for a worker" if not self._running and not moved else "generating"
        progress.update(task, description=waiting)
        return moved

    def _check_stop(self) -> None:
        """RunStopped when `fgs-client cancel` asked for the run (looked at between chunks and at every poll)."""
        if self._owner is not None:
            self._owner.check_stop()

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TaskProgressColumn(),
            _RateColumn(),
            TimeRemainingColumn(),
            TextColumn("[red]{task.fields[failures]} failed"),
            console=self.console,
            disable=not self.options.show_progress,
        )

    def _submit_chunk(self, state: BalanceState, chunk: int, progress: Progress, task) -> None:
        """Submit a chunk as one batch; when the tenant's queue cannot take it whole, job by job as room frees up."""
        rows = [r for r in state.chunk_rows(chunk) if r.state == "pending"]
        if not rows:
            return
        key = f"fgs-balance-{self.fingerprint[:32]}-chunk-{chunk}"
        try:
            requests, accepted = self._submit_current(
                state,
                lambda: [self._request(state, self.by_key[r.key]) for r in rows],
                lambda requests: self.client.submit_batch(requests, idempotency_key=key, wait_when_full=False),
            )
        except ApiError as error:
            if error.status != 429:
                raise
            requests = [self._request(state, self.by_key[r.key]) for r in rows]
            self._submit_job_by_job(state, rows, requests, progress, task)
            return
        if len(accepted.job_ids) != len(requests):
            raise ApiError(
                500, "batch_mismatch", f"sent {len(requests)} jobs, the service accepted {len(accepted.job_ids)}"
            )
        state.record_chunk_submitted(
            accepted.batch_id,
            [
                (r.key, job_id, req.model_dump_json())
                for r, job_id, req in zip(rows, accepted.job_ids, requests, strict=False)
            ],
        )

    def _submit_job_by_job(
        self, state: BalanceState, rows, requests: list[GenerateRequest], progress: Progress, task
    ) -> None:
        for row, request in zip(rows, requests, strict=False):
            key = f"fgs-balance-{self.fingerprint[:32]}-{row.key}-a0"
            while True:
                # With none of our jobs in the queue, only others' work can free room: wait as the service says.
                ours_queued = bool(state.active(1))
                try:
                    request, accepted = self._submit_current(
                        state,
                        lambda row=row: self._request(state, self.by_key[row.key]),
                        lambda request, key=key, wait=not ours_queued: self.client.submit(
                            request, idempotency_key=key, wait_when_full=wait
                        ),
                        first=request,
                    )
                    break
                except ApiError as error:
                    if error.status != 429 or not ours_queued:
                        raise
                    # The queue is full of our own jobs: collect some results, then try again.
                    while not self._poll_once(state, progress, task):
                        time.sleep(self.options.poll_s)
            state.record_chunk_submitted(None, [(row.key, accepted.job_id, request.model_dump_json())])

    def _advance(self, state: BalanceState, row) -> int | None:
        """Look at one submitted job; returns images newly completed (0 for a retry or failure), None if unchanged."""
        try:
            job = self.client.job(row.job_id)
        except ApiError as error:
            if error.status != 404:
                raise
            return self._retry_or_fail(state, row, f"job {row.job_id} is unknown to the service (404)")
        self._running += job.state is JobState.running
        if job.state is JobState.finished:
            self._download(state, row, job)
            return row.num_images
        if job.state is JobState.canceled and row.key not in self._reopened:
            # Someone canceled it on the service (the page, the API): never resubmitted behind their back.
            state.record_canceled(row.key, f"job {job.job_id} was canceled on the service")
            return 0
        if job.state in (JobState.failed, JobState.canceled):
            self._reopened.discard(row.key)  # a rerun resubmits a job canceled before it, once
            message = job.error.message if job.error else job.state.value
            return self._retry_or_fail(state, row, f"job {job.job_id} {job.state.value}: {message}")
        return None

    def _retry_or_fail(self, state: BalanceState, row, message: str) -> int:
        used = self.retries_this_run.get(row.key, 0)
        if used >= self.options.max_retries:
            state.record_failed(row.key, message)
            self.failures.append((row.key, message))
            return 0
        slot = self.by_key[row.key]
        for index in range(slot.num_images):  # a new attempt rewrites the slot's images as a whole
            (self.out / synthetic_rel_path(self.dataset, slot, index)).unlink(missing_ok=True)
        attempt = row.attempt + 1
        # Built afresh rather than replayed from row.request: ids the service lost since are uploaded again.
        _request, accepted = self._submit_current(
            state,
            lambda: self._request(state, slot),
            lambda request: self.client.submit(
                request, idempotency_key=f"fgs-balance-{self.fingerprint[:32]}-{row.key}-a{attempt}"
            ),
        )
        state.record_resubmitted(row.key, attempt, accepted.job_id)
        self.retries_this_run[row.key] = used + 1
        self.retried += 1
        return 0

    def _download(self, state: BalanceState, row, job: JobPublic) -> None:
        slot = self.by_key[row.key]
        if len(job.results) != slot.num_images:
            raise ApiError(
                500,
                "result_mismatch",
                f"job {job.job_id} finished with {len(job.results)} images, expected {slot.num_images}",
            )
        if job.started_at and job.finished_at:
            self._generated.append((job.started_at.timestamp(), job.finished_at.timestamp(), len(job.results)))
        records = []
        for index, result in enumerate(job.results):
            rel = synthetic_rel_path(self.dataset, slot, index)
            dest = self.out / rel
            if not dest.exists():  # a file under its final name is complete (written by rename)
                write_png_atomic(dest, self.client.image_bytes(result.image_id))
            records.append(
                {
                    "path": rel,
                    "seed": result.seed,
                    "criterion_value": result.criterion_value,
                    "image_id": result.image_id,
                }
            )
        state.record_done(row.key, job.job_id, records)

    # 7. index files and manifest
    def _finish(self, state: BalanceState) -> BalanceReport:
        rows: list[ManifestRow] = []
        for image in self.dataset.images:
            rows.append(
                ManifestRow(
                    image.rel_path,
                    image.class_index,
                    self.dataset.class_names[image.class_index],
                    image.group or "",
                    "real",
                )
            )
        synthetic: list[SyntheticImage] = []
        for job in state.rows("done"):
            slot = self.by_key[job.key]
            request = GenerateRequest.model_validate_json(job.request, context=STORED) if job.request else None
            for record in job.results or []:
                synthetic.append(SyntheticImage(record["path"], slot.entry.class_index, slot.entry.group))
                value = record.get("criterion_value")
                rows.append(
                    ManifestRow(
                        record["path"],
                        slot.entry.class_index,
                        slot.entry.class_name,
                        slot.entry.group or "",
                        "synthetic",
                        seed=str(record["seed"]),
                        **(generation_columns(request) if request else {}),
                        criterion_value="" if value is None else repr(float(value)),
                        job_id=job.job_id or "",
                        prompt=request.prompt if request else slot.prompt,
                    )
                )
        write_index_files(self.out, self.dataset, synthetic)
        manifest = write_manifest(self.out, rows)
        hf_metadata = write_hf_metadata(self.out, rows)
        failed = [(r.key, r.error or "failed") for r in state.rows("failed")]
        canceled = [(r.key, r.error or "canceled") for r in state.rows("canceled")]
        return BalanceReport(
            out=self.out,
            planned_images=self.plan.total_to_add,
            planned_jobs=len(self.slots),
            synthetic_written=len(synthetic),
            real_images=len(self.dataset.images),
            skipped_files=len(self.dataset.skipped) + len(self.bad_conditioning),
            failed_jobs=failed,
            canceled_jobs=canceled,
            retried_jobs=self.retried,
            manifest=manifest,
            hf_metadata=hf_metadata,
            generation_speed=self._generation_speed(),
        )

    def _generation_speed(self) -> float | None:
        """Images per second of generation on the service: the images of the jobs this run collected over the
        time from the first one's start to the last one's end (workers' clocks; queueing before the first start
        and the client's own downloads left out, which the progress bar's collection rate counts)."""
        if not self._generated:
            return None
        start = min(started for started, _, _ in self._generated)
        end = max(finished for _, finished, _ in self._generated)
        return sum(images for _, _, images in self._generated) / max(end - start, 1e-3)


class _RateColumn(TextColumn):
    """Images collected per second over the run (queueing and downloads included; the final line states the
    generation speed on the service)."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} img/s" if speed else "-- img/s", style="green")


def check_prompts_against_model(
    info: ModelInfo | None, dataset: ScannedDataset, console: Console, force: bool = False
) -> None:
    """Refuse (a UserInputError) prompts that name no class the service's model was trained on (its model card,
    GET /v1/model): their images would follow the conditioning image alone, a whole run spent for nothing; with
    `force`, warn and go on. Note when prompts name its classes in another form than it was trained with. A model
    that publishes no class list (SD 2.1 unCLIP) knows any prompt."""
    if info is None or not info.class_names:
        return
    prompts = list(dict.fromkeys(dataset.prompt(c, g) for c, g in dataset.units()))
    unknown = info.unknown_prompt_classes(prompts)
    if unknown:
        message = (
            f"{len(unknown)} of the prompts name no class the model {info.model} was trained on (first: "
            f"{', '.join(repr(p) for p in unknown[:5])}). It knows {', '.join(info.class_names)}, prompted as "
            f"{info.prompt_template!r}: give --prompts FILE (class -> prompt) or --prompt-template, or images will "
            "follow the conditioning image alone"
        )
        if not force:
            raise UserInputError(f"{message}; --force generates them anyway")
        console.print(f"[yellow]warning:[/] {message}; generating anyway (--force)", soft_wrap=True)
        return
    if info.prompt_template:
        trained = {  # a card with contexts (fgs-digits-contexts) was trained on "{class_name} in {group}"
            info.prompt_template.format(class_name=name, group=context).lower()
            for name in info.class_names
            for context in info.contexts or [""]
        }
        other = [p for p in prompts if p.lower() not in trained]
        if other:
            console.print(
                f"[yellow]note:[/] {len(other)} prompts name the model's classes but not as it was trained "
                f"({info.prompt_template!r}; first: {', '.join(repr(p) for p in other[:3])}): "
                f"--prompt-template {info.prompt_template!r} prompts it as it learned",
                soft_wrap=True,
            )


def balance_dataset(
    client: Client, dataset: ScannedDataset, out: Path, target, options: BalanceOptions, console: Console | None = None
) -> BalanceReport:
    """Plan and run a balance (the Python API behind `fgs-client balance`); `target` as --target takes it."""
    if isinstance(target, str):
        target = parse_target(target)
    plan = plan_balance(UnitCounts.from_dataset(dataset), target, images_per_job=options.images_per_job)
    return BalanceRun(client, dataset, out, plan, options, console=console).run()


def balance(
    client: Client, dataset: str, root: Path, out: Path, target: str | int | dict[str, int] = "max", **options: Any
) -> BalanceReport:
    """Balance a dataset on disk, as `fgs-client balance` does (resumable: call again with the same arguments).
    `options`: the reader's (split_file, class_names_file, groups_csv, prompt_template, prompts_file), the
    GenerationParams fields, and the BalanceOptions fields."""
    reader_keys = ("split_file", "class_names_file", "groups_csv", "prompt_template", "prompts_file")
    reader_options = {k: options.pop(k) for k in reader_keys if k in options}
    generation = {k: options.pop(k) for k in list(options) if k in GenerationParams.model_fields}
    balance_options = BalanceOptions(generation=GenerationParams(**generation), **options)
    check_balance_options(balance_options)
    scanned = read_dataset(dataset, Path(root), **reader_options)
    return balance_dataset(client, scanned, Path(out), target, balance_options)

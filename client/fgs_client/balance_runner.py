"""`balance`: run a balance plan against the service and write the balanced dataset; resumable at any point.

Steps: 1. plan and fingerprint (the conditioning images' content included); 2. bind the state file (refuse a
different plan) and hold the run's folder (`fgs_client.run_owner`); 3. carry the real files; 4. the checks, then
the classifier (`fgs_client.balance_inputs`: nothing is submitted until they pass); 5. submit pending chunks, every
job in a batch (`fgs_client.balance_submit`), conditioning images uploaded per chunk just before it; 6. collect:
the service asked per batch, finished jobs downloaded, failed ones retried (`fgs_client.balance_collect`); 7. the
layout's index files, manifest.csv and the Hugging Face metadata.csv from the state (`fgs_client.balance_finish`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from fgs_client.balance_collect import Collector
from fgs_client.balance_finish import BalanceReport, finish
from fgs_client.balance_inputs import RunInputs, conditioning_digests
from fgs_client.balance_options import BalanceOptions, check_balance_options
from fgs_client.balance_planner import BalancePlan, JobSlot, UnitCounts, build_jobs, parse_target, plan_balance
from fgs_client.balance_progress import ProgressLine
from fgs_client.balance_state import STATE_NAME, BalanceState
from fgs_client.balance_submit import Submitter
from fgs_client.dataset_readers import ScannedDataset, read_dataset
from fgs_client.dataset_writer import carry_real_files, remove_temporary_files
from fgs_client.http_client import Client
from fgs_client.run_owner import RunOwner
from fgs_common.exceptions import UserInputError
from fgs_common.wire import GenerationParams


def plan_fingerprint(
    dataset: ScannedDataset, plan: BalancePlan, slots: list[JobSlot], options: BalanceOptions, digests: dict[Path, str]
) -> str:
    """What the state file and the Idempotency-Keys are bound to: the plan, the generation settings and every
    job's conditioning images by content (`digests`: sha256 by path), so that other images at the same paths are
    another plan."""
    body = {
        "dataset": dataset.name,
        "classes": dataset.class_names,
        "groups": dataset.groups,
        "entries": [(e.key, e.before, e.to_add) for e in plan.entries],
        "images_per_job": plan.images_per_job,
        "seed": options.seed,
        "generation": options.generation_fields(),
        "jobs": [(s.key, s.seed, s.prompt, [digests[im.path] for im in s.conditioning]) for s in slots],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_out_dir(dataset: ScannedDataset, out: Path) -> None:
    if dataset.root is None:
        return
    root, target = dataset.root.resolve(), out.resolve()
    if target == root or target.is_relative_to(root) or root.is_relative_to(target):
        raise UserInputError(f"--out {out} must lie outside the dataset root {dataset.root} (and not contain it)")


class BalanceRun:
    """One run of a plan into `out`: owns the folder, then checks, submits, collects and finishes."""

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
        if any(slot.conditioning for slot in self.slots):
            self._say("reading the conditioning images: the plan's fingerprint covers their content")
        digests = conditioning_digests(self.slots)
        self.fingerprint = plan_fingerprint(dataset, plan, self.slots, options, digests)
        self.inputs = RunInputs(client, dataset, options, digests, self.console, self._say)
        self.submitter = Submitter(client, self.inputs, self.by_key, self.fingerprint)
        self._owner: RunOwner | None = None  # the lock on `out` while `run` runs

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
            self.bind(state)
            reopened = state.reopen_failed()
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
                self.inputs.check_before_submitting(state)
                self.inputs.resolve_classifier(state)
            collector = self._generate(state, reopened)
            # 7. index files and manifest
            return finish(
                state,
                self.dataset,
                self.out,
                self.by_key,
                planned_images=self.plan.total_to_add,
                skipped_files=len(self.dataset.skipped) + len(self.inputs.bad_conditioning),
                retried_jobs=collector.retried,
                generation_speed=collector.generation_speed(),
            )
        finally:
            state.close()

    def bind(self, state: BalanceState) -> None:
        """Record the plan's jobs in the state on the first run; StateConflict when it holds another plan."""
        slots = [(s.key, i, s.num_images) for i, s in enumerate(self.slots)]
        state.bind_plan(self.fingerprint, slots, self.options.chunk_size)

    def _say(self, message: str) -> None:
        """A status line, so that no phase of the run is silent."""
        if self.options.show_progress:
            self.console.print(f"[dim]fgs:[/] {message}", soft_wrap=True, highlight=False)

    def _check_stop(self) -> None:
        """RunStopped when `fgs-client cancel` asked for the run (looked at between chunks and at every poll)."""
        if self._owner is not None:
            self._owner.check_stop()

    def collector(self, progress: ProgressLine, reopened: set[str]) -> Collector:
        return Collector(
            self.client,
            self.dataset,
            self.out,
            self.by_key,
            self.submitter,
            window=self.options.window,
            max_retries=self.options.max_retries,
            reopened=reopened,
            progress=progress,
            check_stop=self._check_stop,
        )

    def progress_line(self, state: BalanceState) -> ProgressLine:
        done_images = sum(r.num_images for r in state.rows("done"))
        return ProgressLine(self.console, self.options.show_progress, self.plan.total_to_add, done_images)

    # 5-6. submit, collect
    def _generate(self, state: BalanceState, reopened: set[str]) -> Collector:
        with self.progress_line(state) as progress:
            collector = self.collector(progress, reopened)

            def collect_some() -> None:
                while not collector.poll_once(state):
                    time.sleep(self.options.poll_s)

            chunks = state.pending_chunks()
            if chunks:
                self._say(f"submitting the jobs ({len(chunks)} chunks of up to {self.options.chunk_size})")
            for number, chunk in enumerate(chunks, start=1):
                self._check_stop()
                progress.describe(f"uploading images, submitting jobs ({number}/{len(chunks)})")
                self.submitter.submit_chunk(state, chunk, collect_some)
                collector.poll_once(state)  # download early results while later chunks upload
            while state.active(1):
                if not collector.poll_once(state):
                    time.sleep(self.options.poll_s)
        return collector


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

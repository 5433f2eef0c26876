"""Finishing a balance run: the layout's index files, manifest.csv and the Hugging Face metadata.csv, written
from the state file alone (so a rerun that found everything done writes the same files), and the run's report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fgs_client.balance_planner import JobSlot
from fgs_client.balance_state import BalanceState
from fgs_client.dataset_readers import ScannedDataset, SyntheticImage
from fgs_client.dataset_writer import (
    ManifestRow,
    generation_columns,
    write_hf_metadata,
    write_index_files,
    write_manifest,
)
from fgs_common.wire import STORED, GenerateRequest


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
    generation_speed: float | None = None  # images/s on the service: see Collector.generation_speed

    @property
    def complete(self) -> bool:
        return not self.failed_jobs and not self.canceled_jobs and self.synthetic_written == self.planned_images


def manifest_rows(
    state: BalanceState, dataset: ScannedDataset, by_key: dict[str, JobSlot]
) -> tuple[list[ManifestRow], list[SyntheticImage]]:
    """One row per real image, then one per synthetic image of the jobs done (generation columns from the stored
    request); and the synthetic images for the layout's index files."""
    names = dataset.class_names
    rows = [
        ManifestRow(image.rel_path, image.class_index, names[image.class_index], image.group or "", "real")
        for image in dataset.images
    ]
    synthetic: list[SyntheticImage] = []
    for job in state.rows("done"):
        slot = by_key[job.key]
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
    return rows, synthetic


def finish(
    state: BalanceState,
    dataset: ScannedDataset,
    out: Path,
    by_key: dict[str, JobSlot],
    *,
    planned_images: int,
    skipped_files: int,
    retried_jobs: int,
    generation_speed: float | None,
) -> BalanceReport:
    """Write the dataset's index files and manifests, and report the run with the jobs that failed or were
    canceled."""
    rows, synthetic = manifest_rows(state, dataset, by_key)
    write_index_files(out, dataset, synthetic)
    manifest = write_manifest(out, rows)
    hf_metadata = write_hf_metadata(out, rows)
    return BalanceReport(
        out=out,
        planned_images=planned_images,
        planned_jobs=len(by_key),
        synthetic_written=len(synthetic),
        real_images=len(dataset.images),
        skipped_files=skipped_files,
        failed_jobs=[(r.key, r.error or "failed") for r in state.rows("failed")],
        canceled_jobs=[(r.key, r.error or "canceled") for r in state.rows("canceled")],
        retried_jobs=retried_jobs,
        manifest=manifest,
        hf_metadata=hf_metadata,
        generation_speed=generation_speed,
    )

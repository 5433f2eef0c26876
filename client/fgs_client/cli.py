"""`fgs-client`: balance a dataset on disk with the fgs service, and the commands around it.

Exit codes: 0 done; 1 some jobs failed (rerun the same command to retry them); 2 bad input;
3 service unreachable (rerun later: the run resumes); 4 API key rejected; 5 other service error;
130 interrupted (Ctrl-C: rerun to resume, or `fgs-client cancel --out OUT`).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from fgs_client.balance_planner import BalancePlan, PlanError, UnitCounts, parse_target, plan_balance, read_counts_csv
from fgs_client.balance_state import STATE_NAME, BalanceState
from fgs_client.dataset_readers import (
    ScannedDataset,
    packaged_lines,
    packaged_path,
    read_classifier_spec,
    read_dataset,
)
from fgs_client.generation_options import GenerationChoice, generation_options, validation_message
from fgs_client.http_client import (
    ApiError,
    AuthenticationFailed,
    Client,
    FgsClientError,
    JobFailed,
    ServiceUnreachable,
)
from fgs_client.preflight import ClassMatch, match_classes
from fgs_client.run_owner import RunStopped, take_over
from fgs_common.exceptions import UserInputError
from fgs_common.presets import get_preset
from fgs_common.settings import get_settings
from fgs_common.wire import ClassifierSpec, GenerationParams

if TYPE_CHECKING:  # the run's modules load when a command runs: `fgs-client --help` stays quick
    from fgs_client.balance_finish import BalanceReport
    from fgs_client.balance_options import BalanceOptions
    from fgs_client.pilot_sweep import SettingRow, SweepSetting

out_console = Console()
err_console = Console(stderr=True)

EXIT_FAILED_JOBS, EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_API = 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
RESUMABLE_COMMANDS = {"balance"}  # a rerun of the same command goes on where it stopped
# The one table from error type to exit code, for every command: the first row the error is an instance of
# decides, and the third column is what to do next when the command resumes. An error of no type here (a pydantic
# ValidationError or a TypeError from a bug among them) is no bad input: it shows its traceback and exits 1.
EXIT_CODES: tuple[tuple[type[Exception], int, str], ...] = (
    (UserInputError, EXIT_BAD_INPUT, ""),  # DatasetError, PlanError, StateConflict, InvalidJob, ...
    (ServiceUnreachable, EXIT_UNREACHABLE, "Nothing is lost: rerun the same command when the service is up to resume."),
    (AuthenticationFailed, EXIT_AUTH, ""),
    (ApiError, EXIT_API, "Rerun the same command to resume."),
    (JobFailed, EXIT_FAILED_JOBS, ""),
    (RunStopped, EXIT_INTERRUPTED, ""),  # `fgs-client cancel --out` took the run over
)


def fail(message: str, code: int) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)


def exit_for(error: Exception, command: str | None) -> typer.Exit:
    """The error's message on stderr and its exit code (EXIT_CODES)."""
    for kind, code, resume_hint in EXIT_CODES:
        if isinstance(error, kind):
            message = f"the service refused a request: {error}" if isinstance(error, ApiError) else str(error)
            if resume_hint and command in RESUMABLE_COMMANDS:
                message = f"{message}. {resume_hint}"
            return fail(message, code)
    raise TypeError(f"{type(error).__name__} is not in EXIT_CODES") from error


class _Commands(TyperGroup):
    """Typer's command group, with every command's errors mapped to exit codes in one place (EXIT_CODES)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except tuple(kind for kind, _, _ in EXIT_CODES) as error:
            raise exit_for(error, ctx.invoked_subcommand) from None


app = typer.Typer(
    cls=_Commands,
    help="fgs client: balance long-tailed datasets with feedback-guided synthetic images.",
    no_args_is_help=True,
)


class DatasetName(str, Enum):
    nicopp = "nico++"
    imagenet_lt = "imagenet-lt"
    imagefolder = "imagefolder"
    digits_lt = "digits-lt"


class RealFiles(str, Enum):
    link = "link"
    copy = "copy"


UrlOption = Annotated[str, typer.Option("--url", envvar="FGS_URL", help="the fgs service")]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="FGS_API_KEY",
        help="API key (or FGS_API_KEY): from the service's operator; a local `fgs up` prints its dev key",
    ),
]
PromptTemplateOption = Annotated[
    str | None,
    typer.Option(
        "--prompt-template",
        help="prompt of each class, e.g. 'a photo of a {class_name}' ({group}: the group, when grouped); "
        "default: the reader's (the class name, 'class in group' for NICO++)",
    ),
]
PromptsOption = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="a prompt per class: a JSON object {class: prompt} or a CSV with columns class,prompt (a class whose "
        "name another class shares is keyed <class index>-<name>)",
    ),
]


def make_client(url: str, api_key: str | None, **options) -> Client:
    return Client(url, api_key or get_settings().dev_api_key, **options)


def scan(
    dataset: DatasetName,
    root: Path,
    split_file: Path | None,
    class_names: Path | None,
    groups: Path | None,
    prompt_template: str | None = None,
    prompts: Path | None = None,
) -> ScannedDataset:
    """`read_dataset` under the CLI's option names."""
    return read_dataset(
        dataset.value,
        root,
        split_file=split_file,
        class_names_file=class_names,
        groups_csv=groups,
        prompt_template=prompt_template,
        prompts_file=prompts,
    )


def print_plan(
    plan: BalancePlan,
    grouped: bool,
    console: Console = out_console,
    dataset: ScannedDataset | None = None,
    max_rows: int | None = None,
) -> None:
    """The plan as a table (before, to add, after per unit, and the prompt when the dataset is read) and totals;
    with more units than `max_rows`, the totals alone."""
    if max_rows is not None and len(plan.entries) > max_rows:
        console.print(f"[dim]balance plan of {len(plan.entries):,} units: --dry-run prints every one[/]")
    else:
        _print_plan_table(plan, grouped, console, dataset)
    units = "groups" if grouped else "classes"
    console.print(
        f"{len(plan.entries):,} {units}: {plan.total_before:,} real images, "
        f"{plan.total_to_add:,} images to add in {plan.job_count:,} jobs (up to {plan.images_per_job} images per job), "
        f"{plan.total_before + plan.total_to_add:,} after",
        soft_wrap=True,
    )


def _print_plan_table(plan: BalancePlan, grouped: bool, console: Console, dataset: ScannedDataset | None) -> None:
    table = Table(title="balance plan")
    table.add_column("class")
    if grouped:
        table.add_column("group")
    for name in ("before", "to add", "after"):
        table.add_column(name, justify="right")
    table.add_column("conditioning")
    if dataset is not None:
        table.add_column("prompt")
    for entry in plan.entries:
        cells = [entry.class_name] + ([entry.group or ""] if grouped else [])
        cells += [f"{entry.before:,}", f"{entry.to_add:,}", f"{entry.after:,}", entry.conditioning.value]
        if dataset is not None:
            cells.append(dataset.prompt(entry.class_index, entry.group))
        table.add_row(*cells)
    console.print(table)


DatasetOption = Annotated[DatasetName, typer.Option("--dataset", help="layout of the data on disk")]
HardnessStatsOption = Annotated[Path | None, typer.Option("--hardness-stats", help="safetensors from `hardness-stats`")]
# `balance`'s own options
BalanceOutOption = Annotated[
    Path | None, typer.Option("--out", help="where the balanced dataset goes (default: <root>-balanced)")
]
TargetOption = Annotated[
    str,
    typer.Option(
        "--target",
        help="'max', a number per unit, a JSON object/file of per-class totals, or imbalanced-learn's forms: "
        "'not majority', 'all', 'minority', 'not minority', a ratio of the largest class (e.g. 0.5)",
    ),
]
CountsOption = Annotated[
    Path | None,
    typer.Option(
        "--counts", help="counts CSV instead of images (dry run only); 'builtin': the packaged ImageNet-LT train counts"
    ),
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="print the plan and exit")]
TextOnlyOption = Annotated[
    bool, typer.Option("--text-only", help="condition on the class prompt alone, not on real images")
]
PlanSeedOption = Annotated[int, typer.Option("--seed", help="plan seed: conditioning picks and generation seeds")]
MaxRetriesOption = Annotated[int, typer.Option("--max-retries", help="retries per failed job in one run")]
ClassifierUploadOption = Annotated[
    Path | None, typer.Option("--classifier", help="TorchScript/torch.export archive to upload")
]
SpecOption = Annotated[Path | None, typer.Option("--classifier-spec", help="its ClassifierSpec JSON")]
ClassifierIdOption = Annotated[str | None, typer.Option("--classifier-id", help="an already uploaded classifier")]
RealFilesOption = Annotated[RealFiles, typer.Option("--real-files", help="how real images enter --out")]
SplitFileOption = Annotated[Path | None, typer.Option("--split-file", help="imagenet-lt: the train split file")]
ClassNamesOption = Annotated[Path | None, typer.Option("--class-names", help="imagenet-lt: class-name file")]
GroupsOption = Annotated[Path | None, typer.Option("--groups", help="imagefolder: CSV path,group")]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="submit even when the pre-flight refuses: prompts that name no class the model knows, or the "
        "classifier scoring badly on your images",
    ),
]


@app.command()
@generation_options(on_invalid=lambda message: fail(message, EXIT_BAD_INPUT))
def balance(
    dataset: DatasetOption,
    root: Annotated[Path | None, typer.Option("--root", help="the dataset root")] = None,
    out: BalanceOutOption = None,
    target: TargetOption = "max",
    counts: CountsOption = None,
    dry_run: DryRunOption = False,
    text_only: TextOnlyOption = False,
    images_per_job: Annotated[int, typer.Option("--images-per-job")] = 8,
    seed: PlanSeedOption = 0,
    max_retries: MaxRetriesOption = 3,
    classifier: ClassifierUploadOption = None,
    classifier_spec: SpecOption = None,
    hardness_stats: HardnessStatsOption = None,
    classifier_id: ClassifierIdOption = None,
    real_files: RealFilesOption = RealFiles.link,
    split_file: SplitFileOption = None,
    class_names: ClassNamesOption = None,
    groups: GroupsOption = None,
    prompt_template: PromptTemplateOption = None,
    prompts: PromptsOption = None,
    force: ForceOption = False,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    *,
    generation: GenerationParams,
    choice: GenerationChoice,
) -> None:
    """Fill what each class or group lacks with generated images and write the balanced dataset to --out."""
    from fgs_client.balance_options import BalanceOptions

    if choice.preset is not None and "target" not in choice.explicit:
        target = str(choice.preset.target.value)  # the preset's target unless --target was given
    options = BalanceOptions(
        generation=generation,
        text_only=text_only,
        images_per_job=images_per_job,
        seed=seed,
        max_retries=max_retries,
        classifier_id=classifier_id,
        classifier=classifier,
        classifier_spec=classifier_spec,
        hardness_stats=hardness_stats,
        real_files=real_files.value,
        show_progress=progress,
        force=force,
    )
    note_control_run(generation)
    target_value = parse_target(target)
    if counts is not None:
        print_plan_from_counts(dataset, counts, target_value, images_per_job, dry_run, choice, target)
        return
    if root is None:
        raise fail("--root is required (or --counts FILE with --dry-run)", EXIT_BAD_INPUT)
    check_options_of_run(options, dry_run)
    scanned = scan_for_balance(dataset, root, split_file, class_names, groups, prompt_template, prompts)
    plan = plan_balance(UnitCounts.from_dataset(scanned), target_value, images_per_job)
    if dry_run:
        print_plan(plan, grouped=scanned.groups is not None, dataset=scanned)
        print_generation(choice, target)
        check_prompts_if_reachable(url, api_key, scanned, force)
        return
    # what is about to run, as the dry run shows it (the status stream: stdout keeps the result)
    print_plan(plan, grouped=scanned.groups is not None, dataset=scanned, console=err_console, max_rows=50)
    print_generation(choice, target, console=err_console)
    report = run_balance(url, api_key, scanned, out or root.with_name(root.name + "-balanced"), plan, options)
    report_balance(report, max_retries)


def note_control_run(generation: GenerationParams) -> None:
    """A criterion at omega 0 scores without steering: say so, with the value that steers."""
    if generation.scores_without_steering:
        preset = get_preset("paper-imagenet-lt")
        err_console.print(
            f"[yellow]note:[/] --criterion {generation.criterion.value} at --omega 0 scores each image without "
            f"steering it (a control run); give --omega (e.g. {preset.generation_params().omega:g}, preset "
            f"{preset.name}'s value) for feedback",
            soft_wrap=True,
        )


def print_plan_from_counts(
    dataset: DatasetName,
    counts: Path,
    target_value: str | int | float | dict[str, int],
    images_per_job: int,
    dry_run: bool,
    choice: GenerationChoice,
    target: str,
) -> None:
    """`balance --counts FILE --dry-run`: the plan from counts alone (no images, no service)."""
    if not dry_run:
        raise fail("--counts plans from counts only: add --dry-run (a real balance needs --root)", EXIT_BAD_INPUT)
    if str(counts) == "builtin" and dataset is DatasetName.nicopp:
        print_nicopp_groups(target_value)
        print_generation(choice, target)
        return
    if str(counts) == "builtin":
        if dataset is not DatasetName.imagenet_lt:
            raise fail("--counts builtin exists for imagenet-lt and nico++ only", EXIT_BAD_INPUT)
        counts = packaged_path("imagenet_lt_train_counts.csv")
    print_plan(plan_balance(read_counts_csv(counts), target_value, images_per_job), grouped=_grouped_counts(counts))
    print_generation(choice, target)


def check_options_of_run(options: BalanceOptions, dry_run: bool) -> None:
    """What a real run would refuse: refused, or on a dry run (which still shows the plan) a warning."""
    from fgs_client.balance_options import check_balance_options

    try:
        check_balance_options(options)
    except UserInputError as error:
        if not dry_run:
            raise
        err_console.print(f"[yellow]warning:[/] a real run refuses these settings: {error}", soft_wrap=True)


def scan_for_balance(
    dataset: DatasetName,
    root: Path,
    split_file: Path | None,
    class_names: Path | None,
    groups: Path | None,
    prompt_template: str | None,
    prompts: Path | None,
) -> ScannedDataset:
    """`scan`, saying so, and naming the files skipped as not readable images."""
    err_console.print(f"[dim]fgs:[/] reading the dataset in {root}", highlight=False)
    scanned = scan(dataset, root, split_file, class_names, groups, prompt_template, prompts)
    if scanned.skipped:
        err_console.print(
            f"[yellow]skipped {len(scanned.skipped):,} files that are not readable images[/] (first: "
            f"{scanned.skipped[0].path}: {scanned.skipped[0].reason})",
            soft_wrap=True,
        )
    return scanned


def run_balance(
    url: str, api_key: str | None, scanned: ScannedDataset, out: Path, plan: BalancePlan, options: BalanceOptions
) -> BalanceReport:
    """The run against the service; Ctrl-C exits 130 saying what is left on the service and the two ways on."""
    from fgs_client.balance_runner import BalanceRun

    with make_client(url, api_key) as client:
        try:
            return BalanceRun(client, scanned, out, plan, options, console=err_console).run()
        except KeyboardInterrupt:
            raise fail(interrupted_message(out), EXIT_INTERRUPTED) from None


def report_balance(report: BalanceReport, max_retries: int) -> None:
    """The run's last line on stdout; jobs canceled on the service or failed: on stderr, and exit 1."""
    summary = (
        f"{report.synthetic_written:,}/{report.planned_images:,} synthetic images in {report.out} "
        f"({report.real_images:,} real, {report.skipped_files:,} files skipped, {report.retried_jobs} jobs "
        f"retried); "
        + (
            f"generated at {report.generation_speed:.2f} img/s (first start to last end on the service); "
            if report.generation_speed
            else ""
        )
        + f"manifest: {report.manifest}"
        + (
            f"; Hugging Face metadata: {report.hf_metadata}"
            if report.hf_metadata
            else f"; for Hugging Face datasets: fgs-client class-folders --out {report.out} --dest DIR (metadata.csv "
            "here is the layout's own index)"
        )
    )
    if report.canceled_jobs:
        err_console.print(summary, soft_wrap=True)
        raise fail(
            f"{len(report.canceled_jobs)} jobs were canceled on the service and not resubmitted (first: "
            f"{report.canceled_jobs[0][1]}); rerun the same command to generate them",
            EXIT_FAILED_JOBS,
        )
    if report.failed_jobs:
        err_console.print(summary, soft_wrap=True)
        for key, message in report.failed_jobs[:20]:
            err_console.print(f"  failed {key}: {message}")
        raise fail(
            f"{len(report.failed_jobs)} jobs failed after {max_retries} retries; rerun the same command to retry them",
            EXIT_FAILED_JOBS,
        )
    out_console.print(f"balanced: {summary}", soft_wrap=True)


def check_prompts_if_reachable(url: str, api_key: str | None, scanned: ScannedDataset, force: bool) -> None:
    """The dry run's prompt check: against the model of the service at `url` when one answers, else a note."""
    from fgs_client.balance_inputs import check_prompts_against_model

    try:
        with make_client(url, api_key, timeout_s=10, retries=0) as client:
            info = client.model_info()
    except (FgsClientError, ValueError) as error:  # ValueError: something else answers there
        err_console.print(f"[dim]fgs:[/] prompts not checked against the model ({error})", soft_wrap=True)
        return
    try:
        check_prompts_against_model(info, scanned, err_console, force)
    except UserInputError as error:  # what the run would stop at
        err_console.print(f"[red]error:[/] {error}", soft_wrap=True)


def interrupted_message(out: Path) -> str:
    """What Ctrl-C leaves on the service and the two ways on."""
    jobs, images = _jobs_on_service(out)
    return (
        f"interrupted: {jobs:,} jobs ({images:,} images) were submitted and not collected yet: queued, running or "
        "finished on the service. Rerun the same command to resume and collect them, or cancel those not ended "
        f"with: fgs-client cancel --out {out}"
    )


def _jobs_on_service(out: Path) -> tuple[int, int]:
    """Jobs of the run in `out` that were submitted and not yet collected, and their images."""
    path = out / STATE_NAME
    if not path.is_file():
        return 0, 0
    state = BalanceState(path)
    try:
        jobs, images = state.counts().get("submitted", (0, 0))
        return jobs, images or 0
    finally:
        state.close()


@app.command()
def cancel(
    out: Annotated[Path, typer.Option("--out", help="the output directory of an interrupted `balance` run")],
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """Cancel the jobs of a balance run on the service (rerunning `balance` later submits them again). A client
    still running that run is asked to stop first, so that it does not resubmit what this cancels."""
    path = out / STATE_NAME
    if not path.is_file():
        raise fail(f"{out} holds no balance run ({STATE_NAME} missing)", EXIT_BAD_INPUT)
    owner = take_over(out)  # RunHeld (a UserInputError) when the client holding the run does not stop
    state = BalanceState(path)
    canceled = already_done = 0
    try:
        rows = state.rows("submitted")
        batches: dict[str, list] = {}
        for row in rows:
            batches.setdefault(row.batch_id or "", []).append(row)
        singly = batches.pop("", [])
        with make_client(url, api_key) as client:
            # Every job is in a batch: one DELETE per batch; one by one only the jobs an earlier client version
            # submitted outside any batch, and those of a batch the service no longer knows.
            for batch_id, batch_rows in batches.items():
                try:
                    now = client.cancel_batch(batch_id)
                except ApiError as error:
                    if error.status != 404:  # the batch record expired: its jobs one by one
                        raise
                    singly += batch_rows
                    continue
                canceled += now
                already_done += max(0, len(batch_rows) - now)
            for row in singly:
                try:
                    client.cancel(row.job_id)
                    canceled += 1
                except ApiError as error:
                    if error.status not in (404, 409):  # gone, or already finished / failed / canceled
                        raise
                    already_done += 1
        state.mark_canceled(f"canceled by fgs-client cancel --out {out}")
    finally:
        state.close()
        owner.release()
    out_console.print(
        f"canceled {canceled:,} jobs of the run in {out} ({already_done:,} had already ended); "
        "rerun the same balance command to resume the run",
        soft_wrap=True,
    )


def print_generation(choice: GenerationChoice, target: str, console: Console = out_console) -> None:
    """The generation parameters a run would use, each with where its value comes from."""
    title = "generation parameters" + (f" (preset {choice.preset.name})" if choice.preset else "")
    table = Table(title=title)
    for column in ("parameter", "value", "source"):
        table.add_column(column, overflow="fold")
    for name, value in choice.params.model_dump(mode="json").items():
        table.add_row(name, str(value), choice.source(name))
    if choice.preset is not None:
        given = "target" in choice.explicit
        source = "--target (given)" if given else f"preset {choice.preset.name}: {choice.preset.target.source}"
        table.add_row("target", target, source)
    console.print(table)
    for note in choice.preset.notes if choice.preset else ():
        console.print(f"note: {note}", soft_wrap=True)


NICOPP_PAPER_TRAIN_IMAGES = 62_657  # paper App. J.2: NICO++ training examples


def print_nicopp_groups(target: str | int | dict, console: Console = out_console) -> None:
    """The packaged NICO++ class x context list at a per-group target: its total after balancing, and what the
    paper's training set (App. J.2) would need added. Per-group counts need the dataset (--root)."""
    if not isinstance(target, int):
        raise PlanError(
            "--counts builtin for nico++ plans a number per group (e.g. --target 811 or --preset paper-nicopp)"
        )
    classes, contexts = packaged_lines("nicopp_classes.txt"), packaged_lines("nicopp_contexts.txt")
    groups = len(classes) * len(contexts)
    total = groups * target
    console.print(
        f"NICO++ (packaged list): {len(classes)} classes x {len(contexts)} contexts = {groups:,} groups; "
        f"{total:,} images after balancing every group to {target:,}. With the paper's {NICOPP_PAPER_TRAIN_IMAGES:,} "
        f"training images (App. J.2) that is {total - NICOPP_PAPER_TRAIN_IMAGES:,} images to add (Table 1: 229k). "
        "Per-group counts: give --root.",
        soft_wrap=True,
    )


def _grouped_counts(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        return "group" in handle.readline().strip().split(",")


@app.command()
def status(
    out: Annotated[Path | None, typer.Option("--out", help="a balance output directory")] = None,
    job: Annotated[str | None, typer.Option("--job", help="a job id to look up on the service")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """Progress of a balance run (from its state file) or of one job (from the service)."""
    if out is None and job is None:
        raise fail("give --out DIR (a balance run) or --job ID", EXIT_BAD_INPUT)
    if out is not None:
        path = out / STATE_NAME
        if not path.is_file():
            raise fail(f"{out} holds no balance run ({STATE_NAME} missing)", EXIT_BAD_INPUT)
        state = BalanceState(path)
        try:
            table = Table(title=f"balance run in {out}")
            for column in ("state", "jobs", "images"):
                table.add_column(column, justify="right" if column != "state" else "left")
            for name, (jobs, images) in sorted(state.counts().items()):
                table.add_row(name, f"{jobs:,}", f"{images or 0:,}")
            out_console.print(table)
            for row in state.rows("failed")[:20]:
                out_console.print(f"failed {row.key}: {row.error}")
            if batch_ids := state.batch_ids():  # the service's view of the run, counts by state per batch
                out_console.print(
                    f"{len(batch_ids)} batch(es) submitted; the newest: {batch_ids[-1]} (GET /v1/batches/ID on the "
                    f"service the run used shows any of them by state; the last {min(5, len(batch_ids))}: "
                    f"{', '.join(batch_ids[-5:])})",
                    soft_wrap=True,
                )
        finally:
            state.close()
    if job is not None:
        with make_client(url, api_key) as client:
            out_console.print_json(client.job(job).model_dump_json())


@app.command("upload-classifier")
def upload_classifier(
    archive: Annotated[Path, typer.Option("--classifier", help="TorchScript (.pt) or torch.export (.pt2) archive")],
    spec: Annotated[Path, typer.Option("--spec", help="ClassifierSpec JSON")],
    hardness_stats: Annotated[
        Path | None, typer.Option("--hardness-stats", help="safetensors from `hardness-stats`")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="a name to list it by (default: the file name)")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """Upload a classifier (and its hardness statistics); prints its id for --classifier-id."""
    if not archive.is_file():
        raise fail(f"classifier archive {archive} does not exist", EXIT_BAD_INPUT)
    if hardness_stats is not None and not hardness_stats.is_file():
        raise fail(f"hardness statistics {hardness_stats} do not exist", EXIT_BAD_INPUT)
    parsed = read_classifier_spec(spec)
    with make_client(url, api_key) as client:
        uploaded = client.upload_classifier(archive, parsed, hardness_stats, name=name)
    out_console.print(uploaded.classifier_id)


@app.command()
def classifiers(
    delete: Annotated[str | None, typer.Option("--delete", help="delete the classifier with this id")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """List your uploaded classifiers (id, name, upload date, classes), or delete one."""
    with make_client(url, api_key) as client:
        if delete is not None:
            client.delete_classifier(delete)
            out_console.print(f"deleted classifier {delete}")
            return
        listed = client.classifiers()
    table = Table(title="classifiers")
    for column in ("id", "name", "uploaded", "classes", "hardness stats"):
        table.add_column(column, overflow="fold")
    for item in listed:
        uploaded_at = item.created_at.strftime("%Y-%m-%d %H:%M") if item.created_at else ""
        names = ", ".join(item.spec.class_names) if item.spec.class_names else f"{item.spec.num_classes} (unnamed)"
        table.add_row(item.classifier_id, item.name, uploaded_at, names, "yes" if item.has_hardness_stats else "no")
    out_console.print(table)


@app.command()
def images(
    delete: Annotated[
        list[str] | None, typer.Option("--delete", help="delete the uploaded image with this id (repeatable)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="list the newest N")] = 50,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """List your uploaded conditioning images (id, name, size, upload date), newest last, or delete some. A job
    that still needs a deleted image and has not started fails saying so; a rerun of `balance` uploads it again."""
    with make_client(url, api_key) as client:
        for image_id in delete or ():
            client.delete_image(image_id)
            out_console.print(f"deleted image {image_id}")
        if delete:
            return
        listed = client.images()
    shown = listed[-limit:] if limit > 0 else []
    table = Table(title=f"uploaded images: {len(listed):,}" + (f", the newest {len(shown)}" if shown != listed else ""))
    for column in ("id", "name", "size", "uploaded"):
        table.add_column(column, overflow="fold")
    for item in shown:
        uploaded_at = item.created_at.strftime("%Y-%m-%d %H:%M") if item.created_at else ""
        table.add_row(item.image_id, item.name, f"{item.width}x{item.height}", uploaded_at)
    out_console.print(table)


@app.command("hardness-stats")
def hardness_stats_command(
    dataset: Annotated[DatasetName, typer.Option("--dataset")],
    root: Annotated[Path, typer.Option("--root")],
    classifier: Annotated[
        Path,
        typer.Option(
            "--classifier", help="TorchScript (.pt) or torch.export (.pt2) archive returning (logits, embedding)"
        ),
    ],
    spec: Annotated[Path, typer.Option("--spec", help="ClassifierSpec JSON")],
    out: Annotated[Path, typer.Option("--out", help="safetensors file to write")],
    shrinkage: Annotated[
        float | None, typer.Option("--shrinkage", help="covariance shrinkage in [0, 1] (default: Ledoit-Wolf)")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    split_file: Annotated[Path | None, typer.Option("--split-file")] = None,
    class_names: Annotated[Path | None, typer.Option("--class-names")] = None,
    groups: Annotated[Path | None, typer.Option("--groups")] = None,
) -> None:
    """Class means, shrinkage covariances, precisions and log-dets of the classifier's embeddings over the real
    training set (the hardness criterion's statistics), saved as safetensors. Needs the `train` extra (torch)."""
    try:
        from fgs_client.training import class_embedding_statistics, embed_images, load_classifier_archive
    except ImportError as error:
        raise fail(
            f"hardness-stats needs the train extra (pip install 'fgs[train]'): {error}", EXIT_BAD_INPUT
        ) from None
    parsed = read_classifier_spec(spec)
    scanned = read_dataset(dataset.value, root, split_file=split_file, class_names_file=class_names, groups_csv=groups)
    if len(scanned.class_names) != parsed.num_classes:
        raise fail(
            f"the dataset has {len(scanned.class_names)} classes, the classifier spec {parsed.num_classes}",
            EXIT_BAD_INPUT,
        )
    model = load_classifier_archive(classifier, parsed)
    embeddings, labels = embed_images(
        model, [im.path for im in scanned.images], [im.class_index for im in scanned.images], batch_size=batch_size
    )
    stats = class_embedding_statistics(embeddings, labels, parsed.num_classes, shrinkage=shrinkage)
    stats.save(out)
    out_console.print(
        f"hardness statistics of {len(labels):,} images, {parsed.num_classes} classes, embedding size "
        f"{embeddings.shape[1]} -> {out}"
    )


@app.command()
def grid(
    out: Annotated[Path, typer.Option("--out", help="a balanced dataset written by `balance` (holds manifest.csv)")],
    dest: Annotated[
        Path | None, typer.Option("--dest", help="folder for the contact sheets (default: <out>-grid)")
    ] = None,
    per_class: Annotated[int, typer.Option("--per-class", help="images per row")] = 8,
    size: Annotated[int, typer.Option("--size", help="thumbnail side in pixels")] = 96,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """A PNG contact sheet per class: real images (top row) beside synthetic ones (bottom row)."""
    from fgs_client.contact_sheet import write_contact_sheets

    manifest = out / "manifest.csv"
    if not manifest.is_file():
        raise fail(f"{out} has no manifest.csv: run `fgs-client balance` first", EXIT_BAD_INPUT)
    dest = dest or out.with_name(out.name + "-grid")
    written = write_contact_sheets(out, dest, per_class=per_class, size=size, seed=seed)
    out_console.print(f"{len(written)} contact sheets in {dest}")


@app.command("digits-lt")
def digits_lt(
    out: Annotated[Path, typer.Option("--out", help="where train/, validation/ and test/ go")] = Path("digits-lt"),
) -> None:
    """Write Digits-LT, a small long-tailed ImageFolder to try fgs on (handwritten digits, 60 .. 2 training images
    per class; balanced validation and test splits), with the embedded fgs-digits model. Needs scikit-learn
    (the `train` extra)."""
    from fgs_client.digits_lt import METADATA_FILE, build_digits_lt

    if (out / METADATA_FILE).is_file():
        out_console.print(f"{out} already holds Digits-LT")
    else:
        try:
            build_digits_lt(out)
        except ImportError as error:
            raise fail(f"{error}; install the train extra: pip install 'fgs[train]'", EXIT_BAD_INPUT) from None
    metadata = json.loads((out / METADATA_FILE).read_text())
    counts = ", ".join(f"{name} {n}" for name, n in zip(metadata["class_names"], metadata["train_counts"], strict=True))
    out_console.print(f"{out}/train: {sum(metadata['train_counts'])} images ({counts})")
    validation, test = sum(metadata["validation_counts"]), sum(metadata["test_counts"])
    out_console.print(f"{out}/validation: {validation} images, {out}/test: {test} images, both balanced")
    out_console.print(
        f"balance it: fgs-client balance --dataset imagefolder --root {out}/train --prompt-template "
        "'a handwritten digit {class_name}' --preset digits --classifier YOURS.pt --classifier-spec SPEC.json",
        soft_wrap=True,
        highlight=False,
    )


@app.command("digits-contexts")
def digits_contexts(
    out: Annotated[Path, typer.Option("--out", help="where the NICO++-layout tree, validation/ and test/ go")] = Path(
        "digits-contexts"
    ),
) -> None:
    """Write Digits-Contexts, NICO++ in miniature: handwritten digits drawn in NICO++'s six contexts, the train
    split group-imbalanced (each digit mostly in one or two contexts, 20 of 60 groups empty), validation and test
    group-balanced, in NICO++'s released layout for `balance --dataset nico++`, with the embedded
    fgs-digits-contexts model. Needs scikit-learn (the `train` extra)."""
    from fgs_client.digits_contexts import METADATA_FILE, build_digits_contexts

    if (out / METADATA_FILE).is_file():
        out_console.print(f"{out} already holds Digits-Contexts")
    else:
        try:
            build_digits_contexts(out)
        except ImportError as error:
            raise fail(f"{error}; install the train extra: pip install 'fgs[train]'", EXIT_BAD_INPUT) from None
    metadata = json.loads((out / METADATA_FILE).read_text())
    train = sum(sum(row.values()) for row in metadata["train_counts"].values())
    groups = len(metadata["class_names"]) * len(metadata["contexts"])
    out_console.print(
        f"{out}/{metadata['layout']['train']}: {train} images in {groups - len(metadata['empty_groups'])} of "
        f"{groups} class x context groups (largest {metadata['largest_group']}, {len(metadata['empty_groups'])} empty)",
        soft_wrap=True,
    )
    held_out = groups * metadata["validation_per_group"], groups * metadata["test_per_group"]
    out_console.print(f"{out}/validation: {held_out[0]} images, {out}/test: {held_out[1]} images, group-balanced")
    out_console.print(
        f"balance it: FGS_MODEL=fgs-digits-contexts fgs up, then fgs-client balance --dataset nico++ --root {out} "
        f"--preset paper-nicopp --target {metadata['largest_group']} --classifier YOURS.pt --classifier-spec SPEC.json",
        soft_wrap=True,
        highlight=False,
    )


@app.command("class-folders")
def class_folders(
    out: Annotated[Path, typer.Option("--out", help="a balanced dataset written by `balance` (holds manifest.csv)")],
    dest: Annotated[Path, typer.Option("--dest", help="where the <class>/<image> folders go")],
    real_files: Annotated[RealFiles, typer.Option("--real-files", help="hard links or copies")] = RealFiles.link,
) -> None:
    """torchvision's ImageFolder layout of a balanced dataset (real and synthetic images, one folder per class),
    for layouts that are not class-per-folder already (NICO++, ImageNet-LT). When two classes share a name
    (ImageNet-LT's two "crane"), every folder is `<class index>-<name>`, so that the folders' order is the classes'."""
    from fgs_client.dataset_writer import write_class_folders

    if not (out / "manifest.csv").is_file():
        raise fail(f"{out} has no manifest.csv: run `fgs-client balance` first", EXIT_BAD_INPUT)
    count = write_class_folders(out, dest, real_files.value)
    out_console.print(
        f"{count:,} images in {dest}/<class>/: torchvision.datasets.ImageFolder({str(dest)!r}), or Hugging Face "
        f"datasets.load_dataset('imagefolder', data_dir={str(dest)!r}) with {dest / 'metadata.csv'}",
        soft_wrap=True,
    )


@app.command()
@generation_options(on_invalid=lambda message: fail(message, EXIT_BAD_INPUT), exclude=("omega", "gamma"))
def sweep(
    dataset: DatasetOption,
    root: Annotated[Path, typer.Option("--root", help="the dataset root")],
    classes: Annotated[str, typer.Option("--classes", help="comma-separated class names or indices (a few rare ones)")],
    classifier: Annotated[
        Path, typer.Option("--classifier", help="the team's classifier archive (returns logits, embedding)")
    ],
    classifier_spec: Annotated[Path, typer.Option("--classifier-spec", help="its ClassifierSpec JSON")],
    out: Annotated[Path, typer.Option("--out", help="folder for the images, grids and tables")],
    omega: Annotated[
        str, typer.Option("--omega", help="feedback scales ω to try, comma-separated")
    ] = "0,0.01,0.03,0.1,0.3",
    gamma: Annotated[
        str | None, typer.Option("--gamma", help="guidance scales γ to try (default: the preset's or the default)")
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, max=64, help="images per class and setting (the same seeds in each)")
    ] = 4,
    seed: Annotated[int, typer.Option("--seed", help="first generation seed; also picks the conditioning image")] = 0,
    hardness_stats: HardnessStatsOption = None,
    size: Annotated[int, typer.Option("--size", help="grid thumbnail side in pixels")] = 96,
    grid_layout: Annotated[
        str,
        typer.Option(
            "--grid-layout", help="paper: rows ω, columns γ, one seed (Figs. 12-14); seeds: a row per setting"
        ),
    ] = "paper",
    split_file: Annotated[Path | None, typer.Option("--split-file")] = None,
    class_names: Annotated[Path | None, typer.Option("--class-names")] = None,
    groups: Annotated[Path | None, typer.Option("--groups")] = None,
    prompt_template: PromptTemplateOption = None,
    prompts: PromptsOption = None,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    *,
    generation: GenerationParams,
) -> None:
    """A pilot before the big job: a few images per (ω, γ) for a few classes; a grid PNG per class, a table per
    setting (intended-class share, mean criterion, density and coverage); a suggested setting only from a rule
    validated on Digits-LT (none is yet: it says why).
    Needs the `train` extra (torch) to embed the images with the classifier."""
    from fgs_client import pilot_sweep

    try:
        from fgs_client.training import embed_images, load_classifier_archive
    except ImportError as error:
        raise fail(f"sweep needs the train extra (pip install 'fgs[train]'): {error}", EXIT_BAD_INPUT) from None
    check_sweep_options(generation, grid_layout)
    parsed = read_classifier_spec(classifier_spec)
    settings = sweep_settings(generation, omega, gamma)
    scanned = scan(dataset, root, split_file, class_names, groups, prompt_template, prompts)
    chosen = pilot_sweep.resolve_classes(classes, scanned.class_names)
    match = match_classifier(parsed, scanned)
    model = load_classifier_archive(classifier, parsed)
    with make_client(url, api_key) as client:
        classifier_id = client.upload_classifier(classifier, parsed, hardness_stats).classifier_id
        sweeps = pilot_sweep.run_sweep(
            client,
            scanned,
            chosen,
            settings,
            generation,
            num_seeds=seeds,
            seed=seed,
            classifier_id=classifier_id,
            out=out / "images",
            classifier_index=match.classifier_index,
        )

    def embed(paths: list[Path]):
        return embed_images(model, paths, [0] * len(paths))[0].numpy()

    real = {c: embed([im.path for im in scanned.images if im.class_index == c][:500]) for c in chosen}
    pooled, per_class = pilot_sweep.setting_rows(sweeps, settings, real, embed)
    grids = [
        pilot_sweep.write_grid(s, settings, out / f"grid_{s.class_index:04d}_{s.class_name}.png", size, grid_layout)
        for s in sweeps
    ]
    report_sweep(out, generation, pooled, per_class, grids, grid_layout, f"{len(chosen)} classes x {seeds} seeds")


def match_classifier(spec: ClassifierSpec, scanned: ScannedDataset) -> ClassMatch:
    """The classifier's classes matched to the dataset's by name, as `balance` matches them, with its note."""
    match = match_classes(spec, scanned.class_names)
    if match.note:
        err_console.print(f"[yellow]note:[/] {match.note}", soft_wrap=True)
    return match


def check_sweep_options(generation: GenerationParams, grid_layout: str) -> None:
    from fgs_client import pilot_sweep

    if generation.criterion.value == "none":
        raise fail("--criterion is needed: the sweep varies the feedback scale of a criterion", EXIT_BAD_INPUT)
    if grid_layout not in pilot_sweep.GRID_LAYOUTS:
        raise fail(f"--grid-layout: choose one of {', '.join(pilot_sweep.GRID_LAYOUTS)}", EXIT_BAD_INPUT)


def sweep_settings(generation: GenerationParams, omega: str, gamma: str | None) -> list[SweepSetting]:
    """The (omega, gamma) settings to try, each checked as a generation before anything is uploaded."""
    from fgs_client import pilot_sweep

    omegas = pilot_sweep.parse_floats(omega, "omega")
    gammas = pilot_sweep.parse_floats(gamma, "gamma") if gamma else [generation.gamma]
    settings = [pilot_sweep.SweepSetting(w, g) for g in gammas for w in sorted(omegas)]
    for setting in settings:
        try:
            GenerationParams.model_validate(generation.model_dump() | {"omega": setting.omega, "gamma": setting.gamma})
        except ValidationError as error:
            raise UserInputError(validation_message(error)) from None
    return settings


def report_sweep(
    out: Path,
    generation: GenerationParams,
    pooled: list[SettingRow],
    per_class: dict[str, list[SettingRow]],
    grids: list[Path],
    grid_layout: str,
    scope: str,
) -> None:
    """sweep.md and sweep.json in `out`, and the table, the suggestion (or why none) and the files on stdout."""
    from fgs_client import pilot_sweep

    suggestion = pilot_sweep.validated_suggestion(pooled)
    criterion = generation.criterion.value
    markdown = pilot_sweep.sweep_markdown(pooled, per_class, suggestion, criterion, grids, grid_layout)
    (out / "sweep.md").write_text(markdown)
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "criterion": criterion,
                "base": generation.model_dump(mode="json"),
                "settings": [r.as_dict() for r in pooled],
                "per_class": {name: [r.as_dict() for r in rows] for name, rows in per_class.items()},
                "suggested": suggestion[0].as_dict() if suggestion else None,
                "reason": suggestion[1] if suggestion else pilot_sweep.RULE_STATUS,
                "grid_layout": grid_layout,
            },
            indent=1,
        )
    )
    table = Table(title=f"pilot sweep: {scope} per setting")
    for column in ("setting", "images", "intended share", f"mean {criterion}", "density", "coverage"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for r in pooled:
        table.add_row(
            r.setting.label,
            str(r.images),
            f"{r.intended_share:.2f}",
            f"{r.mean_criterion:.3f}",
            f"{r.density:.2f}",
            f"{r.coverage:.2f}",
        )
    out_console.print(table)
    if suggestion:
        out_console.print(f"suggested: {suggestion[1]}", soft_wrap=True)
    else:
        out_console.print(f"no suggestion: {pilot_sweep.RULE_STATUS}", soft_wrap=True)
    out_console.print(
        f"grids ({grid_layout} layout: {pilot_sweep.GRID_LAYOUTS[grid_layout]}): {', '.join(str(g) for g in grids)}; "
        f"table: {out / 'sweep.md'}",
        soft_wrap=True,
    )


def main() -> None:  # pragma: no cover - console entry for `python -m fgs_client.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

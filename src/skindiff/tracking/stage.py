"""The stage protocol: how every stage run is found, or opened, keyed and tagged.

A stage run's key (tag `skindiff.run_key`) is the SHA-256 of
- the stage and its settings (its own options, as logged);
- what it reads: the content digests of the splits it loads (not where they lie), the keys of
  the upstream runs whose outputs it uses, and other content (the base model's fingerprint, a
  generator model's weights);
- the code version: a digest of the source files of the science packages the stage runs plus
  the ground floor they share (`core`, `errors.py`), so editing the classifier does not
  invalidate trained generators, nor generator code a classifier trained on real images.

`run_stage` is the one way a stage runs. With `reuse` (a pipeline, or one stage resolving
another) it computes the key first and returns the FINISHED run with that key in the active
experiment, else opens the stage run, nested under the active run; while another process
sharing the cache is at work on the key, it waits for that run to end and returns it if it
FINISHED, so two pipelines reaching one stage do its work once. As a command (`skindiff
generate`, `mlflow run -e generate`) it opens its run first, so that the upstream runs it has
to make nest under it. The key also names the stage's work folder in the cache, so a run
killed mid-way resumes from its checkpoints when the same key is run again.

Every run is opened here (`open_stage_run`: stage runs, and the pair and trial runs above them)
and found here: by key, by stage, by parent, and through the upstream runs each stage declares
(`UPSTREAM`), so no other module searches runs by tag. Each stage run says on the console when it
starts, ends or is re-used, naming its pair (`[ii/seed-42] lora: ...`).

A run's end: it ends FINISHED, or FAILED when its block raises; a command stopped by SIGTERM or
SIGINT ends the runs it has open KILLED (`end_stopped_runs`, called by the CLI). A SIGKILLed
process (or one cut off from the tracking server) leaves its runs RUNNING: each run carries the
pid and host of its process, and the next run of the same key, about to take over the key's
work folder, ends those whose process is gone FAILED (`end_stale_runs`).
"""

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run, RunStatus

import skindiff
from skindiff import __version__
from skindiff.core.files import cache_dir, work_folder_lock
from skindiff.core.manifest import content_digest
from skindiff.errors import SkindiffError
from skindiff.tracking.dry_run import (
    PlannedStage,
    WorkCost,
    active_plan,
    is_planned,
    planned_key,
)
from skindiff.tracking.names import (
    ENTRY_POINT_TAG,
    HOST_TAG,
    PARENT_RUN_TAG,
    PID_TAG,
    RUN_KEY_TAG,
    SUPERSEDED_BY_TAG,
    VERSION_TAG,
    Stage,
    upstream_tag,
)
from skindiff.tracking.server import single_tries, unreachable_server

logger = logging.getLogger(__name__)
# One line per stage as it starts, ends or is re-used: what a person follows on the console.
progress = logging.getLogger("skindiff.progress")

# The science packages whose code decides each stage's results (besides the ground floor).
STAGE_CODE = {
    Stage.PREPARE: ("data",),
    Stage.TEXTUAL_INVERSION: ("data", "diffusion"),
    Stage.LORA: ("data", "diffusion"),
    Stage.GENERATE: ("data", "diffusion"),
    Stage.TRAIN_CLASSIFIER: ("data", "classify"),
    Stage.EVALUATE: ("data", "classify"),
    Stage.SYNTHETIC_QUALITY: ("data", "classify", "quality"),
}
GROUND_FLOOR = ("core", "errors.py")
# The stages whose runs each stage's runs are made from: tagged `skindiff.<stage>_run_id` on
# its runs (empty where a mode uses none), and the only upstream runs `upstream_run_id` reads.
UPSTREAM = {
    Stage.PREPARE: (),
    Stage.TEXTUAL_INVERSION: (Stage.PREPARE,),
    Stage.LORA: (Stage.PREPARE, Stage.TEXTUAL_INVERSION),
    Stage.GENERATE: (Stage.PREPARE, Stage.TEXTUAL_INVERSION, Stage.LORA),
    Stage.TRAIN_CLASSIFIER: (Stage.PREPARE, Stage.GENERATE),
    Stage.EVALUATE: (),
    # the classifier whose features it compares, where those are a classifier's
    Stage.SYNTHETIC_QUALITY: (Stage.PREPARE, Stage.GENERATE, Stage.TRAIN_CLASSIFIER),
}


@dataclass(frozen=True)
class StageCall:
    """One call of a stage: `settings` decide its outputs (in the key, logged as params);
    `context` is logged too but not keyed (the data options: the splits' content is keyed)."""

    stage: Stage
    run_name: str
    settings: Mapping[str, str]
    context: Mapping[str, str] = field(default_factory=dict)
    work: str = ""  # what the stage does, for the console: "3000 steps", "20 epochs"
    # for a dry run: what the work costs, from the inputs
    cost: Callable[["StageInputs"], WorkCost] | None = None
    # for a dry run: the outputs later stages read before the run exists (prepare's splits)
    preview: Callable[[], Mapping[str, pd.DataFrame]] | None = None

    def console_label(self) -> str:
        """`[ii/seed-42] lora` from the run name `ii/seed-42/lora`; the stage's own words
        after the pair (`[i/seed-0] train_classifier tiny/real`)."""
        parts = self.run_name.split("/")
        pair = ""
        if len(parts) > 2 and parts[1].startswith("seed-"):
            pair, parts = f"[{parts[0]}/{parts[1]}] ", parts[2:]
        rest = "/".join(parts[1:] if parts[0] == self.stage else parts)
        return f"{pair}{self.stage}{' ' + rest if rest else ''}"


@dataclass
class StageInputs:
    """What a stage reads besides its settings."""

    prepare_run_id: str | None = None
    splits: dict[str, pd.DataFrame] = field(default_factory=dict)  # split name -> manifest
    upstream: dict[Stage, str | None] = field(default_factory=dict)  # run ids it builds on
    digests: dict[str, str] = field(default_factory=dict)  # other content it depends on


def run_stage(
    call: StageCall,
    resolve: Callable[[], StageInputs],
    work: Callable[[StageInputs, str], None],
    *,
    reuse: bool,
) -> str:
    """Runs a stage by the protocol of the module docstring; returns its run id.

    `resolve()` finds or runs the upstream runs and loads the splits, once; `work(inputs,
    key)` does the stage's work and logs its results into the active (stage) run. In a dry run
    (`dry_run.planning`) it returns the run found by key or a planned id, and runs nothing."""
    if active_plan() is not None:
        return _plan_stage(call, resolve())
    inputs = key = None
    with ExitStack() as waiting:
        if reuse:
            inputs = resolve()
            key = stage_key(call, inputs)
            found = find_finished_run(key)
            if found is None:
                # Another process at work on the key holds its work folder until its run has
                # ended (as this one does, below): wait for it, then use its run rather than
                # do the work again.
                waiting.enter_context(work_folder_lock(work_dir(call.stage, key)))
                found = find_finished_run(key)
            if found is not None:
                progress.info("%s: re-used run %s", call.console_label(), found.info.run_id)
                return found.info.run_id
        with open_stage_run(call.stage, call.run_name, {**call.context, **call.settings}) as run:
            if inputs is None:
                inputs = resolve()
                key = stage_key(call, inputs)
            mlflow.set_tags(_standard_tags(call.stage, key, inputs))
            # One process at a time works on a key: another one waits here, then finds the
            # work done in the work folder. The lock names a holder that died holding it.
            with work_folder_lock(work_dir(call.stage, key), holder=run.info.run_id) as dead:
                end_stale_runs(key, run.info.run_id, dead)
                started = time.monotonic()
                progress.info("%s: %s...", call.console_label(), call.work or "running")
                work(inputs, key)
    progress.info(
        "%s: done in %s, run %s",
        call.console_label(),
        duration_text(time.monotonic() - started),
        run.info.run_id,
    )
    return run.info.run_id


def _plan_stage(call: StageCall, inputs: StageInputs) -> str:
    """Records `call` in the active dry run: re-used where a finished run has its key, else
    to run, at its cost; returns the run id or the planned id."""
    plan = active_plan()
    key = stage_key(call, inputs)
    found = find_finished_run(key) if plan.look_up else None
    planned = PlannedStage(
        plan.group,
        str(call.stage),
        call.run_name,
        key,
        found.info.run_id if found else None,
        call.cost(inputs) if call.cost and not found else WorkCost(),
        call.work,
        plan.repeats,
    )
    plan.record(planned)
    if not found:
        plan.upstream[planned.planned_id] = {
            str(stage): run_id for stage, run_id in inputs.upstream.items()
        } | {str(Stage.PREPARE): inputs.prepare_run_id}
        if call.preview:
            plan.outputs[planned.planned_id] = call.preview()
    return planned.planned_id


def plan_unkeyed_stage(call: StageCall, upstream: str) -> str:
    """Records in the active dry run a stage whose key cannot be known before its `upstream`
    run exists (an evaluation of a classifier not trained yet): it runs."""
    plan = active_plan()
    cost = call.cost(StageInputs()) if call.cost else WorkCost()
    key = f"{upstream_key(upstream)}/{call.stage}"  # one per upstream run
    planned = PlannedStage(plan.group, str(call.stage), call.run_name, key, None, cost, call.work)
    plan.record(planned)
    return planned.planned_id


def duration_text(seconds: float) -> str:
    """`4 min 12 s`, `38 s`, `1 h 02 min`: a duration as a person reads it."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@contextmanager
def open_stage_run(
    stage: Stage, run_name: str, params: Mapping[str, str], tags: Mapping[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Opens the run of `stage`: the `mlflow run` run when there is one, else a new run, nested
    under the active run when there is one. It ends FAILED if the block raises. It is tagged
    with this process's pid and host (see `end_stale_runs`).

    `mlflow run` has already logged the entry point's parameters (as it quoted them for the
    shell); MLflow forbids changing a param, so only the others are added.

    A block that met the server gone (its retries spent) ends the run with one try
    (`single_tries`): each run above it would otherwise wait as long again."""
    with (
        ExitStack() as ending,
        mlflow.start_run(
            run_name=run_name,
            nested=mlflow.active_run() is not None,
            tags={
                ENTRY_POINT_TAG: str(stage),
                VERSION_TAG: __version__,
                **process_tags(),
                **(tags or {}),
            },
        ) as run,
    ):
        logged = mlflow.get_run(run.info.run_id).data.params
        missing = {key: value for key, value in params.items() if key not in logged}
        if missing:
            mlflow.log_params(missing)
        try:
            yield run
        except Exception as err:
            if unreachable_server(err):
                ending.enter_context(single_tries())
            raise


def _standard_tags(stage: Stage, key: str, inputs: StageInputs) -> dict[str, str]:
    """The key and the declared upstream runs (`UPSTREAM`) of a stage run."""
    used = {Stage.PREPARE: inputs.prepare_run_id, **inputs.upstream}
    undeclared = {s for s, run_id in used.items() if run_id} - set(UPSTREAM[stage])
    if undeclared:
        raise ValueError(f"{stage} declares no upstream {', '.join(sorted(undeclared))}")
    return {RUN_KEY_TAG: key} | {
        upstream_tag(upstream): used.get(upstream) or "" for upstream in UPSTREAM[stage]
    }


def upstream_of(run_id: str, stage: Stage) -> str | None:
    """The run of `stage` that the run `run_id` was made from, or, in a dry run, that the
    planned run `run_id` would be made from."""
    if is_planned(run_id):
        return active_plan().upstream[run_id].get(str(stage))
    return upstream_run_id(mlflow.get_run(run_id), stage)


def upstream_run_id(run: Run, stage: Stage) -> str | None:
    """The run of `stage` that `run` was made from (None where its mode used none)."""
    own = Stage(run.data.tags[ENTRY_POINT_TAG])
    if stage not in UPSTREAM.get(own, ()):
        raise ValueError(f"{own} declares no upstream {stage}")
    return run.data.tags.get(upstream_tag(stage)) or None


def require_stage_run(run_id: str, stage: Stage) -> mlflow.entities.Run:
    """The FINISHED run `run_id` of `stage`, or a clear error saying what it is instead."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise SkindiffError(
            f"{stage} run {run_id!r} not found on {mlflow.get_tracking_uri()}"
        ) from None
    found = run.data.tags.get(ENTRY_POINT_TAG)
    if found != stage:
        raise SkindiffError(f"run {run_id} is a {found or 'untagged'} run, not a {stage} run")
    if run.info.status != "FINISHED":
        raise SkindiffError(f"{stage} run {run_id} is {run.info.status}, not FINISHED")
    return run


def parent_run_id(run: Run) -> str | None:
    """The run `run` is nested under, if any."""
    return run.data.tags.get(PARENT_RUN_TAG) or None


def finished_runs(experiment_id: str, stage: Stage) -> list[Run]:
    """The FINISHED runs of `stage` in an experiment, newest first."""
    return mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ENTRY_POINT_TAG}` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )


def child_runs(parent: Run, status: str | None = None) -> list[Run]:
    """The runs nested directly under `parent` (with `status`, if given), newest end first."""
    condition = f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'"
    if status:
        condition += f" and attributes.status = '{status}'"
    return mlflow.search_runs(
        [parent.info.experiment_id],
        condition,
        order_by=["attributes.end_time DESC"],
        output_format="list",
    )


def run_tree(run: Run) -> list[Run]:
    """`run` and every run nested under it, at any depth."""
    return [run] + [r for child in child_runs(run) for r in run_tree(child)]


PACKAGE_ROOT = Path(skindiff.__file__).parent


@cache
def code_version(packages: tuple[str, ...], root: Path = PACKAGE_ROOT) -> str:
    """Digest of the Python sources of `packages` and of the ground floor under `root` (the
    installed skindiff): a change to them gives new keys."""
    files = []
    for name in (*GROUND_FLOOR, *packages):
        path = root / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def upstream_key(run_id: str | None) -> str:
    """What identifies an upstream run's output: its reuse key, else its id; "" for none."""
    if not run_id:
        return ""
    if is_planned(run_id):
        return planned_key(run_id)
    return mlflow.get_run(run_id).data.tags.get(RUN_KEY_TAG, run_id)


def stage_key(call: StageCall, inputs: StageInputs) -> str:
    """The reuse key of a stage run (see the module docstring)."""
    content = {name: content_digest(rows) for name, rows in inputs.splits.items()}
    content |= {str(stage): upstream_key(run_id) for stage, run_id in inputs.upstream.items()}
    content |= inputs.digests
    payload = {
        "stage": str(call.stage),
        "params": dict(call.settings),
        "inputs": content,
        "code": code_version(STAGE_CODE[call.stage]),
    }
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def find_finished_run(key: str) -> Run | None:
    """The newest FINISHED run of the active experiment with this key, if any."""
    runs = mlflow.search_runs(
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def work_dir(stage: Stage, key: str) -> Path:
    """Where a stage with this key keeps its checkpoints and outputs between attempts."""
    return cache_dir() / "work" / str(stage) / key


def process_tags() -> dict[str, str]:
    """This process, as the tags of the runs it opens."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: _host()}


@cache
def _host() -> str:
    # With the PID namespace: a container sharing the host's name (host networking) has pids of
    # its own, which this process could not check.
    try:
        return f"{socket.gethostname()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def _process_gone(run: Run) -> bool:
    """Whether the process that opened `run` is known to have exited: a process of this host
    (and PID namespace) that no longer exists. Another host's is never known gone."""
    tags = run.data.tags
    if tags.get(HOST_TAG) != _host() or not tags.get(PID_TAG, "").isdigit():
        return False
    try:
        os.kill(int(tags[PID_TAG]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        pass
    return False


def end_stale_runs(key: str, successor: str, dead_holder: str = "") -> list[str]:
    """Ends FAILED the RUNNING runs of `key` in the active experiment whose process is gone
    (SIGKILL, a crash, a lost tracking server) or that died holding the key's work folder
    (`dead_holder`, from its lock, on any host sharing the cache), with the RUNNING runs above
    them that process opened; tags each `skindiff.superseded_by=<successor>`. Returns their ids.

    FAILED, not KILLED: nothing stopped them on purpose (KILLED is a SIGTERM, Ctrl-C or a pruned
    trial), as `tune` marks the runs of a stale trial. Safe while other processes work on the
    same key: a live process is never touched. A run of another host is left RUNNING: without a
    heartbeat, a process on another machine (with a cache of its own) cannot be told dead from
    busy; a rerun on its host ends it."""
    client = mlflow.MlflowClient()
    running = mlflow.search_runs(
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status = 'RUNNING'",
        output_format="list",
    )
    ended = []
    for stale in running:
        if stale.info.run_id != dead_holder and not _process_gone(stale):
            continue
        for run in [stale, *_opened_above(client, stale)]:
            client.set_tag(run.info.run_id, SUPERSEDED_BY_TAG, successor)
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            ended.append(run.info.run_id)
    if ended:
        logger.info("ended FAILED, their process gone: %s", ", ".join(ended))
    return ended


def _opened_above(client: mlflow.MlflowClient, run: Run) -> list[Run]:
    """The RUNNING runs above `run` opened by its process: tagged with the same pid and host,
    or untagged (a nested run opened without `open_stage_run`, in the process of its children)."""
    above = []
    parent_id = run.data.tags.get(PARENT_RUN_TAG)
    while parent_id:
        parent = client.get_run(parent_id)
        tags = parent.data.tags
        same = PID_TAG not in tags or all(
            tags.get(tag) == run.data.tags.get(tag) for tag in (PID_TAG, HOST_TAG)
        )
        if parent.info.status != "RUNNING" or not same:
            break
        above.append(parent)
        parent_id = parent.data.tags.get(PARENT_RUN_TAG)
    return above


def end_stopped_runs(since_ms: int) -> list[str]:
    """Re-ends KILLED the runs this process ended FAILED since `since_ms` (a stop signal's
    time) while the signal unwound its `with` blocks: the last run it ended and the chain nested
    under it. Returns their ids, outermost first."""
    run = mlflow.last_active_run()
    stopped = []
    while run is not None and run.info.status == "FAILED" and run.info.end_time >= since_ms:
        mlflow.MlflowClient().set_terminated(
            run.info.run_id, RunStatus.to_string(RunStatus.KILLED), end_time=run.info.end_time
        )
        stopped.append(run.info.run_id)
        children = child_runs(run, "FAILED")
        run = children[0] if children else None
    return stopped

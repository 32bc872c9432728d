"""Dry runs: the plan of a command (`main --dry-run`, `tune`, `ablation`), made by the same
code that runs it, without running anything.

Under `planning()`, `run_stage` computes each stage's key as it would before a run, looks the
key up, and records `re-use <run id>` or `run` with what the work costs, in units no machine
decides (`WorkCost`); a stage that would run gets a planned id (`planned:<key>`) that the
stages after it read as they would a run id: its key, its upstream runs, and (for `prepare`)
its splits, computed in memory. No run is opened, no stage's work is done.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import pandas as pd
from tabulate import tabulate

PLANNED_PREFIX = "planned:"


@dataclass(frozen=True)
class WorkCost:
    """What one stage run costs: optimizer steps, images (trained on per step, generated,
    scored), UNet evaluations (forward passes; a training step's also runs backward) and
    their floating-point operations counted from the model's config, classifier image-epochs."""

    steps: int = 0
    images: int = 0
    unet_evaluations: int = 0
    flops: float = 0.0
    image_epochs: int = 0

    def __add__(self, other: "WorkCost") -> "WorkCost":
        return WorkCost(
            self.steps + other.steps,
            self.images + other.images,
            self.unet_evaluations + other.unet_evaluations,
            self.flops + other.flops,
            self.image_epochs + other.image_epochs,
        )

    def times(self, n: int) -> "WorkCost":
        return WorkCost(
            self.steps * n,
            self.images * n,
            self.unet_evaluations * n,
            self.flops * n,
            self.image_epochs * n,
        )


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a plan: the run it re-uses, or None where it runs; what it costs when it
    runs."""

    group: str  # the pair, trial or seed it belongs to: "i/seed-0"
    stage: str
    run_name: str
    key: str
    reused: str | None
    cost: WorkCost = WorkCost()
    work: str = ""  # the stage's own words: "3000 steps", "20 epochs"
    repeats: int = 1  # a tune trial's stages run once per trial

    @property
    def planned_id(self) -> str:
        return self.reused or PLANNED_PREFIX + self.key


@dataclass
class DryRun:
    """The stages a command would run, in the order it reaches them."""

    stages: list[PlannedStage] = field(default_factory=list)
    group: str = ""
    repeats: int = 1
    look_up: bool = True  # False: the group's stages run whatever finished runs there are
    notes: list[str] = field(default_factory=list)
    # what later stages read of a planned run: upstream run ids, and prepare's splits
    upstream: dict[str, Mapping[str, str | None]] = field(default_factory=dict)
    outputs: dict[str, Mapping[str, pd.DataFrame]] = field(default_factory=dict)

    def record(self, planned: PlannedStage) -> None:
        """Adds a stage reached for the first time: a run once (the real call re-uses it the
        next time it is reached), a re-used run once per group."""

        def seen(s: PlannedStage) -> tuple[str, str]:
            return (s.group if s.reused else "", s.planned_id)

        if seen(planned) not in {seen(s) for s in self.stages}:
            self.stages.append(planned)

    def stage_of(self, planned_id: str) -> PlannedStage:
        """The stage recorded under a planned id."""
        return next(s for s in self.stages if s.planned_id == planned_id)

    def total(self) -> WorkCost:
        return sum((s.cost.times(s.repeats) for s in self.stages if s.reused is None), WorkCost())

    def counts(self) -> tuple[int, int]:
        """(stage runs to run, stage runs re-used: each once, however many groups use it)."""
        run = sum(s.repeats for s in self.stages if s.reused is None)
        return run, len({s.reused for s in self.stages if s.reused is not None})


_active: ContextVar[DryRun | None] = ContextVar("dry_run", default=None)


@contextmanager
def planning() -> Iterator[DryRun]:
    """Within the block, stages are planned, not run (see the module docstring)."""
    plan = DryRun()
    token = _active.set(plan)
    try:
        yield plan
    finally:
        _active.reset(token)


def active_plan() -> DryRun | None:
    return _active.get()


@contextmanager
def plan_group(name: str, repeats: int = 1, *, look_up: bool = True) -> Iterator[None]:
    """The stages planned in the block belong to `name` (a pair, a trial), each run `repeats`
    times; without `look_up` they are planned to run, not looked up (a tune trial's: its
    settings are sampled, not those planned with)."""
    plan = _active.get()
    before = (plan.group, plan.repeats, plan.look_up)
    plan.group, plan.repeats, plan.look_up = name, repeats, look_up
    try:
        yield
    finally:
        plan.group, plan.repeats, plan.look_up = before


def is_planned(run_id: str | None) -> bool:
    return bool(run_id) and run_id.startswith(PLANNED_PREFIX)


def planned_key(run_id: str) -> str:
    return run_id.removeprefix(PLANNED_PREFIX)


def _number(value: float) -> str:
    return f"{value:,.0f}"


def flops_text(flops: float) -> str:
    """`812.3 TFLOP`, `4.1 PFLOP`: floating-point operations as a person reads them."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:,.1f} {unit}"
    return f"{flops:,.0f} FLOP"


HEADERS = ["", "stage", "plan", "work", "steps", "images", "UNet evals", "UNet FLOPs",
           "image-epochs"]  # fmt: skip


def _cost_cells(cost: WorkCost) -> list[str]:
    """A stage's costs as table cells; blank where it has none of a kind."""
    cells = [cost.steps, cost.images, cost.unet_evaluations, cost.flops, cost.image_epochs]
    texts = [_number(v) for v in cells[:3]] + [flops_text(cost.flops), _number(cells[4])]
    return [text if value else "" for value, text in zip(cells, texts, strict=True)]


def render_plan(plan: DryRun, throughput_tflops: float | None) -> str:
    """The plan as text: a table of the stages, the totals, and the projected hours where a
    throughput is given."""
    rows = []
    for s in plan.stages:
        if s.reused:
            what, costs = f"re-use {s.reused}", [""] * 5
        else:
            what, costs = "run" + (f" x{s.repeats}" if s.repeats > 1 else ""), _cost_cells(s.cost)
        rows.append([s.group, s.run_name.removeprefix(f"{s.group}/"), what, s.work, *costs])
    total = plan.total()
    run, reused = plan.counts()
    lines = [
        "Dry run: nothing was run or logged.",
        tabulate(rows, HEADERS, disable_numparse=True),
        "",
        f"stage runs: {run} to run, {reused} re-used",
        f"total: {_number(total.steps)} training steps, {_number(total.images)} images, "
        f"{_number(total.unet_evaluations)} UNet evaluations ({flops_text(total.flops)}), "
        f"{_number(total.image_epochs)} classifier image-epochs",
    ]
    if throughput_tflops:
        hours = total.flops / (throughput_tflops * 1e12) / 3600
        lines.append(
            f"projected: {hours:,.1f} h of UNet work at {throughput_tflops:g} TFLOP/s "
            "(classifiers, data loading and the VAE not included)"
        )
    else:
        lines.append(
            "projected hours: give --throughput-tflops, the TFLOP/s your device sustains on "
            "this UNet (`python -m benchmarks.generation --base-model <it>` measures it)"
        )
    return "\n".join(lines + plan.notes)

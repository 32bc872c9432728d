"""The `main` pipeline: one parent run per (scenario, seed), a child run per stage."""

from collections.abc import Sequence
from dataclasses import replace

import mlflow

from skindiff.data.prepare import PrepareConfig
from skindiff.tracking.prepare import run_prepare
from skindiff.tracking.runs import ENTRY_POINT_TAG, flatten_params, stage_run


def run_main(
    scenarios: Sequence[str], seeds: Sequence[int], base: PrepareConfig
) -> dict[tuple[str, int], str]:
    """Runs every stage for each scenario and seed; returns the prepare run id of each pair."""
    prepared: dict[tuple[str, int], str] = {}
    params = {"scenarios": ",".join(scenarios), "seeds": ",".join(map(str, seeds))}
    params |= {k: v for k, v in flatten_params(base).items() if k not in ("scenario", "seed")}
    with stage_run("main", "main", params):
        for scenario in scenarios:
            for seed in seeds:
                with mlflow.start_run(
                    run_name=f"{scenario}/seed-{seed}",
                    nested=True,
                    tags={ENTRY_POINT_TAG: "main", "skindiff.scenario": scenario},
                ):
                    mlflow.log_params({"scenario": scenario, "seed": seed})
                    config = replace(base, scenario=scenario, seed=seed)
                    prepared[(scenario, seed)] = run_prepare(config)
    return prepared

"""The `main` pipeline: one parent run per (scenario, seed), a child run per stage.

Each stage is found (a finished run with the same key) or run; so a second call re-uses
everything, and a call after a failure or a kill resumes at the stage that did not finish.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

import mlflow

from skindiff.data.prepare import PrepareConfig
from skindiff.diffusion.generate import GenerateConfig
from skindiff.diffusion.lora import LoraConfig
from skindiff.diffusion.textual_inversion import TextualInversionConfig
from skindiff.options import DATA, GENERATE, LORA, TEXTUAL_INVERSION, option_values
from skindiff.tracking.generate import ensure_generator_chain
from skindiff.tracking.prepare import ensure_prepare
from skindiff.tracking.runs import ENTRY_POINT_TAG, stage_run


@dataclass(frozen=True)
class PipelineRuns:
    """Run ids of one (scenario, seed)."""

    parent: str
    prepare: str
    textual_inversion: str
    lora: str
    generate: str


def run_main(
    scenarios: Sequence[str],
    seeds: Sequence[int],
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    generate_config: GenerateConfig,
) -> dict[tuple[str, int], PipelineRuns]:
    """Runs every stage for each scenario and seed; returns the run ids of each pair."""
    params = {"scenarios": ",".join(scenarios), "seeds": ",".join(map(str, seeds))}
    for group, config in (
        (DATA, data),
        (TEXTUAL_INVERSION, ti_config),
        (LORA, lora_config),
        (GENERATE, generate_config),
    ):
        params |= option_values(group, config)
    del params["scenario"], params["seed"]
    results = {}
    with stage_run("main", "main", params):
        for scenario in scenarios:
            for seed in seeds:
                with mlflow.start_run(
                    run_name=f"{scenario}/seed-{seed}",
                    nested=True,
                    tags={ENTRY_POINT_TAG: "main", "skindiff.scenario": scenario},
                ) as parent:
                    mlflow.log_params({"scenario": scenario, "seed": seed})
                    results[(scenario, seed)] = _run_pair(
                        parent.info.run_id,
                        replace(data, scenario=scenario, seed=seed),
                        replace(ti_config, seed=seed),
                        replace(lora_config, seed=seed),
                        replace(generate_config, seed=seed),
                    )
    return results


def _run_pair(
    parent: str,
    data: PrepareConfig,
    ti_config: TextualInversionConfig,
    lora_config: LoraConfig,
    generate_config: GenerateConfig,
) -> PipelineRuns:
    prepare = ensure_prepare(data)
    ti, lora, generate = ensure_generator_chain(
        data, ti_config, lora_config, generate_config, prepare
    )
    return PipelineRuns(parent, prepare, ti, lora, generate)

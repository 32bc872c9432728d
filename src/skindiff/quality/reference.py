"""The real images a scenario's synthetic images are compared with: the target group (dark,
FST 5-6) outside the scenario's test split. Scenario i's dark training images; for ii and iii
the seed's dark flexible subset, which ii trains on and iii uses nowhere (its test split is the
non-flexible dark images), so both take it from scenario ii's training split."""

import pandas as pd

from skindiff.data.cohort import DARK
from skindiff.data.config import Scenario

# The scenario whose training (and validation) split holds a scenario's reference images.
REFERENCE_SCENARIO = {Scenario.I: Scenario.I, Scenario.II: Scenario.II, Scenario.III: Scenario.II}


def reference_images(train: pd.DataFrame, val: pd.DataFrame) -> pd.DataFrame:
    """The dark rows of REFERENCE_SCENARIO's training and validation splits."""
    rows = pd.concat([train, val], ignore_index=True)
    return rows[rows["group"] == DARK].reset_index(drop=True)

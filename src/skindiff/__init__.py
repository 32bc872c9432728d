"""skindiff: diffusion-based augmentation of under-represented skin types, tracked with MLflow."""

import os

# OpenMP threads that spin while waiting lose most of their time when another process shares
# the cores (measured on 2 cores with one busy neighbour: img2img 10.6x slower spinning, 2.7x
# passive). The OpenMP runtime reads this once, when torch loads it, which is after this line
# whenever skindiff is imported first (every skindiff command and MLproject entry point).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

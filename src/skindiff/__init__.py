"""skindiff: diffusion-based augmentation of under-represented skin types, tracked with MLflow."""

from skindiff.core.threads import choose_thread_policy

# The OpenMP runtime reads its wait policy once, when torch loads it, which is after this line
# whenever skindiff is imported first (every skindiff command and MLproject entry point).
choose_thread_policy()

__version__ = "0.1.0"

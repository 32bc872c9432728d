"""skindiff: diffusion-based augmentation of under-represented skin types, tracked with MLflow."""

__version__ = "0.1.0"

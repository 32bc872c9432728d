"""skindiff: diffusion-based augmentation of under-represented skin types, tracked with MLflow.

Importing it changes nothing: a command sets the process up where it starts (`cli.run`).
"""

__version__ = "0.1.0"

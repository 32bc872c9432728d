"""A logged classifier, stored without pickle: an `mlflow.pyfunc` model made of the network's
weights (`artifacts/model.safetensors`) and `classifier_code.py`, the file MLflow runs to
rebuild it when it loads the model (its "models from code"). The architecture comes from the
installed skindiff (`build_classifier`), as for the pickled models of earlier versions.

`mlflow.pyfunc.load_model("runs:/<id>/model").predict(images)` gives the logits of float32
images [n, 3, image_size, image_size] normalised as skindiff's test-time transform does (the
model's metadata holds `labels`, in logit order, and `image_size`); `load_classifier` gives the
torch module, which `evaluate` scores.
"""

from pathlib import Path

import mlflow
import numpy as np
import torch
from torch import nn

from skindiff.classify.data import memory_format_on
from skindiff.classify.models import build_classifier

CODE_FILE = Path(__file__).with_name("classifier_code.py")
WEIGHTS = "weights"  # the model's artifact holding the state_dict (safetensors)


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Rebuilds the network from `model_config` (arch, num_classes) and the weights."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config
        model = build_classifier(
            config["arch"], config["num_classes"], Path(context.artifacts[WEIGHTS])
        )
        # The layout training leaves a CPU-trained model in: the same logits, bit for bit.
        self.model = model.to(memory_format=memory_format_on(torch.device("cpu"))).eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.as_tensor(model_input)).numpy()


def load_classifier(model_uri: str) -> nn.Module:
    """The torch module of a logged classifier, on the CPU, in eval mode; a run logged by an
    earlier skindiff holds a pickled `mlflow.pytorch` model, which loads as such."""
    if "pytorch" in mlflow.models.get_model_info(model_uri).flavors:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model

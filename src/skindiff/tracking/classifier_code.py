"""What MLflow runs to rebuild a logged classifier when it loads it (see classifier_model.py):
a copy of this file is logged with every classifier. skindiff never imports it."""

from mlflow.models import set_model

from skindiff.tracking.classifier_model import ClassifierModel

set_model(ClassifierModel())

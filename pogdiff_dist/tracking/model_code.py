"""MLflow "model from code": what ``mlflow.pyfunc.load_model`` runs to build the logged model
(no pickled Python object in the store). See :mod:`pogdiff_dist.tracking.model`."""

import mlflow

from pogdiff_dist.tracking.model import ImageGenerator

mlflow.models.set_model(ImageGenerator())

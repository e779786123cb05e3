"""The exported pipeline as an MLflow model that generates images from prompts.

``mlflow.pyfunc.load_model("runs:/<id>/model").predict(pd.DataFrame({"prompt": [...], "seed": [...]}))``
(or a list of dicts) returns uint8 images ``[N, H, W, C]``, one request after another; each
request may set ``num_inference_steps``, ``guidance_scale``, ``seed`` and
``num_images_per_prompt`` (:class:`GenerationRequest`, the model's input schema, from the
type hints). The pipeline directory itself is the model's artifact (``artifacts/pipeline``),
so ``StableDiffusionPipeline.from_pretrained`` also reads it straight from the store.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import numpy as np
import pydantic

PIPELINE_ARTIFACT = "pipeline"
MODEL_NAME = "model"  # runs:/<id>/model


class GenerationRequest(pydantic.BaseModel):
    """One row of the model's input."""

    prompt: str
    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    seed: int = 0
    num_images_per_prompt: int = 1


class ImageGenerator(mlflow.pyfunc.PythonModel):
    """Requests in, images out, on the first GPU when the loading process has one."""

    def load_context(self, context) -> None:
        import torch

        from pogdiff_dist.pipeline import load_pipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(context.artifacts[PIPELINE_ARTIFACT], device)

    def predict(self, model_input: list[GenerationRequest], params: dict | None = None) -> list[list[list[list[int]]]]:
        """uint8 ``[N, H, W, C]`` (a numpy array; the hint is the schema MLflow shows)."""
        import torch

        return np.concatenate([
            self.pipe([r.prompt], num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale,
                      num_images_per_prompt=r.num_images_per_prompt, generator=torch.Generator().manual_seed(r.seed))
            for r in model_input])


def log_pipeline_model(tracking_uri: str, run_id: str, model_dir: Path, register_as: str | None = None) -> str:
    """Log ``model_dir`` (a diffusers pipeline directory) to the run as :class:`ImageGenerator`;
    ``register_as``: also a new version of that registered model. A resumed run replaces the
    model its earlier segment logged (kept when registered: a version points at it), so
    ``runs:/<id>/model`` is the latest export. Returns the model URI."""
    import pogdiff_dist

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    registered = {v.source.removeprefix("models:/") for v in client.search_model_versions(f"run_id = '{run_id}'")}
    for m in client.search_logged_models([experiment_id], filter_string=f"name = '{MODEL_NAME}'", max_results=1000):
        if m.source_run_id == run_id and m.model_id not in registered:
            client.delete_logged_model(m.model_id)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # an input example would run the pipeline at logging time; the type hints give the schema
        warnings.filterwarnings("ignore", message=".*input example")
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(Path(__file__).with_name("model_code.py")),
            artifacts={PIPELINE_ARTIFACT: str(model_dir)},
            code_paths=[str(Path(pogdiff_dist.__file__).parent)],
            # pinned from this environment, not inferred (inference imports the model and can reach the network)
            pip_requirements=_requirements(), registered_model_name=register_as)
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "diffusers", "transformers", "safetensors", "peft", "numpy", "pillow", "pydantic", "mlflow"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    return out

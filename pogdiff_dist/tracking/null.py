"""What a rank that does not log writes to: nothing (no MLflow import, so the training loop
can hold one without touching the tracking store)."""

from __future__ import annotations

from pathlib import Path


class NullRun:
    def close(self) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_image(self, step: int, key: str, image) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        pass

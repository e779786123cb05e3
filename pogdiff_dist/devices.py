"""Every decision the GPU path makes about devices and precision, each a small pure function.

A CPU machine cannot run the CUDA branch of these decisions, so each one takes the inputs a
GPU run gives it (an unindexed ``torch.device("cuda")``, a Ray task's GPU count, a card's
name) and returns the answer, and the tests call them with exactly those inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pogdiff_dist.syncs import host_side


def resolve_device(device: torch.device | str, current_cuda_index: int | None = None) -> torch.device:
    """The device with an index: ``cuda`` -> ``cuda:<current>``.

    ``torch.cuda.set_device`` and NCCL need an indexed device; a bare ``torch.device("cuda")``
    (what a script or a Ray task with ``CUDA_VISIBLE_DEVICES`` set would naturally pass) raises
    ``ValueError: Expected a torch.device with a specified index``. ``current_cuda_index``
    defaults to ``torch.cuda.current_device()`` and is asked only for an unindexed CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    index = torch.cuda.current_device() if current_cuda_index is None else current_cuda_index
    return torch.device("cuda", index)


def compute_dtype(precision: str) -> torch.dtype:
    """``train.precision`` -> the dtype the denoiser computes in (its master weights stay fp32)."""
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def task_device(gpus: float) -> str:
    """The device of a Ray task or actor that asked for ``gpus`` GPUs: Ray sets its
    ``CUDA_VISIBLE_DEVICES`` to the GPUs it was given, so ``cuda`` is the first of those."""
    return "cuda" if gpus > 0 else "cpu"


def auto_gpus(gpus_up: float, gpus_possible: float | None, declared: bool) -> float:
    """GPUs per actor or task for a stage set to ``auto`` (``prepare.gpus_per_encoder``, the
    evaluation's generators): 1 or 0, from three inputs, the most certain first.

    - ``gpus_up``: GPUs in the Ray cluster now (``ray.cluster_resources()``). Any -> 1.
    - ``gpus_possible``: GPUs the autoscaler's node types could add, when it reported them to
      Ray (the cluster config Ray Train checks its worker group against); ``None`` when nothing
      was reported. Known -> 1 if any node type has a GPU, else 0.
    - ``declared``: what the run itself says (``train.use_gpu``), asked only when the cluster
      has no GPU now and no autoscaler said what it can add: an autoscaling cluster starts with
      no GPU node at all (``min_workers: 0``), and the run that will train on GPUs is the best
      witness that GPU nodes will come. Without it the whole prepare ran on CPU, on the GPU nodes.
    """
    if gpus_up > 0:
        return 1.0
    if gpus_possible is not None:
        return 1.0 if gpus_possible > 0 else 0.0
    return 1.0 if declared else 0.0


@dataclass(frozen=True)
class Transfer:
    """How a host batch reaches the device: pinned host memory and an asynchronous copy on
    CUDA (a blocking host-to-device copy synchronises the stream, so the host could not run
    ahead of the GPU); a plain copy elsewhere."""

    pin: bool
    non_blocking: bool


def transfer(device: torch.device | str) -> Transfer:
    cuda = torch.device(device).type == "cuda"
    return Transfer(pin=cuda, non_blocking=cuda)


@host_side
def to_device(array, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host array (numpy or a CPU tensor) on ``device``: the one host-to-device copy of the
    training loop (:func:`transfer` says how)."""
    t = torch.as_tensor(array)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    how = transfer(device)
    if how.pin:
        t = t.pin_memory()
    return t.to(device, non_blocking=how.non_blocking)


@dataclass(frozen=True)
class Peak:
    """A card's dense BF16 tensor-core peak: the denominator of MFU."""

    card: str  # the table's entry, e.g. "H100 PCIe"
    bf16_tflops: float
    source: str


# Dense (no 2:4 sparsity) BF16 tensor-core peaks in TFLOP/s. NVIDIA's datasheets print the
# sparse figure with an asterisk ("* With sparsity"); the dense peak is half of it. Matched in
# this order against torch.cuda.get_device_name(): a bare "H100"/"H200" name is the SXM board
# ("NVIDIA H100 80GB HBM3", "NVIDIA H200"); PCIe and NVL boards say so in their names.
_H100 = "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 Tensor Core"
_H200 = "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): BF16 Tensor Core"
_A100 = "NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 Tensor Core 312 | 624*"
BF16_DENSE_PEAKS: tuple[tuple[str, Peak], ...] = (
    (r"\bH100\b.*\bNVL\b", Peak("H100 NVL", 835.5, f"{_H100} 1,671 TFLOPS* (NVL)")),
    (r"\bH100\b.*\bPCIe\b", Peak("H100 PCIe", 756.5, f"{_H100} 1,513 TFLOPS* (PCIe)")),
    (r"\bH100\b", Peak("H100 SXM", 989.4, f"{_H100} 1,979 TFLOPS* (SXM); Hopper whitepaper 989.4 dense")),
    (r"\bH200\b.*\bNVL\b", Peak("H200 NVL", 835.5, f"{_H200} 1,671 TFLOPS* (NVL)")),
    (r"\bH200\b", Peak("H200 SXM", 989.4, f"{_H200} 1,979 TFLOPS* (SXM)")),
    (r"\bA100\b.*\bPCIe\b", Peak("A100 PCIe", 312.0, f"{_A100} (PCIe and SXM alike)")),
    (r"\bA100\b", Peak("A100 SXM", 312.0, _A100)),
    (r"\bL4\b", Peak("L4", 121.0, "NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4): FP16/BF16 Tensor Core 242 TFLOPS*")),
    # AWS's variant of the A10 (whose datasheet gives 125 dense): NVIDIA publishes no A10G datasheet
    (r"\bA10G\b", Peak("A10G", 70.0, "no NVIDIA datasheet (an AWS part): 70 TFLOP/s BF16 tensor per "
                                     "baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference")),
)


def bf16_peak(device_name: str) -> Peak | None:
    """The dense BF16 peak of the card ``torch.cuda.get_device_name()`` names, or None for a
    card not in :data:`BF16_DENSE_PEAKS` (then there is no MFU, rather than a wrong one)."""
    for pattern, peak in BF16_DENSE_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None

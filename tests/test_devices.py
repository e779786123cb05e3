"""The GPU path's device decisions, called with the inputs a GPU run gives them (pogdiff_dist/devices.py)."""

import numpy as np
import pytest
import torch

from pogdiff_dist.devices import bf16_peak, compute_dtype, resolve_device, task_device, to_device, transfer


def test_an_unindexed_cuda_device_gets_the_current_index():
    # what benchmarks/gpu_check.py passes on a GPU machine: set_device would raise on it
    assert resolve_device(torch.device("cuda"), current_cuda_index=0) == torch.device("cuda", 0)
    assert resolve_device("cuda", current_cuda_index=3) == torch.device("cuda", 3)
    assert resolve_device(torch.device("cuda", 1), current_cuda_index=0) == torch.device("cuda", 1)  # kept
    assert resolve_device("cpu") == torch.device("cpu")


def test_set_device_rejects_what_resolve_device_fixes():
    """The failure the resolution prevents, from torch itself (no GPU needed to raise it)."""
    with pytest.raises(ValueError, match="index"):
        torch.cuda.set_device(torch.device("cuda"))


def test_precision_task_device_and_transfer_decisions():
    assert compute_dtype("bf16") is torch.bfloat16 and compute_dtype("fp32") is torch.float32
    assert task_device(1.0) == "cuda" and task_device(0.5) == "cuda" and task_device(0) == "cpu"
    assert transfer(torch.device("cuda", 0)) == transfer("cuda:1") and transfer("cuda").pin and transfer("cuda").non_blocking
    assert not transfer("cpu").pin and not transfer("cpu").non_blocking
    t = to_device(np.arange(4, dtype=np.int32), "cpu", torch.long)
    assert t.dtype == torch.long and t.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name, card, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),  # the SXM board's name says neither SXM nor PCIe
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5),
    ("NVIDIA H200", "H200 SXM", 989.4),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe", 312.0),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA A10G", "A10G", 70.0),
])
def test_bf16_peak_by_card_name(name, card, tflops):
    """torch.cuda.get_device_name() strings -> the table's entry: a PCIe or NVL card is not
    credited with the SXM peak."""
    peak = bf16_peak(name)
    assert peak is not None and (peak.card, peak.bf16_tflops) == (card, tflops) and peak.source


@pytest.mark.parametrize("name", ["NVIDIA L40S", "NVIDIA A10", "NVIDIA GH200 480GB", "NVIDIA GeForce RTX 4090", "cpu"])
def test_an_unknown_card_has_no_peak(name):
    assert bf16_peak(name) is None  # the check then reports no MFU instead of a wrong one

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


def test_the_text_encoders_4d_mask_equals_the_2d_mask_and_reads_nothing_on_the_host():
    """transformers checks a 2-D padding mask with ``mask.all()`` before SDPA (a device sync per
    call); TextEncoder passes the same mask as [B, 1, L, L] booleans, used as given."""
    from pogdiff_dist.models import TextEncoder, bundled_text_encoder_dir
    from pogdiff_dist.syncs import HostSyncCounter

    d = bundled_text_encoder_dir()
    te = TextEncoder(d, d, 16)
    ids, lens = (torch.from_numpy(a).long() for a in te.tokenize(["a red three", "a blue seven on a grey background"]))
    mask = (torch.arange(16)[None] < lens[:, None]).long()
    with HostSyncCounter() as plain:
        want = te.model(input_ids=ids, attention_mask=mask).last_hidden_state
    with HostSyncCounter() as ours:
        got, _ = te.encode_ids(ids, lens)
    assert [e.library for e in plain.events] == ["transformers"] and not ours.events
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# (GPUs up now, GPUs the autoscaler reported it can add, the run's train.use_gpu) -> GPUs per actor/task
AUTO_GPU_CASES = [
    (0, None, True, 1.0),   # `ray up`, min_workers 0, first second: no GPU node yet, the run trains on GPUs
    (0, None, False, 0.0),  # nothing up, nothing reported, a CPU run: CPU
    (2, None, False, 1.0),  # GPU nodes are up: use them, whatever the run declares
    (1, 8, True, 1.0),
    (0, 8, False, 1.0),     # an autoscaler that reported GPU node types: they will come
    (0, 0, True, 0.0),      # one that reported only CPU node types: no GPU can ever come
]


@pytest.mark.parametrize("up,possible,declared,want", AUTO_GPU_CASES)
def test_auto_gpus_from_what_the_cluster_has_can_add_and_the_run_declares(up, possible, declared, want):
    from pogdiff_dist.devices import auto_gpus

    assert auto_gpus(up, possible, declared) == want


def test_prepare_and_evaluation_auto_resolve_through_the_same_rule(monkeypatch, tmp_path):
    """Both "auto" settings read the cluster once through runtime.cluster_gpus; here it answers
    what an autoscaling GPU cluster answers in its first second (no GPU up, nothing reported)."""
    import yaml

    from pogdiff_dist import runtime
    from pogdiff_dist.evaluation import generate
    from pogdiff_dist.evaluation.generate import resolve_eval_gpus
    from pogdiff_dist.prepare import pipeline

    monkeypatch.setattr(runtime, "cluster_gpus", lambda: (0.0, None))
    monkeypatch.setattr(pipeline, "cluster_gpus", runtime.cluster_gpus)
    monkeypatch.setattr(generate, "cluster_gpus", runtime.cluster_gpus)
    assert pipeline.resolve_gpus("auto", use_gpu=True) == 1.0 and pipeline.resolve_gpus("auto", use_gpu=False) == 0.0
    assert pipeline.resolve_gpus(0.5, use_gpu=False) == 0.5  # a number is taken as given
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"use_gpu": True}}))
    assert resolve_eval_gpus("auto", tmp_path) == 1.0 and resolve_eval_gpus("auto", None) == 0.0
    assert resolve_eval_gpus(0, tmp_path) == 0.0


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

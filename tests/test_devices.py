"""The GPU path's device decisions, called with the inputs a GPU run gives them (pogdiff_dist/devices.py)."""

import numpy as np
import pytest
import torch

from pogdiff_dist.devices import compute_dtype, resolve_device, task_device, to_device, transfer


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

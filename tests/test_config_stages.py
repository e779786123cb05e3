"""Config by stage: each prepare stage's fingerprint covers exactly what the stage reads.

Every config key is changed, one at a time, to another valid value: a train-time key
leaves every prepare stage's fingerprint as it was (so nothing is re-prepared); a
prepare-time key changes the fingerprints of the stages that read it and of the stages
downstream of them, and no other (pogdiff_dist/config/stages.py)."""

import pytest

from pogdiff_dist.config import Config, from_dict
from pogdiff_dist.config.stages import (
    PREPARE_EXECUTION,
    PREPARE_KEYS,
    PREPARE_STAGES,
    UPSTREAM,
    is_train_time,
    stage_reads,
)
from pogdiff_dist.prepare.stages import stage_fingerprints

DIRS = ("/enc/text", "/enc/tok", None)
STRING_CHOICES = {
    "data.dataset": ["digits-it2i:S", "faces-it2i:M", "/data/people"], "data.sampling": ["uniform", "power"],
    "data.on_bad": ["skip"], "data.channels": [3, 1], "model.text_encoder": ["/models/other-text"], "model.unet": ["small", "tiny"],
    "model.image_encoder": ["/models/dinov2"], "model.prediction_type": ["v_prediction"],
    "model.pretrained": ["/models/sd15"], "model.init_unet": ["/runs/base/model"],
    "prepare.density_text": ["identity", "caption"], "prepare.knn_index": ["ivf", "flat"], "prepare.gpus_per_encoder": [1.0, 0.5],
    "loss.method": ["vanilla", "cbdm"], "loss.neighbor_grad": ["stop"], "loss.identity_weight": ["inverse"],
    "loss.psi_den_source": ["elbo", "identity_count"], "optim.schedule": ["cosine"], "train.precision": ["bf16"],
    "train.on_nonfinite": ["raise"], "eval.classifier": ["centroid", "digits"], "eval.encoder": ["/models/dinov2"],
    "tracking.tracking_uri": ["sqlite:////tmp/other.db"], "tracking.register_model": [None],
    "model.lora_targets": [("to_q", "to_v")], "loss.timestep_sampling": ["uniform"], "loss.flow_weighting": ["cosmap"],
}


def _candidates(key: str, value):
    if key in STRING_CHOICES:
        yield from (c for c in STRING_CHOICES[key] if c != value)
    if isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield from (value + 1, value * 2, value + 16, max(value - 1, 0))
    elif isinstance(value, float):
        yield from (value * 2 if value else 0.5, value / 2, value + 0.5)
    elif isinstance(value, tuple):
        yield from (value[:1], tuple(x * 0.99 for x in value) if all(isinstance(x, float) for x in value) else None)
    elif isinstance(value, str):
        yield value + "-other"
    elif value is None:
        yield from (2.0, 1, "/some/where", ("A",))


def changed_config(base: Config, key: str):
    """``base`` with ``key`` changed to the first other value that makes a valid config."""
    for alt in _candidates(key, base.flat()[key]):
        if alt is None or alt == base.flat()[key]:
            continue
        try:
            return from_dict(base.to_dict(), {key: alt})
        except (ValueError, TypeError):
            continue
    raise AssertionError(f"no other valid value found for {key}: extend STRING_CHOICES")


def _rerun(base: Config, cfg: Config) -> set[str]:
    before = stage_fingerprints(base, "records", DIRS)
    after = stage_fingerprints(cfg, "records", DIRS)
    return {s for s in PREPARE_STAGES if before[s] != after[s]}


def _downstream(stages: set[str]) -> set[str]:
    out = set(stages)
    while True:
        more = {s for s, ups in UPSTREAM.items() if out & set(ups)} - out
        if not more:
            return out
        out |= more


BASES = {"defaults": {}, "ivf, identity density": {"prepare.knn_index": "ivf", "prepare.density_text": "identity"},
         "pretrained": {"model.pretrained": "/models/sd15"}}


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_every_train_time_key_reruns_no_prepare_stage(base_name):
    base = from_dict({}, BASES[base_name])
    keys = [k for k in base.flat() if is_train_time(k)]
    assert {"model.lora_rank", "model.init_unet", "model.prediction_type", "model.unet", "loss.method",
            "data.sampling", "optim.lr", "train.seed"} <= set(keys)
    for key in keys:
        assert _rerun(base, changed_config(base, key)) == set(), key


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_every_prepare_time_key_reruns_the_stages_that_read_it_and_those_downstream(base_name):
    base = from_dict({}, BASES[base_name])
    reran_some = set()
    for key in PREPARE_KEYS:
        cfg = changed_config(base, key)
        readers = {s for s, reads in stage_reads(base).items() if key in reads}
        readers |= {s for s, reads in stage_reads(cfg).items() if key in reads}
        got = _rerun(base, cfg)
        if key in PREPARE_EXECUTION:
            assert got == set(), key  # how a stage runs, not what it makes
        else:
            assert got == _downstream(readers), (key, got, readers)
            reran_some |= {key} if got else set()
    # under these bases, these keys do change the prepared data
    want = {"data.dataset", "data.resolution", "model.image_encoder", "model.max_length", "prepare.k_max",
            "prepare.samples_per_shard", "prepare.density_epochs"}
    assert want <= reran_some


def test_the_stage_tables_name_real_keys_and_every_stage():
    flat = Config().flat()
    assert set(PREPARE_KEYS) <= set(flat)
    assert set(stage_reads(Config())) == set(PREPARE_STAGES) == set(UPSTREAM)
    # a LoRA change keeps the data; a token length change re-encodes and redoes everything after it
    assert _rerun(Config(), from_dict({}, {"model.lora_rank": 8})) == set()
    assert _rerun(Config(), from_dict({}, {"model.max_length": 16})) == set(PREPARE_STAGES)
    assert _rerun(Config(), from_dict({}, {"prepare.samples_per_shard": 64})) == {"shards"}
    assert _rerun(Config(), from_dict({}, {"prepare.density_epochs": 5})) == {"density", "shards"}

"""Typed config: defaults, dotted overrides, validation messages, YAML round trip."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from pogdiff_dist.config import (
    PAPER_POGDIFF,
    Config,
    LossConfig,
    OptimConfig,
    from_dict,
    load_config,
    parse_override,
    save_config,
)


def test_defaults_validate_and_match_method():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.loss.method == "pogdiff" and cfg.loss.neighbor_grad == "full"
    assert cfg.loss.psi_cap is None and cfg.loss.use_psi_img and cfg.loss.use_psi_den
    assert cfg.loss.k <= cfg.prepare.k_max
    # the paper's literal PoGDiff is one set of overrides away
    paper = load_config(None, PAPER_POGDIFF)
    assert (paper.loss.a1, paper.loss.a2, paper.loss.a3, paper.loss.den_temperature) == (1.0, 1.0, 1.0, 1.0)
    assert paper.loss.psi_den_source == "elbo" and paper.data.sampling == "uniform"


@pytest.mark.parametrize("name", ["default", "sd15", "sdxl", "sd3", "flux"])
def test_code_defaults_are_the_recommended_recipe(name):
    """A user who trains without a config file gets the recipe the configs use: the
    PoGDiff psi settings and data.sampling of configs/<name>.yaml equal the code defaults."""
    import yaml

    d = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"{name}.yaml").read_text())
    recipe_keys = ("method", "a1", "a2", "a3", "k", "neighbor_grad", "psi_den_source", "den_temperature")
    defaults = Config()
    assert {k: d["loss"][k] for k in recipe_keys if k in d["loss"]} == \
        {k: getattr(defaults.loss, k) for k in recipe_keys if k in d["loss"]}
    assert {"a1", "a2", "a3", "psi_den_source", "den_temperature"} <= set(d["loss"])
    assert d["data"]["sampling"] == defaults.data.sampling == "balanced"


@pytest.mark.parametrize("text,want", [
    ("loss.a1=2", ("loss.a1", 2)),
    ("loss.a1=2.5", ("loss.a1", 2.5)),
    ("loss.neighbor_grad=stop", ("loss.neighbor_grad", "stop")),
    ("loss.use_psi_den=false", ("loss.use_psi_den", False)),
    ("loss.psi_cap=null", ("loss.psi_cap", None)),
    (" loss.k =3", ("loss.k", 3)),
])
def test_parse_override(text, want):
    key, value = parse_override(text)
    assert (key, value) == want
    assert type(value) is type(want[1])


@pytest.mark.parametrize("bad", ["loss.a1", "a1=2", "=2", ""])
def test_malformed_override_raises(bad):
    with pytest.raises(ValueError) as e:
        parse_override(bad)
    assert repr(bad) in str(e.value)


def test_yaml_file_and_override_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"loss": {"a1": 3.0, "a2": 0.5, "k": 4}, "optim": {"lr": 0.001}}))
    cfg = load_config(p)
    assert (cfg.loss.a1, cfg.loss.a2, cfg.loss.k, cfg.optim.lr) == (3.0, 0.5, 4, 0.001)
    cfg2 = load_config(p, ["loss.a1=7", "train.zero_stage=3"])
    assert cfg2.loss.a1 == 7 and cfg2.loss.a2 == 0.5 and cfg2.train.zero_stage == 3
    cfg3 = load_config(p, {"loss.a2": 1.25})
    assert cfg3.loss.a1 == 3.0 and cfg3.loss.a2 == 1.25


def test_missing_or_non_mapping_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(p)


def test_unknown_section_and_key(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        from_dict({"bogus": {"a": 1}})
    with pytest.raises(ValueError, match="bogus.a"):
        load_config(None, ["bogus.a=1"])
    with pytest.raises(ValueError, match=r"loss\.foo"):
        load_config(None, ["loss.foo=1"])
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"optim\.learning_rate"):
        load_config(p)


@pytest.mark.parametrize("override,field", [
    ("loss.a3=0", "loss.a3"),
    ("loss.a3=-1", "loss.a3"),
    ("loss.a1=-1", "loss.a1"),
    ("loss.a2=-0.5", "loss.a2"),
    ("loss.neighbor_grad=foo", "loss.neighbor_grad"),
    ("loss.method=ddpm", "loss.method"),
    ("loss.den_temperature=0", "loss.den_temperature"),
    ("loss.psi_cap=0", "loss.psi_cap"),
    ("loss.k=0", "loss.k"),
    ("train.zero_stage=5", "train.zero_stage"),
    ("train.precision=fp16", "train.precision"),
    ("train.caption_dropout=1", "train.caption_dropout"),
    ("optim.lr=0", "optim.lr"),
    ("optim.schedule=linear", "optim.schedule"),
    ("data.dataset=digits-it2i:X", "data.dataset"),
    ("data.channels=2", "data.channels"),
    ("prepare.density_text=name", "prepare.density_text"),
    ("loss.k=21", "loss.k"),  # > prepare.k_max = 20
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_k_checked_against_k_max():
    assert load_config(None, ["loss.k=5", "prepare.k_max=5"]).loss.k == 5
    with pytest.raises(ValueError, match=r"loss\.k=6.*prepare\.k_max=5"):
        load_config(None, ["loss.k=6", "prepare.k_max=5"])


def test_sections_validate_on_direct_construction():
    with pytest.raises(ValueError, match=r"loss\.a3"):
        LossConfig(a3=0.0)
    with pytest.raises(ValueError, match=r"optim\.lr"):
        OptimConfig(lr=-1e-3)


def test_with_overrides_returns_new_object():
    base = Config()
    new = base.with_overrides({"loss.a1": 2.0, "loss.neighbor_grad": "stop"})
    assert new is not base
    assert new.loss.a1 == 2.0 and new.loss.neighbor_grad == "stop"
    assert base.loss.a1 == LossConfig().a1 != 2.0 and base.loss.neighbor_grad == "full"
    assert new.optim == base.optim and new.train == base.train
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.loss.a1 = 5.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"loss\.a3"):
        base.with_overrides({"loss.a3": 0})
    assert base == Config()


def test_flat_keys():
    cfg = Config().with_overrides({"loss.a2": 0.25})
    flat = cfg.flat()
    assert flat["loss.a1"] == LossConfig().a1 and flat["loss.a2"] == 0.25
    assert flat["optim.lr"] == cfg.optim.lr and flat["train.zero_stage"] == cfg.train.zero_stage
    assert all(k.count(".") == 1 for k in flat)
    n_fields = sum(len(dataclasses.fields(getattr(cfg, f.name))) for f in dataclasses.fields(cfg))
    assert len(flat) == n_fields
    # flat keys are valid overrides that reproduce the config
    assert Config().with_overrides(flat) == cfg


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["loss.a1=2.5", "loss.psi_cap=4.0", "optim.betas=[0.8, 0.95]", "optim.eps=0.000001",
                             "loss.neighbor_grad=stop", "train.name=roundtrip", "model.max_length=16"])
    assert cfg.optim.betas == (0.8, 0.95)
    p = tmp_path / "saved.yaml"
    save_config(cfg, p)
    back = load_config(p)
    assert back == cfg
    assert back.fingerprint("loss", "optim") == cfg.fingerprint("loss", "optim")
    assert isinstance(back.optim.betas, tuple)


def test_fingerprint_changes_only_with_its_sections():
    a = Config()
    b = a.with_overrides({"loss.a1": 2.0})
    assert a.fingerprint("loss") != b.fingerprint("loss")
    assert a.fingerprint("prepare", "data") == b.fingerprint("prepare", "data")


def test_deepspeed_config_from_the_typed_config():
    from pogdiff_dist.config import load_config
    from pogdiff_dist.train.engine import deepspeed_config

    cfg = load_config(None, {"optim.batch_size": 4, "optim.grad_accum": 3, "train.zero_stage": 2})
    ds = deepspeed_config(cfg.optim, cfg.train, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 2}  # CPU/gloo: no overlap
    gpu = load_config(None, {"train.use_gpu": True, "train.zero_stage": 2, "train.precision": "bf16"})
    ds = deepspeed_config(gpu.optim, gpu.train, world_size=8, device_type="cuda")
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["bf16"]["enabled"]
    assert ds["optimizer"]["params"]["fused"] is True and ds["optimizer"]["params"]["torch_adam"] is True
    # fused on CPU too: torch's fused AdamW is what honours found_inf (a non-finite step skipped on the device)
    assert deepspeed_config(cfg.optim, cfg.train, 2)["optimizer"]["params"]["fused"] is True
    z3 = load_config(None, {"train.use_gpu": True, "train.zero_stage": 3})
    assert deepspeed_config(z3.optim, z3.train, 8, "cuda")["zero_optimization"] == {"stage": 3}  # DeepSpeed's default

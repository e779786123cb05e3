"""The Trainer in one plain process (no Ray): N steps, checkpoint, resume to 2N on the same
loss curve as an uninterrupted run, a diffusers export; ZeRO-3 leaves the frozen text
encoder whole; the non-finite policy. Shards in the project's format, written without Ray."""

import numpy as np
import pytest
import torch
from conftest import synthetic_cfg


class RecordingTracker:
    """Keeps what the trainer logs (the MLflow tracker's interface)."""

    def __init__(self):
        self.logs = []

    def log(self, step, metrics):
        self.logs.append((step, dict(metrics)))

    def log_image(self, step, key, image):
        self.logs.append((step, {f"image:{key}": image.size}))

    def series(self, key):
        return [(s, m[key]) for s, m in self.logs if key in m]


def _cfg(**overrides):
    return synthetic_cfg(**{"train.checkpoint_every": 4, **overrides})


@pytest.mark.parametrize("first", [4, 6])  # stop at an epoch's end / in the middle of the second epoch
def test_resume_continues_the_uninterrupted_loss_curve_and_exports(synthetic, tmp_path, first):
    from diffusers import UNet2DConditionModel

    from pogdiff_dist.pipeline import PoGDiffPipeline
    from pogdiff_dist.train.local import train_local

    whole = RecordingTracker()
    trainer, checkpoints = train_local(_cfg(**{"optim.max_steps": 8}), synthetic, tmp_path / "whole", tracker=whole)
    assert trainer.state.step == 8 and [c.name for c in checkpoints.all()] == ["checkpoint_000004",
                                                                             "checkpoint_000008"]
    first_run, second = RecordingTracker(), RecordingTracker()
    train_local(_cfg(**{"optim.max_steps": first}), synthetic, tmp_path / "split", tracker=first_run)
    resumed, _ = train_local(_cfg(**{"optim.max_steps": 8}), synthetic, tmp_path / "split", resume=True,
                             tracker=second)

    want = whole.series("loss")
    got = first_run.series("loss") + second.series("loss")
    assert [s for s, _ in got] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)  # same batches, same draws
    assert second.series("resumed_from_step") == [(first, first)]
    assert any(v > 0 for _, v in whole.series("loss_pog"))  # the PoG term was active
    # nothing trained twice, nothing left out, whether the resume started a new epoch or continued one
    assert [e["epoch"] for e in resumed.state.epochs] == [0, 1]
    assert resumed.state.epochs == trainer.state.epochs
    assert all(e["epoch_samples"] == e["epoch_unique_samples"] == 16 and e["epoch_repeated_after_resume"] == 0
               for e in resumed.state.epochs)

    # the export is a diffusers pipeline holding the trained weights, identical for both runs
    a = UNet2DConditionModel.from_pretrained(str(tmp_path / "whole" / "model" / "unet"))
    b = UNet2DConditionModel.from_pretrained(str(tmp_path / "split" / "model" / "unet"))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    live = dict(trainer.engine.module.named_parameters())
    torch.testing.assert_close(dict(a.named_parameters())["conv_in.weight"], live["conv_in.weight"].detach())
    pipe = PoGDiffPipeline.from_pretrained(str(tmp_path / "whole" / "model"))
    img = pipe(["An image of Person A."], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 16, 16, 1) and img.std() > 0
    assert (tmp_path / "whole" / "samples.png").stat().st_size > 0


def test_zero3_partitions_the_unet_but_not_the_frozen_text_encoder(synthetic, tmp_path):
    from pogdiff_dist.train.engine import init_single_process
    from pogdiff_dist.train.local import LocalCheckpoints, read_local
    from pogdiff_dist.train.trainer import Trainer

    init_single_process("cpu")
    cfg = _cfg(**{"optim.max_steps": 2, "train.zero_stage": 3})
    trainer = Trainer(cfg, synthetic, "cpu", 0, 1, report=LocalCheckpoints(tmp_path), run_dir=tmp_path)
    assert all(hasattr(p, "ds_id") for p in trainer.engine.module.parameters())
    assert not any(hasattr(p, "ds_id") for p in trainer.text.model.parameters())
    assert trainer.text.model.dtype == torch.float32 and trainer.attention == ["AttnProcessor2_0"]  # SDPA
    state = trainer.fit(read_local())
    assert state.step == 2 and (tmp_path / "model" / "unet" / "config.json").is_file()


def test_nonfinite_policy_counts_runs_and_raises_naming_the_samples():
    from pogdiff_dist.config import TrainConfig
    from pogdiff_dist.train.state import TrainState, nonfinite_policy

    state = TrainState(step=8)
    skip = TrainConfig(on_nonfinite="skip", max_nonfinite=2)
    nonfinite_policy(state, skip, [6], [5, 6, 7, 8], {6: [3, 9]})  # one skip, then good steps reset the run
    assert (state.nonfinite, state.nonfinite_run) == (1, 0)
    with pytest.raises(FloatingPointError, match=r"step 10 on this rank \(samples \[1\]\); stopping: 2 non-finite "
                                                 r"steps in a row"):
        nonfinite_policy(state, skip, [9, 10], [9, 10], {10: [1]})
    with pytest.raises(FloatingPointError, match="step 3 skipped: a non-finite loss on another rank.*on_nonfinite=raise"):
        nonfinite_policy(TrainState(), TrainConfig(on_nonfinite="raise"), [3], [1, 2, 3], {})


def test_train_state_round_trips(tmp_path):
    from pogdiff_dist.train.state import TrainState

    g = torch.Generator().manual_seed(3)
    state = TrainState(step=5, epoch=1, nonfinite=2, epochs=[{"epoch": 0, "epoch_rows": 16.0}], last={"loss": 0.5},
                       generator=g.get_state())
    state.save(tmp_path / "s.safetensors")
    back = TrainState.load(tmp_path / "s.safetensors")
    assert (back.step, back.epoch, back.nonfinite, back.epochs, back.last) == (5, 1, 2, state.epochs, {"loss": 0.5})
    assert torch.equal(back.generator, state.generator)
    with pytest.raises(ValueError, match="holds no missing.safetensors"):
        TrainState.load(tmp_path / "missing.safetensors")


def test_an_idle_rank_takes_a_weight_zero_step_without_recording_psi(synthetic, tmp_path):
    """A rank whose share ran out while another's did not (uneven shares: balanced sampling on
    two workers) steps on its last batch with weight 0 (the optimiser still steps, so the
    ranks stay in lockstep): neither the psi record nor the logged window gains its samples."""
    from pogdiff_dist.train.local import train_local

    trainer, _ = train_local(_cfg(**{"optim.max_steps": 2, "train.caption_dropout": 0.0, "train.log_every": 100}),
                             synthetic, tmp_path)
    seen = trainer.psi.seen
    assert seen == 2 * trainer.cfg.optim.batch_size
    assert trainer._train_step(trainer._last_batch, idle=True)
    assert trainer.state.step == 3 and trainer.psi.seen == seen
    assert len(trainer.window) == 1 and trainer.window._steps[0].micro == []  # a step, no rows of this rank


@pytest.mark.parametrize("sampling", ["uniform", "balanced"])
def test_short_epochs_print_at_most_one_line_per_logging_window(synthetic, tmp_path, capsys, sampling):
    """Four-step epochs logged every 8 steps: the terminal gets epoch 0 and one epoch per
    window; every epoch is still recorded. With balanced sampling the undrawn samples of an
    epoch are the plan, not a loss: they do not force a line, and the line says "not drawn"."""
    from pogdiff_dist.train.local import train_local

    steps, every = (16, 8) if sampling == "uniform" else (32, 16)
    trainer, _ = train_local(_cfg(**{"optim.max_steps": steps, "train.log_every": every,
                                     "train.checkpoint_every": 100, "data.sampling": sampling}), synthetic, tmp_path)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[train] epoch")]
    epochs = [e["epoch"] for e in trainer.state.epochs]
    assert epochs == list(range(len(epochs))) and len(epochs) >= 4
    if sampling == "uniform":
        assert [ln.split(":")[0] for ln in lines] == ["[train] epoch 0", "[train] epoch 1", "[train] epoch 3"]
    else:
        assert lines[0].startswith("[train] epoch 0") and len(lines) <= 1 + steps // every < len(epochs)
        assert all("not drawn this epoch" in ln and "not delivered" not in ln for ln in lines)

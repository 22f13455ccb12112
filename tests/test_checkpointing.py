"""qtrainer.checkpointing: what a checkpoint holds, and that files of the old format still resume exactly."""
from __future__ import annotations

import json
import os

import numpy as np
import paddle
import pytest

from qtrainer import Trainer
from qtrainer.checkpoint_io import FORMAT_VERSION, CheckpointError, load_checkpoint_file, save_checkpoint_file
from qtrainer.checkpointing import load_checkpoint
from qtrainer.state import TrainerState

from fixtures import make_old_checkpoint as old
from helpers import TinyModule, make_loader, quiet_trainer_kwargs


def test_a_checkpoint_of_the_old_format_resumes_where_the_old_code_ended(tmp_path):
    with open(old.EXPECTED) as handle:
        expected = json.load(handle)
    module, trainer = old.fit(str(tmp_path), ckpt_path=old.CHECKPOINT)
    assert (trainer.global_step, trainer.current_epoch) == (expected["global_step"], expected["current_epoch"])
    for name, value in module.state_dict().items():
        np.testing.assert_allclose(value.numpy(), np.array(expected["weights"][name]), atol=1e-6, err_msg=name)
    assert len(trainer.log_history) == len(expected["log_history"])
    for row, old_row in zip(trainer.log_history, expected["log_history"]):
        assert row.keys() == old_row.keys()
        assert row == pytest.approx(old_row, abs=1e-6)


def test_format_1_is_upgraded_on_load():
    raw = load_checkpoint_file(old.CHECKPOINT)
    assert raw["qtrainer_checkpoint"] == 1 and "data_seed" in raw
    checkpoint = load_checkpoint(old.CHECKPOINT)
    assert checkpoint["qtrainer_checkpoint"] == FORMAT_VERSION
    assert "data_seed" not in checkpoint and "running_loss" not in checkpoint
    state = TrainerState()
    state.load_state_dict(checkpoint["trainer_state"])
    assert (state.epoch, state.global_step, state.batches_done, state.data_seed) == (1, 6, 2, raw["data_seed"])
    assert list(state.running_loss) == raw["running_loss"]


def test_a_checkpoint_holds_the_trainer_state_and_every_part_of_the_run(tmp_path):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, seed=3))
    trainer.fit(TinyModule(), make_loader())
    path = str(tmp_path / "a.ckpt")
    trainer.save_checkpoint(path)
    checkpoint = load_checkpoint(path)
    assert set(checkpoint["trainer_state"]) == set(TrainerState().checkpoint_dict())
    assert checkpoint["trainer_state"]["global_step"] == 8 and checkpoint["trainer_state"]["epoch"] == 1
    assert checkpoint["trainer_state"]["data_seed"] == 3
    assert {"state_dict", "optimizer_states", "lr_schedulers", "rng", "train_results", "callbacks"} <= set(checkpoint)
    assert [name for name in os.listdir(tmp_path) if name.endswith(".ckpt")] == ["a.ckpt"]


def test_a_checkpoint_of_an_unknown_format_is_refused_naming_the_formats(tmp_path):
    path = str(tmp_path / "future.ckpt")
    save_checkpoint_file({"qtrainer_checkpoint": 99}, path)
    with pytest.raises(CheckpointError, match=r"format 99; this qtrainer reads formats \[1, 2\]"):
        load_checkpoint(path)


def test_bad_checkpoints_are_named_and_never_overwrite_the_last_good_one(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(CheckpointError, match="missing.ckpt.*does not exist"):
        trainer.fit(tiny_module, make_loader(), ckpt_path=str(tmp_path / "missing.ckpt"))
    good = tmp_path / "good.ckpt"
    trainer.fit(tiny_module, make_loader())
    trainer.save_checkpoint(str(good))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.ckpt.*truncated"):
        trainer.fit(tiny_module, make_loader(), ckpt_path=str(truncated))
    foreign = tmp_path / "foreign.ckpt"
    paddle.save(tiny_module.state_dict(), str(foreign))
    with pytest.raises(CheckpointError, match="not a qtrainer checkpoint"):
        trainer.fit(tiny_module, make_loader(), ckpt_path=str(foreign))


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(tiny_module, make_loader())
    tiny_module.net[0].weight.set_value(np.full(tiny_module.net[0].weight.shape, np.inf, dtype="float32"))
    with pytest.raises(FloatingPointError, match="non-finite values in .*net.0.weight"):
        trainer.save_checkpoint(str(tmp_path / "bad.ckpt"))
    assert not (tmp_path / "bad.ckpt").exists()


def test_an_old_qat_pact_checkpoint_resumes_where_the_old_code_ended(tmp_path):
    """Written before the redesign (PACT during its warm-up, channel-wise weights): resumed mid-run,
    it ends with the old code's weights, quantization buffers and logged history."""
    from fixtures import make_old_quant_checkpoints as old_quant

    with open(old_quant.qat_expected_path()) as handle:  # per CPU kind: see the fixture's docstring
        expected = json.load(handle)
    module, trainer = old_quant.fit_qat(str(tmp_path), ckpt_path=old_quant.QAT_CHECKPOINT)
    assert trainer.global_step == expected["global_step"]
    weights = {k: v.numpy() for k, v in module.state_dict().items()}
    assert set(weights) == set(expected["weights"])
    for name, value in weights.items():
        np.testing.assert_allclose(value, np.array(expected["weights"][name]), atol=1e-6, err_msg=name)
    for row, old_row in zip(trainer.log_history, expected["log_history"], strict=True):
        assert row == pytest.approx(old_row, abs=1e-6)


def test_an_old_ptq_absmax_checkpoint_loads_its_thresholds(tmp_path):
    """The old AbsmaxCalibrator kept ``abs_max`` + ``seen``; today's keeps one ``absmax``: the layer
    upgrades the old keys, so the calibrated thresholds and the validation metrics come back."""
    from fixtures import make_old_quant_checkpoints as old_quant

    with open(old_quant.PTQ_EXPECTED) as handle:
        expected = json.load(handle)
    module, _, metrics = old_quant.validate_ptq(str(tmp_path), ckpt_path=old_quant.PTQ_CHECKPOINT)
    for row, old_row in zip(metrics, expected["metrics"], strict=True):  # approx does not reach into a list of dicts
        assert row == pytest.approx(old_row, abs=1e-6)
    weights = {k: v.numpy() for k, v in module.state_dict().items()}
    for old_name, value in expected["weights"].items():
        name = old_name.replace(".abs_max", ".absmax")
        if old_name.endswith(".seen"):
            continue
        np.testing.assert_allclose(weights[name], np.array(value), atol=1e-7, err_msg=name)

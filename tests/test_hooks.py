"""Record every hook call of a callback and a module and compare the whole list (Lightning style)."""
from __future__ import annotations

import pytest

from qtrainer import Callback, Trainer
from qtrainer.callbacks import ModelCheckpoint
from qtrainer.hooks import MODULE_HOOKS

from helpers import TinyModule, make_loader, quiet_trainer_kwargs

CALLBACK_HOOKS = sorted(
    name for name in vars(Callback)
    if name.startswith("on_") or name in ("setup", "configure_model", "teardown", "state_dict", "load_state_dict")
)


class RecordingCallback(Callback):
    def __init__(self, calls):
        self.calls = calls

    def state_dict(self):
        self.calls.append(("cb", "state_dict"))
        return {"recorded": True}

    def load_state_dict(self, state):
        self.calls.append(("cb", "load_state_dict"))


def _recorder(name):
    def hook(self, trainer, module, *args):
        self.calls.append(("cb", name))
    return hook


for _name in CALLBACK_HOOKS:
    if _name not in ("state_dict", "load_state_dict"):
        setattr(RecordingCallback, _name, _recorder(_name))


class RecordingModule(TinyModule):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def training_step(self, batch, batch_idx):
        self.calls.append(("module", "training_step"))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.calls.append(("module", "validation_step"))
        return super().validation_step(batch, batch_idx)

    def configure_optimizers(self):
        self.calls.append(("module", "configure_optimizers"))
        return super().configure_optimizers()


def _module_recorder(name):
    def hook(self, *args):
        self.calls.append(("module", name))
    return hook


for _name in MODULE_HOOKS:
    setattr(RecordingModule, _name, _module_recorder(_name))


def both(name):
    return [("cb", name), ("module", name)]


def block(stage, batches, step_name):
    calls = both(f"on_{stage}_start") + both(f"on_{stage}_epoch_start")
    for _ in range(batches):
        calls += both(f"on_{stage}_batch_start") + [("module", step_name)] + both(f"on_{stage}_batch_end")
    return calls + both(f"on_{stage}_epoch_end") + both(f"on_{stage}_end")


def train_batch(step=True, validation=()):
    """One batch; ``validation``: the validation block that val_check_interval runs after it."""
    calls = both("on_train_batch_start") + [("module", "training_step")] + both("on_before_backward") + both("on_after_backward")
    if step:
        calls += both("on_before_optimizer_step") + both("on_before_zero_grad")
    calls += both("on_train_batch_end") + list(validation)
    return calls + ([("cb", "on_step_checkpoint")] if step else [])  # the step checkpoint point (callbacks only)


def checkpoint_save():
    return [("cb", "state_dict")] + both("on_save_checkpoint")


def epoch_end():
    """on_train_epoch_end, then the epoch checkpoint point where ModelCheckpoint saves (epoch file, last.ckpt)."""
    return both("on_train_epoch_end") + [("cb", "on_epoch_checkpoint")] + checkpoint_save() + checkpoint_save()


def fit_prefix():
    return both("setup") + both("configure_model")


def run(tmp_path, calls, epochs=1, batches=2, val=True, accumulate=1, ckpt_path=None, sanity=1):
    module = RecordingModule(calls)
    trainer = Trainer(**quiet_trainer_kwargs(
        tmp_path, max_epochs=epochs, limit_train_batches=batches, limit_val_batches=2,
        num_sanity_val_steps=sanity, accumulate_grad_batches=accumulate, enable_checkpointing=True,
        callbacks=[RecordingCallback(calls), ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)],
    ))
    trainer.fit(module, make_loader(), make_loader(shuffle=False) if val else None, ckpt_path=ckpt_path)
    return trainer


def test_fit_with_validation(tmp_path):
    calls = []
    run(tmp_path, calls, epochs=1, batches=2)
    expected = (
        fit_prefix() + [("module", "configure_optimizers")] + both("on_fit_start")
        + [("cb", "on_sanity_check_start")] + block("validation", 1, "validation_step") + [("cb", "on_sanity_check_end")]
        + both("on_train_start") + both("on_train_epoch_start") + train_batch()
        + train_batch(validation=block("validation", 2, "validation_step")) + epoch_end()
        + both("on_train_end") + both("on_fit_end") + both("teardown")
    )
    assert calls == expected


def test_fit_without_validation(tmp_path):
    calls = []
    run(tmp_path, calls, epochs=2, batches=1, val=False)
    epoch = both("on_train_epoch_start") + train_batch() + epoch_end()
    expected = (
        fit_prefix() + [("module", "configure_optimizers")] + both("on_fit_start") + both("on_train_start")
        + epoch + epoch + both("on_train_end") + both("on_fit_end") + both("teardown")
    )
    assert calls == expected


def test_fit_resumed_from_checkpoint(tmp_path):
    run(tmp_path, [], epochs=1, batches=1, val=False)
    calls = []
    run(tmp_path, calls, epochs=2, batches=1, val=False, ckpt_path="last")
    expected = (
        fit_prefix() + both("on_load_checkpoint") + [("cb", "load_state_dict"), ("module", "configure_optimizers")]
        + both("on_fit_start") + both("on_train_start")
        + both("on_train_epoch_start") + train_batch() + epoch_end()
        + both("on_train_end") + both("on_fit_end") + both("teardown")
    )
    assert calls == expected


def test_validate(tmp_path):
    calls = []
    module = RecordingModule(calls)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, limit_val_batches=2, callbacks=[RecordingCallback(calls)]))
    trainer.validate(module, make_loader(shuffle=False))
    expected = both("setup") + both("configure_model") + block("validation", 2, "validation_step") + both("teardown")
    assert calls == expected


def test_gradient_accumulation(tmp_path):
    calls = []
    run(tmp_path, calls, epochs=1, batches=3, val=False, accumulate=2)
    # steps after batch 2 and after the last batch of the epoch (3)
    batches = train_batch(step=False) + train_batch(step=True) + train_batch(step=True)
    expected = (
        fit_prefix() + [("module", "configure_optimizers")] + both("on_fit_start") + both("on_train_start")
        + both("on_train_epoch_start") + batches + epoch_end()
        + both("on_train_end") + both("on_fit_end") + both("teardown")
    )
    assert calls == expected


def test_exception_runs_on_exception_then_end_hooks_then_teardown(tmp_path):
    calls = []

    class Exploding(RecordingModule):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    module = Exploding(calls)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, callbacks=[RecordingCallback(calls)]))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, make_loader())
    tail = calls[calls.index(("cb", "on_train_batch_start")):]
    assert tail == both("on_train_batch_start") + [("cb", "on_exception")] + both("on_train_end") + both("on_fit_end") + both("teardown")
    assert trainer.failed


def test_overrides_hook_tells_own_hooks_from_inherited_no_ops():
    from qtrainer.hooks import overrides_hook

    class OneHook(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            pass

    callback = OneHook()
    assert overrides_hook(callback, Callback, "on_train_batch_end")
    assert not overrides_hook(callback, Callback, "on_train_batch_start")
    callback.on_train_batch_start = lambda *args: None  # set on the instance
    assert overrides_hook(callback, Callback, "on_train_batch_start")
    assert not overrides_hook(callback, Callback, "on_step_checkpoint")
    assert overrides_hook(callback, Callback, "on_custom_hook")  # unknown to the base: called as before


def test_hooks_set_on_instances_before_they_fire_are_called(tmp_path):
    calls = []

    class LateHooks(Callback):
        def setup(self, trainer, module, stage):
            self.on_train_batch_end = lambda trainer, module, outputs, batch, batch_idx: calls.append(("cb", batch_idx))
            module.on_after_backward = lambda: calls.append(("module", "on_after_backward"))

    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=2, callbacks=[LateHooks()]))
    trainer.fit(TinyModule(), make_loader())
    assert calls == [("module", "on_after_backward"), ("cb", 0), ("module", "on_after_backward"), ("cb", 1)]

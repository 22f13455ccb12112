"""qtrainer/module.py: the Module base: its trainer link, copies, required methods and self.log."""
from __future__ import annotations

import copy
import logging

import pytest

from qtrainer import Module, Trainer

from helpers import TinyModule, make_loader, quiet_trainer_kwargs


def test_a_module_outside_a_run_has_no_trainer_and_ignores_log(caplog):
    module = TinyModule()
    assert module.trainer is None
    with caplog.at_level(logging.WARNING, logger="qtrainer.module"):
        module.log("x", 1.0)
    assert "self.log('x') called outside a Trainer run; ignored" in caplog.text


def test_a_deep_copy_is_not_attached_to_the_run(tmp_path):
    module = TinyModule()
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(module, make_loader())
    assert module.trainer is trainer
    clone = copy.deepcopy(module)
    assert clone.trainer is None and module.trainer is trainer
    assert all((a.numpy() == b.numpy()).all() for a, b in zip(clone.parameters(), module.parameters()))


def test_the_methods_a_subclass_must_implement_say_so():
    module = Module()
    with pytest.raises(NotImplementedError, match=r"Module must implement training_step\(batch, batch_idx\)"):
        module.training_step(None, 0)
    with pytest.raises(NotImplementedError, match=r"configure_optimizers"):
        module.configure_optimizers()
    assert module.train_dataloader() is None and module.val_dataloader() is None


def test_log_dict_logs_every_item(tmp_path):
    seen = {}

    class Logs(TinyModule):
        def validation_step(self, batch, batch_idx):
            self.log_dict({"a": 1.0, "b": 2.0})

    trainer = Trainer(**quiet_trainer_kwargs(tmp_path))
    seen.update(trainer.validate(Logs(), make_loader(shuffle=False))[0])
    assert seen == {"a": 1.0, "b": 2.0}

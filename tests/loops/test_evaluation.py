"""qtrainer/loops/evaluation.py: validation/test passes give exact epoch means; predict returns every output."""
from __future__ import annotations

import paddle

from qtrainer import Trainer

from helpers import TinyModule, make_loader, quiet_trainer_kwargs


class Counting(TinyModule):
    """Logs the batch's mean of feature 0; predict returns the batch size."""

    def validation_step(self, batch, batch_idx):
        self.log("mean_x0", batch[0][:, 0].mean())

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return int(batch[0].shape[0])


def loader_of(values, batch_size):
    """A list of (x, y) batches whose feature 0 holds ``values``."""
    return [(paddle.to_tensor([[v] + [0.0] * 7 for v in values[i:i + batch_size]], dtype="float32"),
             paddle.zeros([len(values[i:i + batch_size]), 1], dtype="int64"))
            for i in range(0, len(values), batch_size)]


def test_an_epoch_mean_weights_each_batch_by_its_size(tmp_path):
    values = [1.0, 2.0, 3.0, 4.0, 5.0]  # batches [1, 2], [3, 4], [5]: the mean of all is 3.0, of batch means 2.83
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path))
    assert trainer.validate(Counting(), loader_of(values, 2)) == [{"mean_x0": 3.0}]
    assert trainer.test(Counting(), loader_of(values, 2)) == [{"mean_x0": 3.0}]


def test_limits_cut_the_pass_and_the_module_is_left_in_its_mode(tmp_path):
    module = Counting()
    module.train()
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, limit_val_batches=1))
    assert trainer.validate(module, loader_of([1.0, 2.0, 3.0, 4.0], 2)) == [{"mean_x0": 1.5}]
    assert module.training and trainer.num_val_batches == 1


def test_predict_returns_one_output_per_batch(tmp_path):
    assert Trainer(**quiet_trainer_kwargs(tmp_path)).predict(Counting(), make_loader(n=20, batch_size=8)) == [8, 8, 4]
    limited = Trainer(**quiet_trainer_kwargs(tmp_path, limit_predict_batches=2))
    assert limited.predict(Counting(), loader_of([1.0] * 5, 2)) == [2, 2]

"""qtrainer/loops/batch.py: a batch that does not fit the model names the layer and the shape it expects."""
from __future__ import annotations


import paddle
import pytest
from paddle import nn

from qtrainer import Module, Trainer

from helpers import quiet_trainer_kwargs


class _Conv(Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2D(3, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(axis=[2, 3]))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return paddle.optimizer.SGD(0.1, parameters=self.parameters())


def _images(channels):
    return [(paddle.rand([2, channels, 8, 8]), paddle.to_tensor([[0], [1]]))]


def test_a_batch_with_the_wrong_channel_count_names_the_layer_and_expected_shape(tmp_path):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"_Conv.training_step: layer 'features.0' \(Conv2D\) got an input of shape "
                                         r"\[2, 1, 8, 8\]; it expects \[N, 3, H, W\] \(in_channels=3"):
        trainer.fit(_Conv(), _images(1))


def test_a_validation_batch_with_the_wrong_channel_count_names_the_layer(tmp_path):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"_Conv.validation_step: layer 'features.0' \(Conv2D\) "
                                         r"got an input of shape \[2, 4, 8, 8\]"):
        trainer.fit(_Conv(), _images(3), _images(4))

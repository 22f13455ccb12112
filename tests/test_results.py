"""What ``self.log`` accepts as a value: scalars of any dtype, converted exactly."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from qtrainer.results import to_float


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64"])
def test_scalar_tensors_of_every_dtype_convert_to_their_value(dtype):
    assert to_float(paddle.to_tensor(3.0).astype(dtype), "x") == 3.0


def test_one_element_tensors_arrays_and_numbers_convert():
    assert to_float(paddle.to_tensor([1.25]), "x") == 1.25
    assert to_float(np.array([[2.5]], dtype="float32"), "x") == 2.5
    assert to_float(7, "x") == 7.0


@pytest.mark.parametrize("value", [paddle.ones([2]), np.zeros(3)])
def test_non_scalars_are_refused_with_their_shape(value):
    with pytest.raises(ValueError, match=r"self.log\('acc', ...\) needs a scalar, got a value of shape \[\d\]"):
        to_float(value, "acc")


@pytest.mark.parametrize("value", ["hello", b"x", None, {"a": 1}])
def test_non_numbers_are_refused_naming_the_metric_and_what_is_accepted(value):
    with pytest.raises(TypeError, match=r"self.log\('note', .*\): a metric must be a number: an int, a float, a bool, "
                                        r"a numpy scalar or a one-element paddle.Tensor, got " + type(value).__name__):
        to_float(value, "note")


def test_logging_a_string_in_a_step_names_the_metric(tmp_path):
    from qtrainer import Trainer

    from helpers import TinyModule, make_loader, quiet_trainer_kwargs

    class Chatty(TinyModule):
        def training_step(self, batch, batch_idx):
            self.log("note", "hello")
            return super().training_step(batch, batch_idx)

    with pytest.raises(TypeError, match=r"self.log\('note', 'hello'\).*got str \(log text with a logger's own API"):
        Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1)).fit(Chatty(), make_loader())

"""Tests of qtrainer/quant/fuse.py: Conv2D + BatchNorm folding, discovery and fuse_list checks."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddle import nn
from paddle.vision.models import mobilenet_v1, mobilenet_v2, resnet18

from qtrainer.quant.transforms.fuse import find_conv_bn_pairs, fuse_conv_bn

NORMS = (nn.BatchNorm2D, nn.BatchNorm)


def _randomize_norms(model: nn.Layer, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so folding really changes weights."""
    rng = np.random.default_rng(seed)
    for layer in model.sublayers():
        if isinstance(layer, NORMS):
            n = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.5, n).astype("float32"))
            layer._variance.set_value(rng.uniform(0.1, 2.0, n).astype("float32"))
            if layer.weight is not None:
                layer.weight.set_value(rng.uniform(0.5, 1.5, n).astype("float32"))
            if layer.bias is not None:
                layer.bias.set_value(rng.normal(0, 0.2, n).astype("float32"))


def _count_norms(model: nn.Layer) -> int:
    return sum(isinstance(layer, NORMS) for layer in model.sublayers())


def _rel_max_err(ref: np.ndarray, out: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _eval_out(model: nn.Layer, x: paddle.Tensor) -> np.ndarray:
    model.eval()
    with paddle.no_grad():
        return model(x).numpy()


class ConvBNLayer(nn.Layer):
    """The older paddle.vision MobileNetV1 block: forward calls ``_conv`` then ``_norm_layer``."""

    def __init__(self, cin: int, cout: int, bias: bool = False) -> None:
        super().__init__()
        self._conv = nn.Conv2D(cin, cout, 3, padding=1, bias_attr=None if bias else False)
        self._norm_layer = nn.BatchNorm2D(cout)

    def forward(self, x):
        x = self._conv(x)
        x = self._norm_layer(x)
        return nn.functional.relu(x)


class Nested(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 4, 1)
        self.norm = nn.BatchNorm(4)  # the legacy class

    def forward(self, x):
        return self.norm(self.conv(x))


class Residual(nn.Layer):
    """The conv output feeds the batch norm *and* a residual add: it must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2D(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        return z + y


class UsesWeight(nn.Layer):
    """Reads the conv weight outside the conv: folding changes the output, so it must be undone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(4, 4, 1)
        self.bn = nn.BatchNorm2D(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


# ------------------------------------------------------------------------------------------
# paddle.vision models
# ------------------------------------------------------------------------------------------
MODELS = {
    "mobilenet_v1": lambda: mobilenet_v1(scale=0.25, num_classes=10),
    "mobilenet_v2": lambda: mobilenet_v2(scale=0.25, num_classes=10),
    "resnet18": lambda: resnet18(num_classes=10),
}


@pytest.mark.parametrize("traced", [False, True], ids=["structural", "traced"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_vision_model_equals_unfused(name, traced):
    paddle.seed(0)
    model = MODELS[name]()
    _randomize_norms(model)
    x = paddle.randn([2, 3, 32, 32])
    ref = _eval_out(model, x)
    norms = _count_norms(model)
    pairs = fuse_conv_bn(model, example_input=x if traced else None)
    assert len(pairs) == norms > 0
    assert _count_norms(model) == 0
    out = _eval_out(model, x)
    assert _rel_max_err(ref, out) <= 1e-5
    assert _rel_max_err(ref, np.zeros_like(ref)) == 1.0  # the comparison itself is meaningful


def test_structural_discovery_names_the_expected_resnet_pairs():
    pairs = find_conv_bn_pairs(resnet18(num_classes=10))
    assert ("conv1", "bn1") in pairs
    assert ("layer1.0.conv2", "layer1.0.bn2") in pairs
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    assert len(pairs) == 20


# ------------------------------------------------------------------------------------------
# folding arithmetic
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_conv_with_and_without_bias(bias):
    paddle.seed(1)
    model = nn.Sequential(ConvBNLayer(3, 6, bias=bias), nn.Conv2D(6, 5, 1), nn.BatchNorm2D(5))
    _randomize_norms(model)
    x = paddle.randn([2, 3, 8, 8])
    ref = _eval_out(model, x)
    conv = model[0]._conv
    assert (conv.bias is None) != bias
    pairs = fuse_conv_bn(model)
    assert pairs == [("0._conv", "0._norm_layer"), ("1", "2")]
    assert conv.bias is not None and "bias" in dict(conv.named_parameters())
    assert isinstance(model[0]._norm_layer, nn.Identity) and isinstance(model[2], nn.Identity)
    assert _rel_max_err(ref, _eval_out(model, x)) <= 1e-5


def test_folded_weights_follow_the_formula():
    conv, bn = nn.Conv2D(2, 3, 1), nn.BatchNorm2D(3, epsilon=1e-3)
    model = nn.Sequential(conv, bn)
    _randomize_norms(model, seed=3)
    w, b = conv.weight.numpy().astype(np.float64), conv.bias.numpy().astype(np.float64)
    g, beta = bn.weight.numpy(), bn.bias.numpy()
    mean, var = bn._mean.numpy(), bn._variance.numpy()
    fuse_conv_bn(model)
    f = g / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(conv.weight.numpy(), w * f[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(conv.bias.numpy(), (b - mean) * f + beta, rtol=1e-5, atol=1e-7)


def test_legacy_batchnorm_and_nested_call_are_fused():
    paddle.seed(2)
    model = Nested()
    _randomize_norms(model)
    x = paddle.randn([2, 3, 4, 4])
    ref = _eval_out(model, x)
    assert fuse_conv_bn(model) == [("conv", "norm")]
    assert _rel_max_err(ref, _eval_out(model, x)) <= 1e-5


# ------------------------------------------------------------------------------------------
# what must not be fused
# ------------------------------------------------------------------------------------------
def test_conv_output_used_elsewhere_is_not_fused():
    model = Residual()
    _randomize_norms(model)
    x = paddle.randn([1, 4, 5, 5])
    assert find_conv_bn_pairs(model) == []  # structural: `y` is read twice
    assert find_conv_bn_pairs(model, example_input=x) == []  # traced: the add sees the conv output
    with pytest.raises(ValueError, match=r"\['conv', 'bn'\].*also used"):
        fuse_conv_bn(model, fuse_list=[["conv", "bn"]], example_input=x)
    assert isinstance(model.bn, nn.BatchNorm2D)


def test_fold_that_changes_the_output_is_undone():
    paddle.seed(4)
    model = UsesWeight()
    _randomize_norms(model)
    x = paddle.randn([1, 4, 3, 3])
    ref = _eval_out(model, x)
    w = model.conv.weight.numpy().copy()
    with pytest.raises(RuntimeError, match="undone"):
        fuse_conv_bn(model, example_input=x)
    assert isinstance(model.bn, nn.BatchNorm2D)
    np.testing.assert_array_equal(model.conv.weight.numpy(), w)
    np.testing.assert_array_equal(_eval_out(model, x), ref)


def test_nhwc_layers_are_not_discovered_and_rejected_in_fuse_list():
    model = nn.Sequential(nn.Conv2D(3, 4, 1, data_format="NHWC"), nn.BatchNorm2D(4, data_format="NHWC"))
    assert find_conv_bn_pairs(model) == []
    with pytest.raises(ValueError, match="data_format='NHWC'.*only 'NCHW'"):
        fuse_conv_bn(model, fuse_list=[["0", "1"]])


def test_traced_discovery_restores_training_flags():
    model = nn.Sequential(nn.Conv2D(3, 4, 1), nn.BatchNorm2D(4), nn.Dropout(0.5))
    model.train()
    model[2].eval()
    fuse_conv_bn(model, example_input=paddle.randn([1, 3, 4, 4]))
    assert model.training and model[0].training and not model[2].training


# ------------------------------------------------------------------------------------------
# fuse_list errors: clear, and nothing changed
# ------------------------------------------------------------------------------------------
def _small_model() -> nn.Layer:
    model = nn.Sequential(
        nn.Conv2D(3, 4, 3), nn.BatchNorm2D(4), nn.ReLU(), nn.Conv2D(4, 6, 1), nn.BatchNorm2D(6),
        nn.Flatten(), nn.Linear(6, 2), nn.BatchNorm1D(2),
    )
    model.add_sublayer("conv_block", ConvBNLayer(3, 8))
    return model


@pytest.mark.parametrize("fuse_list, error, match", [
    ([["conv_block._conv", "conv_block._norm"]], ValueError,
     r"'conv_block._norm'.*close names.*conv_block._norm_layer"),
    ([["9", "1"]], ValueError, r"'9', which is not a sublayer"),
    ([["1", "0"]], ValueError, r"'1' is a BatchNorm2D, not a Conv2D"),
    ([["0", "2"]], ValueError, r"'2' is a ReLU, not one of"),
    ([["6", "7"]], ValueError, r"'6' is a Linear, not a Conv2D"),
    ([["0", "4"]], ValueError, r"channel mismatch: '0' has 4 output channels but '4' normalises 6"),
    ([["0", "1"], ["3", "1"]], ValueError, r"uses '1' again"),
    ([["0", "1", "2"]], ValueError, r"must be a pair"),
    ("0,1", TypeError, r"fuse_list must be a list"),
    ([("0", 1)], ValueError, r"must be a pair of layer names"),
    (["0"], TypeError, r"fuse_list\[0\]='0' must be a \[conv_name, bn_name\] pair"),
])
def test_bad_fuse_list(fuse_list, error, match):
    model = _small_model()
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        fuse_conv_bn(model, fuse_list=fuse_list)
    assert _count_norms(model) == 3 and isinstance(model[7], nn.BatchNorm1D)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k].numpy(), v)


def test_fuse_list_of_pairs_that_are_not_connected_is_rejected_with_example_input():
    model = nn.Sequential(nn.Conv2D(3, 4, 1), nn.ReLU(), nn.BatchNorm2D(4))
    with pytest.raises(ValueError, match=r"\[\['0', '2'\]\] are not connected"):
        fuse_conv_bn(model, fuse_list=[["0", "2"]], example_input=paddle.randn([1, 3, 2, 2]))
    assert isinstance(model[2], nn.BatchNorm2D)


def test_valid_fuse_list_fuses_exactly_those_pairs():
    paddle.seed(5)
    model = _small_model()
    _randomize_norms(model)
    pairs = fuse_conv_bn(model, fuse_list=[["conv_block._conv", "conv_block._norm_layer"], ["3", "4"]])
    assert pairs == [("conv_block._conv", "conv_block._norm_layer"), ("3", "4")]
    assert isinstance(model[1], nn.BatchNorm2D)  # not listed: kept
    assert isinstance(model[4], nn.Identity) and isinstance(model.conv_block._norm_layer, nn.Identity)


def test_model_must_be_a_layer():
    with pytest.raises(TypeError, match="paddle.nn.Layer"):
        fuse_conv_bn(object())

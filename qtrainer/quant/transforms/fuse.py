"""Fold ``Conv2D`` + ``BatchNorm2D`` pairs into the convolution (for inference and PTQ).

With the batch norm in eval mode, ``bn(conv(x))`` is an affine map of each output channel of the
convolution, so it can live in the convolution's weight and bias::

    f = gamma / sqrt(running_var + eps)
    weight' = weight * f   (per output channel)      bias' = (bias - running_mean) * f + beta

and the batch norm is replaced by an ``nn.Identity``. :func:`fuse_conv_bn` folds the pairs it is
given (``fuse_list``, PaddleSlim's format: ``[[conv_name, bn_name], ...]`` with names from
``named_sublayers()``) or finds them itself:

* with ``example_input``, by tracing one forward pass with hooks: a pair is a batch norm whose
  input is exactly the tensor a convolution returned, at every call of both layers. Then the
  convolution's output must reach nothing but the batch norm: a second pass perturbs the
  convolution outputs while handing the batch norms the original tensors, and the model output
  must not change (a residual add, a concat or an in-place op on the conv output would change it).
* without it, from the structure of the code: consecutive children of an ``nn.Sequential`` (whose
  ``forward`` is not overridden), and, in a layer's ``forward`` source, ``y = self.conv(x)``
  directly followed by ``y = self.bn(y)`` (or ``self.bn(self.conv(x))``), each layer called once.
  This trusts that nothing else touches the convolution's output; pass ``example_input`` to check.

Folding uses the running statistics, so it matches the model in eval mode. It works on NCHW
layers only. Everything is validated before the first change; with ``example_input`` the fused
model's output is compared with the original one and the folding is undone if they disagree.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import logging
import textwrap
from typing import Any, Iterable, Sequence

import numpy as np
import paddle
from paddle import nn

__all__ = ["fuse_conv_bn", "find_conv_bn_pairs", "fold_conv_bn", "EvalMode"]

logger = logging.getLogger(__name__)

#: Batch-norm classes that can be folded into a preceding Conv2D.
FOLDABLE_NORMS: tuple[type, ...] = (nn.BatchNorm2D, nn.BatchNorm, nn.SyncBatchNorm)
#: Largest relative output change accepted when checking the fused model on ``example_input``.
CHECK_RTOL = 1e-3


# --------------------------------------------------------------------------------------------
# layer checks
# --------------------------------------------------------------------------------------------
def _norm_format(bn: nn.Layer) -> str:
    return getattr(bn, "_data_format", None) or getattr(bn, "_data_layout", "NCHW")


def _norm_channels(bn: nn.Layer) -> int:
    return int(bn._mean.shape[0])


def _pair_problem(conv: nn.Layer, bn: nn.Layer, conv_name: str, bn_name: str) -> str | None:
    """Why ``conv`` -> ``bn`` cannot be folded, or None when it can."""
    if not isinstance(conv, nn.Conv2D):
        return f"{conv_name!r} is a {type(conv).__name__}, not a Conv2D"
    if not isinstance(bn, FOLDABLE_NORMS):
        return (
            f"{bn_name!r} is a {type(bn).__name__}, not one of "
            f"{[c.__name__ for c in FOLDABLE_NORMS]}"
        )
    if conv._data_format != "NCHW":
        return f"{conv_name!r} has data_format={conv._data_format!r}; only 'NCHW' is supported"
    if _norm_format(bn) != "NCHW":
        return f"{bn_name!r} has data_format={_norm_format(bn)!r}; only 'NCHW' is supported"
    if getattr(bn, "_act", None):
        return f"{bn_name!r} has a fused activation act={bn._act!r}; only act=None can be folded"
    # BatchNorm2D(use_global_stats=False) and BatchNorm(trainable_statistics=True) use batch stats
    batch_stats = (
        getattr(bn, "_trainable_statistics", False)
        if isinstance(bn, nn.BatchNorm)
        else getattr(bn, "_use_global_stats", None) is False
    )
    if batch_stats:
        return f"{bn_name!r} normalises with batch statistics even in eval mode; it cannot be folded"
    if conv._out_channels != _norm_channels(bn):
        return (
            f"channel mismatch: {conv_name!r} has {conv._out_channels} output channels but "
            f"{bn_name!r} normalises {_norm_channels(bn)}"
        )
    return None


def _parents(model: nn.Layer) -> dict[int, list[tuple[nn.Layer, str]]]:
    """For each layer (by id), every (parent, attribute name) that registers it."""
    out: dict[int, list[tuple[nn.Layer, str]]] = {}
    for _, layer in [("", model), *model.named_sublayers()]:
        for child_name, child in layer._sub_layers.items():
            if child is not None:
                out.setdefault(id(child), []).append((layer, child_name))
    return out


# --------------------------------------------------------------------------------------------
# fuse_list validation
# --------------------------------------------------------------------------------------------
def _validate_fuse_list(model: nn.Layer, fuse_list: Any) -> list[tuple[str, str]]:
    if isinstance(fuse_list, (str, bytes)) or not isinstance(fuse_list, (list, tuple)):
        raise TypeError(
            f"fuse_list must be a list of [conv_name, bn_name] pairs, got {type(fuse_list).__name__}"
        )
    layers = dict(model.named_sublayers())
    parents = _parents(model)
    pairs: list[tuple[str, str]] = []
    used: dict[str, int] = {}
    for i, group in enumerate(fuse_list):
        if isinstance(group, (str, bytes)) or not isinstance(group, (list, tuple)):
            raise TypeError(f"fuse_list[{i}]={group!r} must be a [conv_name, bn_name] pair")
        if len(group) != 2 or not all(isinstance(n, str) for n in group):
            raise ValueError(
                f"fuse_list[{i}]={list(group)!r} must be a pair of layer names "
                f"[conv_name, bn_name]: only Conv2D -> BatchNorm2D fusion is supported"
            )
        for name in group:
            if name not in layers:
                close = difflib.get_close_matches(name, list(layers), n=5, cutoff=0.5)
                hint = f"; close names: {close}" if close else ""
                raise ValueError(
                    f"fuse_list[{i}] names {name!r}, which is not a sublayer of the model "
                    f"(names as in model.named_sublayers()){hint}"
                )
            if name in used:
                raise ValueError(
                    f"fuse_list[{i}] uses {name!r} again (already in fuse_list[{used[name]}]): "
                    f"each layer can be fused once"
                )
            used[name] = i
        conv_name, bn_name = group
        problem = _pair_problem(layers[conv_name], layers[bn_name], conv_name, bn_name)
        if problem:
            raise ValueError(f"fuse_list[{i}]={list(group)!r} cannot be fused: {problem}")
        if len(parents.get(id(layers[bn_name]), [])) != 1:
            raise ValueError(
                f"fuse_list[{i}]: {bn_name!r} is registered in several places of the model; "
                f"a shared batch norm cannot be replaced"
            )
        pairs.append((conv_name, bn_name))
    return pairs


# --------------------------------------------------------------------------------------------
# discovery from the code structure
# --------------------------------------------------------------------------------------------
def _self_call(node: ast.AST) -> str | None:
    """``attr`` when ``node`` is the call ``self.attr(<one positional argument>)``."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
        and len(node.args) == 1
        and not node.keywords
        and not isinstance(node.args[0], ast.Starred)
    ):
        return node.func.attr
    return None


def _assigned_call(stmt: ast.stmt) -> tuple[str | None, ast.AST | None]:
    """(target name, value) of ``name = value``, or (None, value) of ``return value``."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id, stmt.value
    if isinstance(stmt, ast.Return) and stmt.value is not None:
        return None, stmt.value
    return None, None


def _forward_pairs(layer: nn.Layer) -> list[tuple[str, str]]:
    """(conv_attr, bn_attr) pairs read from ``type(layer).forward``'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(type(layer).forward))
        func = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        logger.debug("no source for %s.forward; skipped", type(layer).__name__)
        return []
    children = layer._sub_layers
    self_refs: dict[str, int] = {}
    loads: dict[str, int] = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            self_refs[node.attr] = self_refs.get(node.attr, 0) + 1
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            loads[node.id] = loads.get(node.id, 0) + 1

    def once(attr: str | None, kind: type | tuple[type, ...]) -> bool:  # a child used once
        return attr is not None and isinstance(children.get(attr), kind) and self_refs.get(attr) == 1

    def is_conv(attr: str | None) -> bool:
        return once(attr, nn.Conv2D)

    def is_bn(attr: str | None) -> bool:
        return once(attr, FOLDABLE_NORMS)

    pairs = []
    for node in ast.walk(func):
        # self.bn(self.conv(x))
        bn_attr = _self_call(node)
        if is_bn(bn_attr) and is_conv(_self_call(node.args[0])):
            pairs.append((_self_call(node.args[0]), bn_attr))
        # y = self.conv(x) ; y = self.bn(y)   (or: return self.bn(y))
        body = getattr(node, "body", None)
        for block in (body, getattr(node, "orelse", None), getattr(node, "finalbody", None)):
            if not isinstance(block, list):
                continue
            for first, second in zip(block, block[1:]):
                var, value = _assigned_call(first)
                conv_attr = _self_call(value) if var is not None else None
                if not is_conv(conv_attr):
                    continue
                target, value2 = _assigned_call(second)
                bn_attr = _self_call(value2) if value2 is not None else None
                arg = value2.args[0] if bn_attr is not None else None
                if not (is_bn(bn_attr) and isinstance(arg, ast.Name) and arg.id == var):
                    continue
                # the conv output must have no other name afterwards
                if isinstance(second, ast.Return) or target == var or loads.get(var, 0) == 1:
                    pairs.append((conv_attr, bn_attr))
    return pairs


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _structural_pairs(model: nn.Layer) -> list[tuple[str, str]]:
    parents = _parents(model)
    found: list[tuple[str, str]] = []
    for prefix, layer in [("", model), *model.named_sublayers()]:
        if isinstance(layer, nn.Sequential) and type(layer).forward is nn.Sequential.forward:
            items = list(layer._sub_layers.items())
            attr_pairs = [
                (a, b) for (a, la), (b, lb) in zip(items, items[1:])
                if isinstance(la, nn.Conv2D) and isinstance(lb, FOLDABLE_NORMS)
            ]
        elif layer._sub_layers:
            attr_pairs = _forward_pairs(layer)
        else:
            attr_pairs = []
        for conv_attr, bn_attr in attr_pairs:
            conv, bn = layer._sub_layers[conv_attr], layer._sub_layers[bn_attr]
            if len(parents[id(conv)]) != 1 or len(parents[id(bn)]) != 1:
                continue  # a layer registered twice may be called from elsewhere
            conv_name, bn_name = _join(prefix, conv_attr), _join(prefix, bn_attr)
            if _pair_problem(conv, bn, conv_name, bn_name) is None:
                found.append((conv_name, bn_name))
    return found


# --------------------------------------------------------------------------------------------
# discovery (and checking) by tracing
# --------------------------------------------------------------------------------------------
def _call(model: nn.Layer, example_input: Any) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (list, tuple)):
        return model(*example_input)
    return model(example_input)


def _flat_outputs(out: Any) -> list[np.ndarray]:
    if isinstance(out, paddle.Tensor):
        return [out.numpy().astype(np.float64)]
    if isinstance(out, dict):
        return [a for k in sorted(out) for a in _flat_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _flat_outputs(o)]
    return []


def _relative_error(ref: list[np.ndarray], new: list[np.ndarray]) -> float:
    if len(ref) != len(new):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, new):
        if a.shape != b.shape:
            return float("inf")
        denom = max(float(np.abs(a).max()) if a.size else 0.0, 1e-12)
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        worst = max(worst, diff / denom if np.isfinite(diff) else float("inf"))
    return worst


class EvalMode:
    """Puts every sublayer in eval mode and restores each one's own flag on exit."""

    def __init__(self, model: nn.Layer) -> None:
        self.layers = [model, *model.sublayers()]
        self.flags = [layer.training for layer in self.layers]

    def __enter__(self) -> None:
        for layer in self.layers:
            layer.training = False

    def __exit__(self, *exc: object) -> None:
        for layer, flag in zip(self.layers, self.flags):
            layer.training = flag


def _trace(model: nn.Layer, example_input: Any, perturb: Sequence[tuple[str, str]] = ()) -> tuple:
    """One forward pass recording conv outputs and batch-norm inputs.

    With ``perturb``, those pairs' conv outputs are changed and their batch norms get the original.
    Returns (model output, {conv: [outputs]}, {bn: [inputs]}).
    """
    layers = dict(model.named_sublayers())
    conv_out: dict[str, list] = {}
    bn_in: dict[str, list] = {}
    perturbed_convs = {c for c, _ in perturb}
    perturbed_bns = {b for _, b in perturb}
    originals: dict[int, tuple[paddle.Tensor, paddle.Tensor]] = {}  # id(changed) -> (changed, original)
    handles = []

    def post_hook(name: str):
        def hook(layer, inputs, output):
            conv_out.setdefault(name, []).append(output)
            if name in perturbed_convs and isinstance(output, paddle.Tensor):
                changed = output * 1.5 + 1.0
                originals[id(changed)] = (changed, output)
                return changed
            return None
        return hook

    def pre_hook(name: str):
        def hook(layer, inputs):
            x = inputs[0] if inputs else None
            bn_in.setdefault(name, []).append(x)
            if name in perturbed_bns and id(x) in originals and originals[id(x)][0] is x:
                return (originals[id(x)][1], *inputs[1:])
            return None
        return hook

    try:
        for name, layer in layers.items():
            if isinstance(layer, nn.Conv2D):
                handles.append(layer.register_forward_post_hook(post_hook(name)))
            elif isinstance(layer, FOLDABLE_NORMS):
                handles.append(layer.register_forward_pre_hook(pre_hook(name)))
        with paddle.no_grad():
            out = _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return _flat_outputs(out), conv_out, bn_in


def _traced_pairs(conv_out: dict, bn_in: dict) -> list[tuple[str, str]]:
    """Pairs where every input of the BN is an output of one conv, and every output of it goes there."""
    owner = {id(t): name for name, outs in conv_out.items() for t in outs}
    pairs = []
    for bn_name, inputs in bn_in.items():
        sources = {owner.get(id(x)) if x is not None else None for x in inputs}
        if len(sources) != 1 or None in sources:
            continue
        conv_name = sources.pop()
        if len(conv_out[conv_name]) == len(inputs) and all(
            any(x is t for t in conv_out[conv_name]) for x in inputs
        ):
            pairs.append((conv_name, bn_name))
    return pairs


def _not_exclusive(
    model: nn.Layer, example_input: Any, baseline: list[np.ndarray], pairs: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The pairs whose conv output also reaches something other than the batch norm."""
    if not pairs:
        return []
    out, _, _ = _trace(model, example_input, perturb=pairs)
    if _relative_error(baseline, out) <= 1e-6:
        return []
    if len(pairs) == 1:
        return list(pairs)
    half = len(pairs) // 2
    return (_not_exclusive(model, example_input, baseline, pairs[:half])
            + _not_exclusive(model, example_input, baseline, pairs[half:]))


# --------------------------------------------------------------------------------------------
# folding
# --------------------------------------------------------------------------------------------
def fold_conv_bn(conv: nn.Conv2D, bn: nn.Layer) -> tuple[np.ndarray, np.ndarray]:
    """The (weight, bias) of ``conv`` with ``bn``'s eval-mode affine map folded in (float64)."""
    w = conv.weight.numpy().astype(np.float64)
    b = conv.bias.numpy().astype(np.float64) if conv.bias is not None else np.zeros(w.shape[0])
    gamma = bn.weight.numpy().astype(np.float64) if bn.weight is not None else np.ones(w.shape[0])
    beta = bn.bias.numpy().astype(np.float64) if bn.bias is not None else np.zeros(w.shape[0])
    mean = bn._mean.numpy().astype(np.float64)
    var = bn._variance.numpy().astype(np.float64)
    factor = gamma / np.sqrt(var + float(bn._epsilon))
    return w * factor[:, None, None, None], (b - mean) * factor + beta


def _apply(model: nn.Layer, pairs: list[tuple[str, str]]) -> list[tuple]:
    """Folds every pair; returns what is needed to undo it."""
    layers = dict(model.named_sublayers())
    parents = _parents(model)
    folded = [fold_conv_bn(layers[c], layers[b]) for c, b in pairs]  # compute everything first
    undo = []
    for (conv_name, bn_name), (w, b) in zip(pairs, folded):
        conv, bn = layers[conv_name], layers[bn_name]
        parent, attr = parents[id(bn)][0]
        old_w = conv.weight.numpy().copy()
        old_bias = conv.bias
        old_b = old_bias.numpy().copy() if old_bias is not None else None
        conv.weight.set_value(w.astype(old_w.dtype))
        if conv.bias is None:
            conv.bias = conv.create_parameter(shape=[w.shape[0]], dtype=conv.weight.dtype, is_bias=True)
        conv.bias.set_value(b.astype(old_w.dtype))
        parent._sub_layers[attr] = nn.Identity()
        undo.append((conv, old_w, old_bias, old_b, parent, attr, bn))
    return undo


def _undo(undo: Iterable[tuple]) -> None:
    for conv, old_w, old_bias, old_b, parent, attr, bn in undo:
        conv.weight.set_value(old_w)
        if old_bias is None:
            conv.bias = None
        else:
            old_bias.set_value(old_b)
            conv.bias = old_bias
        parent._sub_layers[attr] = bn


def find_conv_bn_pairs(model: nn.Layer, example_input: Any = None) -> list[tuple[str, str]]:
    """The foldable (conv_name, bn_name) pairs of ``model`` in ``named_sublayers()`` order (see
    the module docstring for how they are found)."""
    order = {name: i for i, (name, _) in enumerate(model.named_sublayers())}
    return sorted(_find_pairs(model, example_input), key=lambda pair: order[pair[0]])


def _find_pairs(model: nn.Layer, example_input: Any) -> list[tuple[str, str]]:
    if example_input is None:
        return _structural_pairs(model)
    with EvalMode(model):
        baseline, conv_out, bn_in = _trace(model, example_input)
        layers = dict(model.named_sublayers())
        parents = _parents(model)
        pairs = [
            (c, b) for c, b in _traced_pairs(conv_out, bn_in)
            if _pair_problem(layers[c], layers[b], c, b) is None and len(parents[id(layers[b])]) == 1
        ]
        shared = set(_not_exclusive(model, example_input, baseline, pairs))
    for pair in shared:
        logger.info("not fusing %s -> %s: the conv output is also used elsewhere", *pair)
    return [p for p in pairs if p not in shared]


def fuse_conv_bn(
    model: nn.Layer,
    fuse_list: Sequence[Sequence[str]] | None = None,
    example_input: Any = None,
) -> list[tuple[str, str]]:
    """Fold Conv2D + BatchNorm pairs of ``model`` in place; return the fused (conv_name, bn_name).

    Args:
        model: the model; its batch norms' running statistics are folded (eval-mode behaviour).
        fuse_list: ``[[conv_name, bn_name], ...]`` with names from ``model.named_sublayers()``;
            None finds the pairs automatically (see the module docstring).
        example_input: a Tensor (or a list/tuple of positional inputs, or a dict of keyword
            inputs) for one forward pass: it makes discovery exact, checks that each ``fuse_list``
            pair is connected with nothing else reading the conv output, and checks the fused
            model's output against the original (the folding is undone if they differ).

    Raises:
        TypeError / ValueError: a malformed ``fuse_list``, a name that is not a sublayer (close
            names are listed), a pair that is not Conv2D -> BatchNorm2D/BatchNorm, a channel or
            data-format mismatch, or (with ``example_input``) a pair that is not connected.
        RuntimeError: the fused model's output differs from the original on ``example_input``.
    """
    if not isinstance(model, nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if fuse_list is None:
        pairs = find_conv_bn_pairs(model, example_input)
    else:
        pairs = _validate_fuse_list(model, fuse_list)
        if example_input is not None:
            _check_connected(model, example_input, pairs)
    if not pairs:
        logger.info("fuse_conv_bn: no Conv2D -> BatchNorm pair to fuse")
        return []
    baseline = None
    if example_input is not None:
        with EvalMode(model), paddle.no_grad():
            baseline = _flat_outputs(_call(model, example_input))
    undo = _apply(model, pairs)
    if baseline is not None:
        with EvalMode(model), paddle.no_grad():
            err = _relative_error(baseline, _flat_outputs(_call(model, example_input)))
        if err > CHECK_RTOL:
            _undo(undo)
            raise RuntimeError(
                f"fusing {pairs} changed the model output by {err:.3g} (relative max error) on "
                f"example_input, so the folding was undone: a fused conv output is probably used "
                f"elsewhere too"
            )
    logger.info("fused %d Conv2D + BatchNorm pairs", len(pairs))
    return pairs


def _check_connected(model: nn.Layer, example_input: Any, pairs: list[tuple[str, str]]) -> None:
    with EvalMode(model):
        baseline, conv_out, bn_in = _trace(model, example_input)
        connected = set(_traced_pairs(conv_out, bn_in))
        loose = [p for p in pairs if p not in connected]
        if loose:
            raise ValueError(
                f"fuse_list pairs {[list(p) for p in loose]} are not connected on example_input: "
                f"the batch norm's input must be exactly the conv's output at every call"
            )
        shared = _not_exclusive(model, example_input, baseline, pairs)
    if shared:
        raise ValueError(
            f"fuse_list pairs {[list(p) for p in shared]} cannot be fused: the conv output is "
            f"also used by something other than the batch norm"
        )

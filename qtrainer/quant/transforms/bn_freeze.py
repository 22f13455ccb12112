"""Freezing batch-norm statistics during QAT (as torch.ao's ``freeze_bn_stats`` and torchvision's QAT recipe do).

Late in quantization-aware training the batch statistics of small batches keep moving the
activations that the quantizers' scales follow. ``freeze_batch_norm_stats(model)`` puts every
batch norm of ``model`` in eval mode: it normalises with its running mean and variance, which no
longer change, while its scale and shift keep training. A training loop calls ``model.train()``
again at each epoch, so the freeze is re-applied before every training step
(``QATCallback(freeze_bn_after_steps=N)``); it depends only on the step count, so a resumed run
freezes at the same step.
"""
from __future__ import annotations

from paddle import nn

__all__ = ["BATCH_NORM_TYPES", "freeze_batch_norm_stats"]

BATCH_NORM_TYPES = (nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D, nn.BatchNorm, nn.SyncBatchNorm)


def freeze_batch_norm_stats(model: nn.Layer) -> list[str]:
    """Put every batch norm of ``model`` in eval mode (running statistics frozen); return their names."""
    frozen = []
    for name, layer in model.named_sublayers(include_self=True):
        if isinstance(layer, BATCH_NORM_TYPES):
            layer.eval()
            frozen.append(name)
    return frozen

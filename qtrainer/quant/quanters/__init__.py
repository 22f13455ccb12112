"""Quanters: fake quant-dequant in the forward pass with a straight-through gradient.

``fake_quant`` (the op, ``FakeQuanter``: an observer plus the two switches), ``fused`` (the weight
quanters' one-kernel fast path, ``FusedAbsMaxQuanter``), ``pact`` (PACT's learned clipping and its
``PACTQuanter``). All follow the ``Quanter`` protocol of ``qtrainer.quant.base``.
"""

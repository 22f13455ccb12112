"""Observers: statistics of tensors turned into a scale (the clipping threshold ``T``).

``absmax`` (last / running / moving-average / per-channel abs max, PTQ's ``AbsmaxCalibrator``),
``histogram`` (PTQ's KL, percentile and MSE calibrators), ``thresholds`` (their NumPy threshold
searches), ``calibrators`` (the calibrators by their seed names).
"""

"""The three quantization methods: ``qat`` (QAT), ``ptq`` (static PTQ: calibrate, freeze) and
``dynamic`` (weight-only int8 of a saved inference model)."""

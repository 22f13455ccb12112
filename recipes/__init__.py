"""Ready runs: FP32 training, QAT, PTQ and dynamic quantization of MobileNet/ResNet (``python -m recipes.run``)."""

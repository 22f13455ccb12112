"""The Trainer's loops: ``fit`` (training, with validation inside) and ``evaluation`` (validation, test, predict)."""

"""What the quantization state looks like: ``stats`` (per-layer scales, clipping, weight SQNR),
``log_stats`` (to a Trainer's loggers), ``ptq_report`` (per-layer PTQ table), ``sync`` (identical
state on every data-parallel rank)."""

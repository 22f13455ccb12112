"""Shared helpers of the benchmarks: timing, tables and JSON results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from typing import Any

import paddle

from qtrainer.quant.export.isa import EXPORT_TARGETS, int8_isa

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict[str, Any]:
    """Where and when a measurement was taken."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "int8_isa": int8_isa(),
            "cores": os.cpu_count(), "paddle": paddle.__version__, "python": platform.python_version()}


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Print an aligned table, headed by the CPU and its int8 ISA (results differ between them)."""
    where = machine()
    print(f"# {where['cpu']}, {where['cores']} cores, int8 ISA: {where['int8_isa']}, Paddle {where['paddle']}")
    cells = [headers] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def write_json(name: str, payload: dict[str, Any]) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as handle:
        json.dump({"machine": machine(), **payload}, handle, indent=2)
    return path


SPEED_MODELS = ["MobileNetV1", "MobileNetV2", "ResNet18", "ResNet50"]


def add_speed_arguments(parser: Any) -> None:
    """The options every deployment-speed benchmark takes (models, batches, threads, rounds, ...)."""
    parser.add_argument("--target", default="portable", choices=EXPORT_TARGETS,
                        help="the export's target CPUs (export_quantized_model(target=...))")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: MobileNetV1, batch 1, 1 thread, 2 rounds of 3 runs (unless given)")
    parser.add_argument("--models", nargs="+", default=None, choices=SPEED_MODELS)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--clip", default="auto", choices=["auto", "true", "false"],
                        help="export_quantized_model's clip_activations")


def resolve_speed_arguments(args: Any) -> None:
    """Fill the defaults of ``add_speed_arguments`` (the quick ones with ``--quick``), in place."""
    args.clip = {"auto": "auto", "true": True, "false": False}[args.clip]
    args.models = args.models or (["MobileNetV1"] if args.quick else SPEED_MODELS)
    args.batches = args.batches or ([1] if args.quick else [1, 8])
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.iters = args.iters or (3 if args.quick else 5)

"""Train, quantize and deploy MobileNet / ResNet on Fashion-MNIST or any ImageNet-style folder.

    python -m recipes.run mobilenet_v1 all                 # FP32, control -> PTQ, QAT, dynamic -> deployed int8 results
    python -m recipes.run resnet18 fp32 --data /data/imagenet --epochs 90
    python -m recipes.run resnet18 qat --data /data/imagenet --pretrained imagenet --pact --weight-bits 4
    tensorboard --logdir recipe_runs                       # loss, accuracy, LR, quantization scales

Methods: ``fp32`` (train), ``control`` (the FP32 weights fine-tuned with QAT's steps, learning rate
and data order, without quantization: what QAT is compared with, since it trains further),
``qat`` (QATCallback, from FP32 weights), ``ptq`` (PTQCallback with a calibrator), ``dynamic``
(weight-only int8/int16), ``all`` (fp32, control, ptq, qat, dynamic). Without
``--data`` the recipes use Fashion-MNIST (Debian's ``dataset-fashion-mnist``), materialised once as
an ImageNet-style folder so it goes through the same loader as ImageNet. Every quantized model is
exported for Paddle Inference and evaluated there (int8 oneDNN on CPU), next to the simulated
(dygraph) model; results go to ``<out>/<arch>/<method>/results.json`` and ``<out>/<arch>/summary.json``.

Running again with the same ``--out``: before anything is trained, the runner looks for the files
the chosen methods would write (FP32 weights, exports, ``results.json``) and refuses if an earlier
run left any, naming them; ``--overwrite`` replaces them (exports atomically), ``--out DIR`` keeps
them. TensorBoard logs never clash: every run gets its own ``version_N``.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import paddle

from qtrainer import ClassificationModule, Trainer
from qtrainer._io import atomic_write_bytes, atomic_write_text
from qtrainer.callbacks import LearningRateMonitor
from qtrainer.data import make_loaders, prepare_fashion_mnist_folder
from qtrainer.loggers import TensorBoardLogger
from qtrainer.quant import QATCallback, quantize_dygraph_weights
from qtrainer.quant.export.inference import create_predictor, load_int8_predictor, predict
from qtrainer.quant.export.isa import EXPORT_TARGETS
from recipes.archs import ARCHS, Defaults

log = logging.getLogger("recipes")

METHODS = ("fp32", "control", "qat", "ptq", "dynamic", "all")
ALL_METHODS = ("fp32", "control", "ptq", "qat", "dynamic")
CALIBRATORS = ("KLQuantizer", "HistQuantizer", "AbsmaxQuantizer", "MSEQuantizer")


@dataclass
class Settings:
    arch: str
    method: str
    data: str | None
    out: str
    image_size: int
    width: float
    batch_size: int
    workers: int
    fp32_lr: float
    fp32_epochs: int | None  # None: as many as --max-steps needs
    fp32_max_steps: int | None
    qat_lr: float
    qat_epochs: int | None
    qat_max_steps: int | None
    calib_batches: int
    optimizer: str
    pretrained: str | None
    from_scratch: bool
    pact: bool
    weight_bits: int
    calibrator: str
    dynamic_bits: int
    val_batches: int | None
    train_limit: int | None
    seed: int
    threads: int | None
    check_time_limit: float = 300.0
    overwrite: bool = False
    runtime: str = "paddle"
    export_formats: tuple[str, ...] = ()  # written besides the Paddle model ('openvino', 'onnx')
    target: str = "portable"  # the CPUs the int8 export is for (qtrainer.quant.export.isa.EXPORT_TARGETS)
    bias_correction: bool = False  # PTQ: correct each layer's bias by its mean output error
    max_drop: float | None = None  # PTQ: the export's accuracy-aware fallback (top-1 points lost, as a fraction)

    @property
    def export_kwargs(self) -> dict[str, Any]:
        """Recipes write the export even when its self-check fails, and report the check's verdict."""
        extra = set(self.export_formats) | ({"openvino"} if self.runtime == "openvino" else set())
        formats = ("paddle", *sorted(extra))
        return {"search_time_limit": self.check_time_limit, "on_failure": "write", "num_threads": self.threads or 1,
                "overwrite": self.overwrite, "formats": formats, "target": self.target}

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out, self.arch)

    def method_dir(self, method: str) -> str:
        return os.path.join(self.run_dir, method)

    @property
    def fp32_weights(self) -> str:
        return os.path.join(self.method_dir("fp32"), "net.pdparams")


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m recipes.run", description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(ARCHS), help="architecture")
    parser.add_argument("method", choices=METHODS, help="what to run")
    parser.add_argument("--data", help="ImageNet-style folder with train/<class>/ and val/<class>/ (default: Fashion-MNIST)")
    parser.add_argument("--out", default="recipe_runs", help="output directory (default: recipe_runs)")
    parser.add_argument("--epochs", type=int, help="training epochs (FP32; QAT uses --qat-epochs)")
    parser.add_argument("--max-steps", type=int, help="FP32 optimizer steps (alone: as many epochs as they take)")
    parser.add_argument("--qat-epochs", type=int)
    parser.add_argument("--qat-max-steps", type=int, help="QAT optimizer steps (alone: as many epochs as they take)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="FP32 learning rate")
    parser.add_argument("--qat-lr", type=float)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--width", type=float, help="MobileNet width multiplier")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes")
    parser.add_argument("--pretrained", help="FP32 weights: a .pdparams file of this architecture, or 'imagenet' (Paddle's download)")
    parser.add_argument("--from-scratch", action="store_true", help="allow QAT/PTQ/dynamic without FP32 weights")
    parser.add_argument("--pact", action="store_true", help="QAT with PACT activation clipping")
    parser.add_argument("--weight-bits", type=int, default=8, help="weight bits of QAT and PTQ (e.g. 4 with --pact)")
    parser.add_argument("--calibrator", default="KLQuantizer", choices=CALIBRATORS, help="PTQ activation calibrator")
    parser.add_argument("--calib-batches", type=int)
    parser.add_argument("--dynamic-bits", type=int, default=8, choices=(8, 16), help="weight bits of dynamic quantization")
    parser.add_argument("--val-batches", type=int, help="evaluate on the first N validation batches only")
    parser.add_argument("--train-limit", type=int, help="Fashion-MNIST only: use the first N training images per class")
    parser.add_argument("--check-time-limit", type=float, default=300.0,
                        help="seconds the export's self-check may spend finding layers that must stay float")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in the same --out (refused otherwise, before training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--export", nargs="+", choices=("openvino", "onnx"),
                        help="also write these formats beside the Paddle model, each checked against the "
                             "simulation (OpenVINO IR: qtrainer[openvino]; ONNX QDQ: qtrainer[onnx])")
    parser.add_argument("--runtime", default="paddle", choices=("paddle", "openvino"),
                        help="runtime of the deployed evaluation: Paddle Inference (default) or OpenVINO "
                             "(the export also writes the OpenVINO IR; needs qtrainer[openvino])")
    parser.add_argument("--target", default="portable", choices=EXPORT_TARGETS,
                        help="the CPUs the int8 export is for: portable (default) or avx2 (correct on every "
                             "x86-64 CPU with AVX2), vnni (AVX-512 VNNI / AVX-VNNI / AMX: unsigned activations "
                             "on the full u8 grid), auto (this CPU's kind)")
    parser.add_argument("--bias-correction", action="store_true",
                        help="PTQ: correct each quantized layer's bias by its mean output error on calibration batches")
    parser.add_argument("--max-drop", type=float,
                        help="PTQ: keep the most sensitive layers in float until the deployed top-1 loses at most this "
                             "much against FP32 on 20 validation batches (a fraction: 0.005 = 0.5 pt)")
    args = parser.parse_args(argv)

    arch = ARCHS[args.arch]
    defaults: Defaults = arch.imagenet if args.data else arch.fashion
    if args.width is not None and not arch.has_width:
        parser.error(f"--width applies to MobileNets only, not {args.arch}")
    if args.train_limit is not None and args.data:
        parser.error("--train-limit applies to the default Fashion-MNIST data only")

    def pick(value, default):
        return default if value is None else value

    def epochs(given, max_steps, default):  # --max-steps alone: train until that step, as Lightning does
        return given if given is not None else (None if max_steps is not None else default)

    return Settings(
        arch=args.arch, method=args.method, data=args.data, out=os.path.abspath(args.out),
        image_size=pick(args.image_size, defaults.image_size), width=pick(args.width, defaults.width),
        batch_size=pick(args.batch_size, defaults.batch_size), workers=args.workers,
        fp32_lr=pick(args.lr, defaults.fp32_lr), fp32_epochs=epochs(args.epochs, args.max_steps, defaults.fp32_epochs),
        fp32_max_steps=args.max_steps if args.max_steps is not None else (None if args.epochs else defaults.fp32_max_steps),
        qat_lr=pick(args.qat_lr, defaults.qat_lr), qat_epochs=epochs(args.qat_epochs, args.qat_max_steps, defaults.qat_epochs),
        qat_max_steps=args.qat_max_steps if args.qat_max_steps is not None else (None if args.qat_epochs else defaults.qat_max_steps),
        calib_batches=pick(args.calib_batches, defaults.calib_batches), optimizer=defaults.optimizer,
        pretrained=args.pretrained, from_scratch=args.from_scratch, pact=args.pact, weight_bits=args.weight_bits,
        calibrator=args.calibrator, dynamic_bits=args.dynamic_bits, val_batches=args.val_batches,
        train_limit=args.train_limit, seed=args.seed, threads=args.threads, check_time_limit=args.check_time_limit,
        overwrite=args.overwrite, runtime=args.runtime, export_formats=tuple(args.export or ()),
        target=args.target, bias_correction=args.bias_correction, max_drop=args.max_drop,
    )


# -- data and models ------------------------------------------------------------------------
def build_loaders(s: Settings):
    root = s.data
    if root is None:
        root = prepare_fashion_mnist_folder(limit_per_class=s.train_limit)
        # 28px centred sources: ImageNet's 8% crops would leave a few pixels, and its 0.875 center
        # crop would cut the garment's edges. Short runs learn fastest without area crops (600 steps
        # of MobileNetV1 x0.25: 0.749 with crops of 64-100% of the area, 0.800 without), so only
        # flips and the crop's aspect jitter remain, and validation sees the whole image.
        scale, crop_fraction = (1.0, 1.0), 1.0
    else:
        scale, crop_fraction = (0.08, 1.0), 0.875
    train, val = make_loaders(root, image_size=s.image_size, batch_size=s.batch_size, workers=s.workers,
                              train_scale=scale, val_crop_fraction=crop_fraction)
    return train, val, len(train.dataset.classes)


def build_net(s: Settings, num_classes: int) -> paddle.nn.Layer:
    online = s.pretrained == "imagenet"
    if online and num_classes != 1000:
        raise SystemExit("--pretrained imagenet gives a 1000-class head; this data has "
                         f"{num_classes} classes (train FP32 first, or pass a .pdparams file)")
    try:
        return ARCHS[s.arch].build(num_classes, s.width, online)
    except Exception as exc:  # noqa: BLE001 - the download is the only thing that fails here
        if online:
            raise SystemExit(f"could not download ImageNet weights for {s.arch} ({exc}); pass --pretrained PATH") from exc
        raise


def load_weights(net: paddle.nn.Layer, path: str, arch: str) -> None:
    """Load a .pdparams into ``net``; name every mismatched key instead of loading half a model."""
    if not os.path.isfile(path):
        raise SystemExit(f"--pretrained {path!r}: no such file")
    try:
        state = paddle.load(path)
    except Exception as exc:  # noqa: BLE001 - Paddle raises ValueError, UnpicklingError, EOFError, ... here
        raise SystemExit(f"--pretrained {path!r} is not a Paddle state dict (.pdparams written by paddle.save): "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise SystemExit(f"--pretrained {path!r} holds a {type(state).__name__}, not a state dict of {arch} "
                         "(a .pdparams written by paddle.save(net.state_dict(), path))")
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if list(own[k].shape) != list(np.shape(state[k])))
    if missing or unexpected or shapes:
        detail = "; ".join(part for part in (
            f"missing {missing[:8]}" if missing else "", f"unexpected {unexpected[:8]}" if unexpected else "",
            f"shape mismatch {[(k, list(np.shape(state[k])), list(own[k].shape)) for k in shapes[:8]]}" if shapes else "",
        ) if part)
        raise SystemExit(f"--pretrained {path!r} does not match {arch} with this head/width: {detail}")
    net.set_state_dict(state)


def initial_net(s: Settings, num_classes: int, method: str) -> tuple[paddle.nn.Layer, str]:
    """The FP32 starting point of a quantization method: --pretrained, this run's FP32 output, or scratch."""
    net = build_net(s, num_classes)
    if s.pretrained and s.pretrained != "imagenet":
        load_weights(net, s.pretrained, s.arch)
        return net, s.pretrained
    if s.pretrained == "imagenet":
        return net, "imagenet"
    if os.path.isfile(s.fp32_weights):
        load_weights(net, s.fp32_weights, s.arch)
        return net, s.fp32_weights
    if not s.from_scratch:
        raise SystemExit(f"{method} needs FP32 weights: run `python -m recipes.run {s.arch} fp32` first "
                         f"(expected {s.fp32_weights}), pass --pretrained PATH, or --from-scratch")
    log.warning("%s starts from random weights (--from-scratch)", method)
    return net, "scratch"


def input_spec(s: Settings) -> list[paddle.static.InputSpec]:
    return [paddle.static.InputSpec([None, 3, s.image_size, s.image_size], "float32", name="image")]


def make_trainer(s: Settings, method: str, epochs: int, max_steps: int | None, extra: dict | None = None) -> Trainer:
    return Trainer(
        max_epochs=epochs, max_steps=max_steps, seed=s.seed, num_threads=s.threads,
        default_root_dir=s.method_dir(method), limit_val_batches=s.val_batches, num_sanity_val_steps=0,
        logger=TensorBoardLogger(s.run_dir, name=method), callbacks=[LearningRateMonitor()], **(extra or {}),
    )


# -- evaluation -------------------------------------------------------------------------------
def _val_batches(s: Settings, loader):
    for index, (images, labels) in enumerate(loader):
        if s.val_batches is not None and index >= s.val_batches:
            break
        yield images, labels


def dygraph_logits(s: Settings, net: paddle.nn.Layer, loader) -> tuple[np.ndarray, np.ndarray]:
    net.eval()
    logits, labels = [], []
    with paddle.no_grad():
        for images, target in _val_batches(s, loader):
            logits.append(net(images).numpy())
            labels.append(target.numpy().reshape(-1))
    return np.concatenate(logits), np.concatenate(labels)


def deployed_runner(s: Settings, prefix: str, int8: bool) -> tuple[Callable[[np.ndarray], np.ndarray], dict | None]:
    """``(run(images) -> logits, int8 op counts)`` of the model at ``prefix`` on ``s.runtime``.

    ``'paddle'``: Paddle Inference (oneDNN; int8 kernels for an int8 export). ``'openvino'``: the
    OpenVINO IR beside it (written by the export's ``formats``, or converted here for a float
    model); the counts are the compute nodes OpenVINO runs in int8. ``'onnxruntime'``: the ONNX
    model beside it (``--export onnx``); the counts are onnxruntime's int8 kernels.
    """
    threads = s.threads or 1
    if s.runtime == "onnxruntime":
        from qtrainer.quant.export.onnx import load_onnxruntime, onnxruntime_int8_nodes, run_onnxruntime

        session = load_onnxruntime(prefix + ".onnx", num_threads=threads)
        counts = {"int8_compute": onnxruntime_int8_nodes(prefix + ".onnx", threads)["int8_compute"]}
        return (lambda images: run_onnxruntime(session, [images])[0]), counts
    if s.runtime == "openvino":
        from qtrainer.quant.export.openvino import load_openvino, run_openvino, runtime_precisions, write_openvino

        if not os.path.exists(prefix + ".xml"):
            write_openvino(prefix)
        compiled = load_openvino(prefix + ".xml", num_threads=threads)
        summary = runtime_precisions(compiled)["summary"]
        counts = {"int8_compute": summary["int8_compute"]} if int8 else None
        return (lambda images: run_openvino(compiled, [images])[0]), counts
    if int8:
        predictor, counts = load_int8_predictor(prefix, num_threads=threads)
    else:
        predictor, counts = create_predictor(prefix, int8=False, num_threads=threads), None
    return (lambda images: predict(predictor, images)[0]), counts


def deployment_results(s: Settings, net, prefix: str, loader, int8: bool = True) -> dict[str, Any]:
    """The deployed model on ``s.runtime`` against its simulation, and on the other runtimes whose
    files the export wrote (Paddle Inference always; OpenVINO, onnxruntime when there)."""
    simulated, labels = dygraph_logits(s, net, loader)

    def measure(settings: Settings) -> dict[str, Any]:
        run, int8_ops = deployed_runner(settings, prefix, int8)
        deployed = np.concatenate([run(images.numpy()) for images, _ in _val_batches(settings, loader)])
        rel_l2 = float(np.linalg.norm(deployed - simulated) / max(np.linalg.norm(simulated), 1e-12))
        return {
            "runtime": settings.runtime,
            "deployed_top1": float((deployed.argmax(1) == labels).mean()),
            "agreement_top1": float((deployed.argmax(1) == simulated.argmax(1)).mean()),
            "rel_l2": rel_l2,
            **({"int8_ops": dict(int8_ops)} if int8_ops is not None else {}),
        }

    results = {"images": int(len(labels)), "simulated_top1": float((simulated.argmax(1) == labels).mean()),
               **measure(s)}
    others = {"paddle": True, "openvino": int8 and os.path.exists(prefix + ".xml"),
              "onnxruntime": int8 and os.path.exists(prefix + ".onnx")}
    for runtime, present in others.items():
        if present and runtime != s.runtime:
            results[runtime] = measure(dataclasses.replace(s, runtime=runtime))
    return results


def export_fp32(net: paddle.nn.Layer, prefix: str, spec) -> None:
    """A plain FP32 Paddle Inference model (legacy format, like the quantized ones)."""
    net.eval()
    with paddle.pir_utils.DygraphOldIrGuard():
        paddle.jit.save(net, prefix, input_spec=spec)


# -- methods ----------------------------------------------------------------------------------
def _module(s: Settings, net, lr: float) -> ClassificationModule:
    return ClassificationModule(net, optimizer=s.optimizer, lr=lr, scheduler="cosine")


def run_fp32(s: Settings, loaders) -> dict[str, Any]:
    train, val, num_classes = loaders
    net = build_net(s, num_classes)
    if s.pretrained and s.pretrained != "imagenet":
        load_weights(net, s.pretrained, s.arch)
    trainer = make_trainer(s, "fp32", s.fp32_epochs, s.fp32_max_steps)
    start = time.perf_counter()
    trainer.fit(_module(s, net, s.fp32_lr), train, val)
    seconds = time.perf_counter() - start
    os.makedirs(s.method_dir("fp32"), exist_ok=True)
    weights = io.BytesIO()
    paddle.save(net.state_dict(), weights)
    atomic_write_bytes(s.fp32_weights, weights.getvalue())  # a kill never leaves half a weights file for the next stage
    prefix = os.path.join(s.method_dir("fp32"), "export", "model")
    export_fp32(net, prefix, input_spec(s))
    results = deployment_results(s, net, prefix, val, int8=False)
    return {"train_seconds": seconds, "steps": trainer.global_step, "weights": s.fp32_weights, "export": prefix, **results}


def run_control(s: Settings, loaders) -> dict[str, Any]:
    """The FP32 weights trained further exactly as QAT trains them (steps, learning rate, seed, data
    order), without quantization: QAT's accuracy is read against this, not against the FP32 model."""
    train, val, num_classes = loaders
    net, source = initial_net(s, num_classes, "control")
    trainer = make_trainer(s, "control", s.qat_epochs, s.qat_max_steps)
    start = time.perf_counter()
    trainer.fit(_module(s, net, s.qat_lr), train, val)
    seconds = time.perf_counter() - start
    prefix = os.path.join(s.method_dir("control"), "export", "model")
    export_fp32(net, prefix, input_spec(s))
    results = deployment_results(s, net, prefix, val, int8=False)
    return {"from": source, "train_seconds": seconds, "steps": trainer.global_step, "export": prefix, **results}


def run_qat(s: Settings, loaders) -> dict[str, Any]:
    train, val, num_classes = loaders
    net, source = initial_net(s, num_classes, "qat")
    config = {"weight_bits": s.weight_bits}
    if s.pact:
        config["activation_preprocess_type"] = "PACT"
    export_dir = os.path.join(s.method_dir("qat"), "export")
    callback = QATCallback(config, export_dir=export_dir, input_spec=input_spec(s), export_kwargs=s.export_kwargs)
    trainer = make_trainer(s, "qat", s.qat_epochs, s.qat_max_steps)
    start = time.perf_counter()
    trainer.fit(_module(s, net, s.qat_lr), train, val, callbacks=[callback])
    seconds = time.perf_counter() - start
    results = deployment_results(s, net, os.path.join(export_dir, "model"), val)
    return {"from": source, "config": config, "train_seconds": seconds, "steps": trainer.global_step,
            "export": export_dir, "export_check": _report_summary(callback.export_report), **results}


def run_ptq(s: Settings, loaders) -> dict[str, Any]:
    from qtrainer.quant import PTQCallback

    train, val, num_classes = loaders
    net, source = initial_net(s, num_classes, "ptq")
    export_dir = os.path.join(s.method_dir("ptq"), "export")
    callback = PTQCallback({"activation_quantizer": s.calibrator, "weight_bits": s.weight_bits},
                           calib_batches=s.calib_batches, bias_correction=s.bias_correction, max_drop=s.max_drop,
                           export_dir=export_dir, input_spec=input_spec(s), export_kwargs=s.export_kwargs)
    trainer = make_trainer(s, "ptq", 1, None)
    start = time.perf_counter()
    trainer.fit(_module(s, net, s.fp32_lr), train, val, callbacks=[callback])
    seconds = time.perf_counter() - start
    results = deployment_results(s, trainer.module.net, os.path.join(export_dir, "model"), val)
    return {"from": source, "calibrator": s.calibrator, "weight_bits": s.weight_bits,
            "bias_correction": s.bias_correction, "max_drop": s.max_drop,
            "accuracy_fallback": getattr(callback.export_report, "accuracy", None),
            "calib_batches": s.calib_batches, "calib_seconds": seconds,
            "export": export_dir, "export_check": _report_summary(callback.export_report), **results}


def run_dynamic(s: Settings, loaders) -> dict[str, Any]:
    _, val, num_classes = loaders
    net, source = initial_net(s, num_classes, "dynamic")
    net.eval()
    prefix = os.path.join(s.method_dir("dynamic"), "export", "model")
    report = quantize_dygraph_weights(net, prefix, input_spec(s), weight_bits=s.dynamic_bits)
    results = deployment_results(s, net, prefix, val, int8=False)
    sizes = {"params_bytes_fp32": report["source"]["params_bytes"], "params_bytes": report["output"]["params_bytes"],
             "params_ratio": report["output"]["params_ratio"]}
    return {"from": source, "weight_bits": s.dynamic_bits, "export": prefix, **sizes, **results}


def _report_summary(report: Any) -> Any:
    if report is None:
        return None
    to_dict = getattr(report, "to_dict", None)
    return to_dict() if callable(to_dict) else str(report)


RUNNERS = {"fp32": run_fp32, "control": run_control, "ptq": run_ptq, "qat": run_qat, "dynamic": run_dynamic}
_MODEL_SUFFIXES = (".pdmodel", ".pdiparams", ".quant.json", ".dynamic_quant.json")


def stage_outputs(s: Settings, method: str) -> list[str]:
    """The files a stage writes that would replace an earlier run's (logs are versioned, so not these)."""
    prefix = os.path.join(s.method_dir(method), "export", "model")
    paths = [os.path.join(s.method_dir(method), "results.json"), *(prefix + x for x in _MODEL_SUFFIXES)]
    if method == "fp32":
        paths.insert(0, s.fp32_weights)
    return [p for p in paths if os.path.exists(p)]


def check_outputs(s: Settings, methods: list[str]) -> None:
    """Before any training: refuse to replace an earlier run's results unless ``--overwrite``."""
    existing = [p for method in methods for p in stage_outputs(s, method)]
    if existing and not s.overwrite:
        shown = ", ".join(os.path.relpath(p, s.run_dir) for p in existing[:6]) + (" ..." if len(existing) > 6 else "")
        raise SystemExit(
            f"{s.run_dir} already holds the results of an earlier run ({shown}); nothing was trained. Pass "
            f"--overwrite to replace them, or --out DIR to keep them and run elsewhere"
        )
    if existing:
        log.warning("--overwrite: replacing %d file(s) of an earlier run in %s", len(existing), s.run_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    s = parse_args(argv)
    methods = list(ALL_METHODS) if s.method == "all" else [s.method]
    check_outputs(s, methods)
    paddle.seed(s.seed)
    loaders = build_loaders(s)
    summary_path = os.path.join(s.run_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
    for method in methods:
        start = time.perf_counter()
        result = RUNNERS[method](s, loaders)
        result["wall_seconds"] = time.perf_counter() - start
        atomic_write_text(os.path.join(s.method_dir(method), "results.json"),
                          json.dumps(result, indent=2, default=str), "recipes")
        summary[method] = {k: result.get(k) for k in ("deployed_top1", "simulated_top1", "agreement_top1", "rel_l2",
                                                      "images", "steps", "wall_seconds")}
        summary[method]["what"] = describe(s, method, result)
        print(f"{s.arch} {method}: deployed top-1 {result['deployed_top1']:.4f}, simulated {result['simulated_top1']:.4f}, "
              f"agreement {result['agreement_top1']:.4f} ({result['wall_seconds']:.0f} s)", flush=True)
    atomic_write_text(summary_path, json.dumps(summary, indent=2), "recipes")
    _print_summary(s, summary)
    return summary


def describe(s: Settings, method: str, result: dict[str, Any]) -> str:
    """One line saying what a summary row is (printed beside it, kept in ``summary.json``)."""
    steps = result.get("steps")
    bits = "int8" if s.weight_bits == 8 else f"W{s.weight_bits}A8"
    if method == "fp32":
        return f"the FP32 model, {steps} training steps: the baseline"
    if method == "control":
        return f"FP32 trained {steps} steps more, as QAT trains, without quantization"
    if method == "ptq":
        return f"{bits}: the FP32 model calibrated ({s.calibrator}, {s.calib_batches} batches), not trained"
    if method == "qat":
        return f"{bits}: the FP32 model trained {steps} steps with fake quantization{' (PACT)' if s.pact else ''}"
    return f"int{s.dynamic_bits} weights, float compute (dynamic)"


def _baseline_of(method: str, summary: dict[str, Any]) -> str | None:
    """The row a method's drop is read against: QAT against the control when there is one."""
    if method == "fp32":
        return None
    if method == "qat" and "control" in summary:
        return "control"
    return "fp32" if "fp32" in summary else None


def _print_summary(s: Settings, summary: dict[str, Any]) -> None:
    runtime = {"paddle": "Paddle Inference", "openvino": "OpenVINO"}.get(s.runtime, s.runtime)
    print(f"\n{s.arch} on {s.data or 'Fashion-MNIST'} ({s.image_size}px), {_summary_images(summary)} test images, "
          f"every model deployed through {runtime}")
    print(f"{'method':8} {'top-1':>7} {'drop pt':>8} {'vs':8} {'agree':>7}  what it is")
    for method, row in summary.items():
        top1 = row.get("deployed_top1")
        base = _baseline_of(method, summary)
        base_top1 = summary[base].get("deployed_top1") if base else None
        drop = f"{(base_top1 - top1) * 100:8.2f}" if base_top1 is not None and top1 is not None else " " * 8
        agree = row.get("agreement_top1")
        agree = f"{agree * 100:6.2f}%" if agree is not None and method not in ("fp32", "control") else " " * 7
        print(f"{method:8} {top1:7.4f} {drop} {base or '':8} {agree}  {row.get('what', '')}")
    print("top-1: the deployed model's accuracy; drop pt: top-1 points lost against the row in 'vs' "
          "(QAT against the control, which trained as long); agree: share of images where the deployed "
          "model gives the simulated (dygraph) model's answer (dynamic: the FP32 model's)")
    print(f"TensorBoard: tensorboard --logdir {s.run_dir}")


def _summary_images(summary: dict[str, Any]) -> str:
    counts = {row.get("images") for row in summary.values() if row.get("images")}
    return f"{counts.pop():,}" if len(counts) == 1 else "the"


if __name__ == "__main__":
    main(sys.argv[1:])

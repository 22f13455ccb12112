"""qtrainer/device.py: devices, precisions and CPU threads."""
from __future__ import annotations

import paddle
import pytest

from qtrainer.device import default_num_threads, resolve_device, resolve_precision, set_num_threads


def test_cpu_and_auto_resolve_on_a_machine_without_gpus():
    assert resolve_device("cpu") == "cpu"
    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match=r"device='gpu' but this Paddle build sees no GPU.*available here: auto, cpu"):
            resolve_device("gpu")


@pytest.mark.parametrize("device", ["tpu", "cuda:0", 0])
def test_unknown_devices_are_refused_listing_the_accepted_ones(device):
    with pytest.raises(ValueError, match=r"is not supported; use one of: auto, cpu, gpu, gpu:N"):
        resolve_device(device)


def test_precision_32_is_a_no_op_and_unknown_ones_are_refused():
    precision = resolve_precision("32", "cpu")
    assert precision.amp_dtype is None and not precision.needs_grad_scaler
    with precision.autocast():
        assert paddle.ones([1]).dtype == paddle.float32
    with pytest.raises(ValueError, match=r"precision='64' is not supported; use one of: "):
        resolve_precision("64", "cpu")


def test_threads_are_shared_among_the_processes_of_a_node():
    cores = default_num_threads()
    assert cores >= 1 and default_num_threads(local_world_size=cores * 2) == 1
    with pytest.raises(ValueError, match=r"num_threads=0: use a positive integer"):
        set_num_threads(0)
    set_num_threads(1)

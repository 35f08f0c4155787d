"""Devices and dispatch: the array decides which Ops run."""
from gpunet.backend.devices import Device, device, device_info, gpu_status, has_cupy, has_gpu
from gpunet.backend.dispatch import Array, is_cupy_array, ops_for, ops_for_device, to_device, to_numpy
from gpunet.backend.ops import ACTIVATIONS, Ops

__all__ = [
    "ACTIVATIONS", "Array", "Device", "Ops", "device", "device_info", "gpu_status", "has_cupy", "has_gpu",
    "is_cupy_array", "ops_for", "ops_for_device", "to_device", "to_numpy",
]

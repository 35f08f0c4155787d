"""cupy.cuda.runtime for the stand-in: one device with an H100's limits."""


class CUDARuntimeError(RuntimeError):
    pass


# cudaDataType_t, as cupy_backends.cuda.api.runtime exports it
CUDA_R_32F = 0
CUDA_R_16F = 2
CUDA_R_16BF = 14

NAME = b"gpunet CuPy stand-in (kernel emulator, sm_90 limits)"


def getDeviceCount() -> int:
    return 1


def getDeviceProperties(index: int) -> dict:
    if index != 0:
        raise CUDARuntimeError(f"cudaErrorInvalidDevice: device {index} does not exist")
    return {"name": NAME, "totalGlobalMem": 80 * 2**30, "major": 9, "minor": 0, "multiProcessorCount": 132,
            "maxThreadsPerBlock": 1024, "maxThreadsDim": (1024, 1024, 64), "maxGridSize": (2**31 - 1, 65535, 65535),
            "sharedMemPerBlock": 48 * 1024, "regsPerBlock": 65536, "warpSize": 32}


def runtimeGetVersion() -> int:
    return 13000


def driverGetVersion() -> int:
    return 13000

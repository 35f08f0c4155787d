class CompileException(Exception):
    """A kernel source the compiler rejected (NVRTC on a GPU, g++ in the emulator)."""

"""torch.compile on this machine: whether it can build kernels, asked before compiling.

torch.compile's default backend (inductor) generates C++ for the CPU and Triton kernels for
CUDA, and builds them with the machine's compiler when the first step runs. Without one the
run would fail minutes in with a long traceback; ``require_compiler`` says so at start, in
one line (a config error, exit 2), naming TRAIN.COMPILE.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

from config import ConfigError, source_of


def _cpp_compiler() -> Optional[str]:
    """The C++ compiler inductor would use for CPU kernels (it runs ``<cxx> --version``)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return get_cpp_compiler()
    except ImportError:  # another torch layout: look for what inductor defaults to
        return shutil.which(os.environ.get("CXX", "g++"))
    except Exception:  # torch._inductor.exc.InvalidCxxCompiler and the subprocess errors
        return None


def _c_compiler() -> Optional[str]:
    """The C compiler Triton builds its launchers with: $CC, else gcc or clang."""
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else (shutil.which("gcc") or shutil.which("clang"))


def toolchain_missing(device: torch.device) -> Optional[str]:
    """Why torch.compile (inductor) cannot build kernels for ``device`` here, or None."""
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            has_triton = None
        if has_triton is not None and not has_triton():
            return "inductor needs Triton for CUDA kernels and this environment has none (pip install triton)"
        if _c_compiler() is None:
            return "Triton needs a C compiler and none was found (set CC, or install gcc or clang)"
        return None
    if _cpp_compiler() is None:
        return (f"inductor needs a C++ compiler for CPU kernels and none runs "
                f"({os.environ.get('CXX', 'g++')}; set CXX, or install g++)")
    return None


def require_compiler(config, device: torch.device) -> None:
    """ConfigError naming TRAIN.COMPILE when this machine cannot compile for ``device``."""
    why = toolchain_missing(device)
    if why:
        raise ConfigError(f"{source_of(config, 'TRAIN.COMPILE')}: TRAIN.COMPILE: {why}; "
                          f"or train eagerly with TRAIN.COMPILE False")

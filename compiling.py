"""torch.compile on this machine: whether it can build kernels, asked before compiling.

torch.compile's default backend (inductor) generates C++ for the CPU and Triton kernels for
CUDA, and builds them with the machine's compiler when the first step runs. Without one the
run would fail minutes in with a long traceback; ``require_compiler`` says so at start, in
one line (a config error, exit 2), naming TRAIN.COMPILE. FlexAttention (the 'flex' backend
of LAI and of DAT's neighborhood attention) is compiled the same way whatever TRAIN.COMPILE:
``check_flex`` gives models/ the question, so that 'auto' falls back and 'flex' is refused.
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


def check_flex(device: torch.device) -> Optional[str]:
    """Give models/ the question whether torch.compile can build FlexAttention's kernels for
    ``device`` (``models.attention.set_flex_check``): without them backend 'auto' runs the
    current path and an explicit 'flex' is refused as the model is built (a config error
    naming the key). Where 'auto' picks flex (CUDA) it is asked now, and the line to log is
    returned; elsewhere only an explicit 'flex' asks (the CPU's probe imports inductor, ~1 s)."""
    from models import attention

    def why_not() -> Optional[str]:
        why = toolchain_missing(device)
        return f"torch.compile cannot build FlexAttention's kernels here: {why}" if why else None

    attention.set_flex_check(why_not)
    if device.type in attention.AUTO_FLEX_DEVICES and attention.flex_available():
        why = attention.flex_refusal()
        if why:
            return (f"{why}; backend 'auto' (MODEL.VIT.ATTN_ARGS.BACKEND, MODEL.DAT.NA_BACKEND) "
                    f"runs SDPA / the tiled neighborhood op instead")
    return None

"""Where a model runs and in what precision: the device and dtype a model is loaded on when none is given
(`$DREAMLENS_DEVICE` / `$DREAMLENS_DTYPE`, else CUDA when there is one, and float32), and dtype names."""

from __future__ import annotations

import difflib
import os

import torch

from .errors import DeviceError

DEVICE_ENV = "DREAMLENS_DEVICE"
DTYPE_ENV = "DREAMLENS_DTYPE"

# the names a user may give a dtype (CLI --dtype, $DREAMLENS_DTYPE, load_model(dtype="bf16"))
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else `$DREAMLENS_DEVICE`, else "cuda" when a GPU is visible, else "cpu" (TransformerLens's own
    default, so a GPU user runs on the GPU without asking); a CUDA device that is not here is refused."""
    source = "device"
    if device is None and os.environ.get(DEVICE_ENV, "").strip():
        device, source = os.environ[DEVICE_ENV].strip(), f"${DEVICE_ENV}"
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown {source} {device!r}; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{source} {str(device)!r}: CUDA is not available here (torch {torch.__version__}"
                f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'}); use 'cpu'"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"{source} {str(device)!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """`dtype` (a torch dtype or a name such as "bf16"), else `$DREAMLENS_DTYPE`, else float32."""
    source = "dtype"
    if dtype is None and os.environ.get(DTYPE_ENV, "").strip():
        dtype, source = os.environ[DTYPE_ENV].strip(), f"${DTYPE_ENV}"
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise DeviceError(f"{source} {dtype} is not a floating-point dtype; use float32, bfloat16 or float16")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPES:
        close = difflib.get_close_matches(name, list(DTYPES), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DeviceError(f"unknown {source} {str(dtype)!r}{hint}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the name `resolve_dtype` reads back."""
    return str(dtype).removeprefix("torch.")

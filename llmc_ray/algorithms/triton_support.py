"""What the Triton kernels share: the optional import, rounding as the PyTorch quantizer rounds, and the rule
that a kernel which fails to build or launch is given up once per process for its PyTorch path."""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, TypeVar

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with CUDA builds of torch; CPU-only installs may lack it
    triton = None
    tl = None

log = logging.getLogger(__name__)
T = TypeVar("T")


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, as the tests run them."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class KernelSwitch:
    """Whether this process still tries a family of kernels. The first failure to build or launch (an old GPU,
    a Triton/driver mismatch) switches it off, says so once in the log, and the PyTorch path runs from then on;
    out-of-memory is the caller's problem, not the kernel's, and is raised."""

    def __init__(self, what: str, instead: str):
        self.what, self.instead = what, instead
        self.broken: Optional[str] = None  # why the kernels were given up

    def runs_on(self, t: torch.Tensor) -> bool:
        return triton is not None and self.broken is None and (t.is_cuda or interpreting())

    def attempt(self, kernel: Callable[[], T], fallback: Callable[[], T]) -> T:
        if self.broken is not None:
            return fallback()
        try:
            return kernel()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any build/launch failure: the PyTorch path gives the same result
            self.broken = f"the {self.what} failed on this GPU ({type(e).__name__}: {str(e)[:200]})"
            log.warning("%s; %s for the rest of this process", self.broken, self.instead)
            return fallback()


if triton is not None:

    @triton.jit
    def round_half_away(x):
        """Round half away from zero, as `quant.quantizer.round_half_away` does (tl.math rounds half to even)."""
        return tl.where(x >= 0, tl.floor(x + 0.5), -tl.floor(-x + 0.5))
else:
    round_half_away = None

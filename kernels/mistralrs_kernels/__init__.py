"""mistralrs-serve kernels: Triton kernels for CUDA and their torch references.

`reference` holds the torch implementation of every op; the CPU path of the
model runs on it, and each Triton kernel is tested against it. The kernels
import Triton lazily: `from mistralrs_kernels import triton_ops` needs it
(on a CPU machine, set TRITON_INTERPRET=1 before the first import).
"""

from mistralrs_kernels import reference

__all__ = ["reference"]
__version__ = "0.1.0"

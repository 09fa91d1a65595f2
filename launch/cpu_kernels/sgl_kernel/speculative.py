"""sgl_kernel.speculative: SGLang's NGRAM worker imports reconstruct_indices_from_tree_mask
from here on CPU (sglang/kernels/ops/speculative/reconstruct_tree.py). Other names raise
MissingKernelOp, as in the rest of this stand-in."""
from sgl_kernel import _module_getattr
from sgl_kernel.spec_ops import reconstruct_indices_from_tree_mask  # noqa: F401

__getattr__ = _module_getattr(__name__)

"""sgl_kernel for machines without libcuda: import-compatible, honest about what it lacks.

SGLang imports sgl_kernel (and some submodules) at startup even on its CPU engine, where,
without AMX, layers fall back to plain torch. The PyPI build needs libcuda and the CPU
build is not published, so this package stands in for it.

Implemented (in pure torch, spec_ops.py): the CPU ops SGLang's speculative decoding
(NGRAM, STANDALONE, EAGLE) calls once per step -- fill_bonus_tokens_cpu,
fill_accept_out_cache_loc_cpu, assign_draft_cache_locs_contiguous_cpu,
assign_extend_cache_locs_cpu, assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu,
build_tree_kernel_efficient_cpu, verify_tree_greedy_cpu, and
sgl_kernel.speculative.reconstruct_indices_from_tree_mask. They follow the C++ kernels of
sgl-kernel/csrc/cpu; tests/test_spec_kernels.py checks them against loop references and
bench/spec_kernels_cuda.py against the real CUDA/Triton kernels.

Every other name resolves to a function that raises MissingKernelOp (a NotImplementedError)
naming the op, so nothing silently computes a wrong result. `torch.ops.sgl_kernel` stays
empty: no op is registered there, which is how SGLang detects that the AMX kernels are
absent (`hasattr(..., "convert_weight_packed")`).
"""
import importlib.abc
import importlib.machinery
import sys
import types

from .spec_ops import (  # noqa: F401  (re-exported: SGLang imports them from here)
    assign_draft_cache_locs_contiguous_cpu,
    assign_extend_cache_locs_cpu,
    assign_req_to_token_pool_cpu,
    build_tree_kernel_efficient_cpu,
    copy_all_layer_kv_cache_cpu,
    fill_accept_out_cache_loc_cpu,
    fill_bonus_tokens_cpu,
    verify_tree_greedy_cpu,
)

__version__ = "0.0.0+tokenwise.cpu"
IS_TOKENWISE_CPU_BUILD = True


class MissingKernelOp(NotImplementedError):
    pass


def _missing(qualname: str):
    def op(*args, **kwargs):
        raise MissingKernelOp(
            f"{qualname} is not implemented by the tokenwise CPU build of sgl_kernel "
            "(the real sgl_kernel needs CUDA); this code path needs a GPU machine")
    op.__name__ = op.__qualname__ = qualname.rsplit(".", 1)[-1]
    return op


def _module_getattr(modname: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{modname}.{name}")
    return __getattr__


__getattr__ = _module_getattr(__name__)


# Submodules that hold data, not ops: a stand-in cannot fake them, and SGLang already
# catches their ImportError and uses its own fallback.
NOT_PROVIDED = {"sgl_kernel.scalar_type"}


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import sgl_kernel.<submodule>` yield a module of missing ops. Submodules
    with real files here (speculative.py, spec_ops.py) are found first by the normal path
    finder, since this one is appended last to sys.meta_path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + ".") and fullname not in NOT_PROVIDED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = _module_getattr(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


if not any(isinstance(f, _SubmoduleFinder) for f in sys.meta_path):
    sys.meta_path.append(_SubmoduleFinder())

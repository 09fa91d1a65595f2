#!/usr/bin/env python3
"""The plugin's verify masks composed with SGLang 0.5.23's real CUDA verify kernels.

Issue 8: a vetoed draft node gets -inf in its PARENT's logit row
(tokenwise_safety.spec_tree.mask_in_parent_rows) and a forced pivot chain leaves each chain
node the only finite logit of its parent row (force_in_parent_rows, nodes from
forced_chain); the veto must hold for greedy AND sampled verification. On CPU SGLang always
verifies greedily, so this runs the sampled path where it exists: on a CUDA device, with
the kernels compiled here from SGLang's own sources (no sglang, flashinfer or tvm_ffi
import needed):

- sampled: sglang::speculative_sampling::TreeSpeculativeSamplingTargetOnly
  (sgl_kernel/speculative/sampling.cuh, over flashinfer/sampling.cuh), launched as
  jit/csrc/speculative/sampling.cuh does: grid = batch, 1024 threads, dynamic shared
  memory sizeof(SamplingTempStorage<1024, SCAN_ALGO, REDUCE_ALGO>), VecSize = gcd(4, vocab),
  Deterministic = true (eagle_sample passes deterministic=True), threshold_acc clamped to
  >= 1e-9. Fed as eagle_sample feeds it: softmax(logits / temperature), then top-k and
  top-p renorm where the batch asks for them (plain torch equivalents of flashinfer's
  renorm), draft_probs = zeros, coins from torch.rand (and the edge values 0.0 and the
  largest float below 1.0).
- greedy: sglang::speculative::VerifyTreeGreedy (sgl_kernel/speculative/eagle.cuh),
  launched as jit/csrc/speculative/tree.cuh does (grid = batch, 1 thread), fed argmax of
  the masked logits, and compared with the CPU stand-in
  launch/cpu_kernels/sgl_kernel/spec_ops.py::verify_tree_greedy_cpu on the same inputs.

Headers: --headers (default .gpu/ in the repo, ignored by git) holds sgl/ (the two SGLang
headers, copied from sglang 0.5.23's wheel), fi/flashinfer/data/include (from the
flashinfer_python wheel SGLang 0.5.23 pins) and curand/ (curand headers, used only where
the CUDA toolkit has none).

Random cases: batches of 1-8 requests, EAGLE-shaped trees (as its draft builds them) and
NGRAM-shaped trees (random parent lists) built with the test-checked CPU ops as
bench/spec_kernels_cuda.py does, vocabularies of a few thousand (all three VecSizes),
random logits with the drafted tokens boosted in their parent rows (so drafts are often
accepted), temperatures 0.3-1.5, top-k / top-p on some batches, random vetoes (also the
nodes the unmasked verify accepted, and all of the root's children), forced chains that
spell a queue from the root (sometimes going on past the chain: its last node's children
blocked, as patches/spec_verify.py does). An "edge" family makes the drafted children
cover a row's whole (top-k) support and uses the largest coin below 1.0.

Checked for every masked run: (1) no vetoed node is accepted; (2) the token drawn at the
end, predicts[last accepted], is not a vetoed token of that row (and, counted apart, not
any -inf token of the masked row): for the sampled kernel on what the plugin commits (row
"sampled+commit": spec_tree.unmask_drawn, as patches/spec_verify.py runs it), the raw
draw is recorded as information (SGLang's fallback to token vocab-1 when nothing is left
to sample can draw a masked token); (3) a forced chain is accepted whole (the accepted path
begins with it) where it fits the accept width; (4) greedy: CUDA VerifyTreeGreedy and the
CPU stand-in give identical predicts / accept_index / accept_num (unmasked runs too). Mean
accepted drafts per request, unmasked vs masked, are recorded as information.

    python bench/spec_verify_cuda.py --out bench/results/spec_verify_cuda.json

bench/results/spec_verify_cuda.json came from `--cases 800 --edge-cases 3000 --max-seconds 110
--budget-seconds 200` on an H200 (torch 2.11+cu130, nvcc 13.0), with the headers from
bench/spec_verify_cuda_headers.sh carried in .gpu/. `--cpu-dry-run` runs the
harness on CPU with Python stand-ins for both kernels (no GPU; checks the harness only).

Prints a table, writes JSON to --out; exit 1 on any violation, 2 if a kernel could not be
compiled or run, 0 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SPEC_TREE = REPO / "plugin" / "spec_tree.py"
SPEC_OPS = REPO / "launch" / "cpu_kernels" / "sgl_kernel" / "spec_ops.py"
SPEC_KERNELS_BENCH = REPO / "bench" / "spec_kernels_cuda.py"
I32, I64, F32 = torch.int32, torch.int64, torch.float32
COIN_MAX = 1.0 - 2.0 ** -24  # the largest float32 below 1.0
TOP_K_ALL = 1 << 30  # SGLang's "no top-k" value


def load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the kernels, compiled from SGLang's sources ------------------------------------------

# Torch-free: the launchers, exactly as SGLang's wrappers launch the templates (the
# TensorMatcher checks are redone in the torch wrappers below, with the shared tw_check).
# TW_NO_TORCH leaves the torch part out, for a compile check without torch headers;
# TW_CTYPES adds the plain-C entry points of the fallback build.
CUDA_COMMON = r"""
#include <cstdint>
#include <cuda_runtime.h>

#ifndef TW_NO_TORCH
static void tw_check(const torch::Tensor& t, c10::ScalarType dtype, std::vector<int64_t> shape, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be on CUDA");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has the wrong dtype");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes().vec() == shape, name, " has the wrong shape");
}
#endif

#ifdef TW_CTYPES
extern "C" const char* tw_c_error(int err) { return cudaGetErrorString((cudaError_t)err); }
#endif
"""

CUDA_GREEDY = CUDA_COMMON + r"""
#include <sgl_kernel/speculative/eagle.cuh>

cudaError_t tw_launch_greedy(int32_t* predicts, int32_t* accept_index, int32_t* accept_token_num,
                             int64_t* candidates, int64_t* retrive_index, int64_t* retrive_next_token,
                             int64_t* retrive_next_sibling, int64_t* target_predict, uint32_t batch_size,
                             uint32_t spec_tokens, uint32_t draft_tokens, cudaStream_t stream) {
  if (batch_size == 0) return cudaSuccess;
  // jit/csrc/speculative/tree.cuh: LaunchKernel(batch_size, 1, device)(VerifyTreeGreedy<int32_t, int64_t>, ...)
  sglang::speculative::VerifyTreeGreedy<int32_t, int64_t><<<batch_size, 1, 0, stream>>>(
      predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
      retrive_next_sibling, target_predict, batch_size, spec_tokens, draft_tokens);
  return cudaGetLastError();
}

#ifndef TW_NO_TORCH
void tw_greedy(torch::Tensor predicts, torch::Tensor accept_index, torch::Tensor accept_token_num,
               torch::Tensor candidates, torch::Tensor retrive_index, torch::Tensor retrive_next_token,
               torch::Tensor retrive_next_sibling, torch::Tensor target_predict, int64_t stream) {
  const int64_t bs = candidates.size(0), draft = candidates.size(1), spec = accept_index.size(1);
  for (auto* p : {&candidates, &retrive_index, &retrive_next_token, &retrive_next_sibling, &target_predict})
    tw_check(*p, torch::kInt64, {bs, draft}, "tree tensor");
  tw_check(accept_index, torch::kInt32, {bs, spec}, "accept_index");
  tw_check(accept_token_num, torch::kInt32, {bs}, "accept_token_num");
  tw_check(predicts, torch::kInt32, {bs * draft}, "predicts");
  TORCH_CHECK(draft > 0 && spec > 0);
  cudaError_t err = tw_launch_greedy(
      predicts.data_ptr<int32_t>(), accept_index.data_ptr<int32_t>(), accept_token_num.data_ptr<int32_t>(),
      candidates.data_ptr<int64_t>(), retrive_index.data_ptr<int64_t>(), retrive_next_token.data_ptr<int64_t>(),
      retrive_next_sibling.data_ptr<int64_t>(), target_predict.data_ptr<int64_t>(), (uint32_t)bs, (uint32_t)spec,
      (uint32_t)draft, reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "VerifyTreeGreedy launch: ", cudaGetErrorString(err));
}
#endif

#ifdef TW_CTYPES
// The fallback build (nvcc --shared, called through ctypes) where load_inline cannot build.
extern "C" int tw_c_greedy(void* predicts, void* accept_index, void* accept_token_num, void* candidates,
                           void* retrive_index, void* retrive_next_token, void* retrive_next_sibling,
                           void* target_predict, uint32_t batch_size, uint32_t spec_tokens, uint32_t draft_tokens,
                           void* stream) {
  return (int)tw_launch_greedy((int32_t*)predicts, (int32_t*)accept_index, (int32_t*)accept_token_num,
                               (int64_t*)candidates, (int64_t*)retrive_index, (int64_t*)retrive_next_token,
                               (int64_t*)retrive_next_sibling, (int64_t*)target_predict, batch_size, spec_tokens,
                               draft_tokens, (cudaStream_t)stream);
}
#endif
"""

CUDA_SAMPLED = CUDA_COMMON + r"""
#include <numeric>
#include <sgl_kernel/speculative/sampling.cuh>

template <uint32_t VecSize>
static cudaError_t tw_launch_sample(int32_t* predicts, int32_t* accept_index, int32_t* accept_token_num,
                                    int64_t* candidates, int64_t* retrive_index, int64_t* retrive_next_token,
                                    int64_t* retrive_next_sibling, float* uniform_samples,
                                    float* uniform_samples_for_final_sampling, float* target_probs,
                                    float* draft_probs, uint32_t batch_size, uint32_t spec_tokens,
                                    uint32_t draft_tokens, uint32_t vocab_size, double threshold_single,
                                    double threshold_acc, cudaStream_t stream) {
  using namespace flashinfer::sampling;
  if (batch_size == 0) return cudaSuccess;
  // jit/csrc/speculative/sampling.cuh: tree_speculative_sampling_target_only<VecSize, Deterministic>
  constexpr uint32_t block_threads = 1024;
  constexpr size_t smem_size = sizeof(SamplingTempStorage<block_threads, SCAN_ALGO, REDUCE_ALGO>);
  constexpr auto kernel = sglang::speculative_sampling::TreeSpeculativeSamplingTargetOnly<
      block_threads, SCAN_ALGO, REDUCE_ALGO, VecSize, /*Deterministic=*/true, float, int32_t, int64_t>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_size);
  if (err != cudaSuccess) return err;
  kernel<<<batch_size, block_threads, smem_size, stream>>>(
      predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
      retrive_next_sibling, uniform_samples, uniform_samples_for_final_sampling, target_probs, draft_probs,
      batch_size, spec_tokens, draft_tokens, vocab_size, static_cast<float>(threshold_single),
      std::max(static_cast<float>(threshold_acc), 1e-9f));
  return cudaGetLastError();
}

cudaError_t tw_launch_sample_any(int32_t* predicts, int32_t* accept_index, int32_t* accept_token_num,
                                 int64_t* candidates, int64_t* retrive_index, int64_t* retrive_next_token,
                                 int64_t* retrive_next_sibling, float* uniform_samples,
                                 float* uniform_samples_for_final_sampling, float* target_probs,
                                 float* draft_probs, uint32_t batch_size, uint32_t spec_tokens,
                                 uint32_t draft_tokens, uint32_t vocab_size, double threshold_single,
                                 double threshold_acc, cudaStream_t stream) {
  // kernels/ops/speculative/sampling.py: vec_size = math.gcd(4, vocab)
  switch (std::gcd(4u, vocab_size)) {
#define TW_CASE(V)                                                                                              \
  case V:                                                                                                       \
    return tw_launch_sample<V>(predicts, accept_index, accept_token_num, candidates, retrive_index,          \
                               retrive_next_token, retrive_next_sibling, uniform_samples,                    \
                               uniform_samples_for_final_sampling, target_probs, draft_probs, batch_size,   \
                               spec_tokens, draft_tokens, vocab_size, threshold_single, threshold_acc, stream);
    TW_CASE(1)
    TW_CASE(2)
    TW_CASE(4)
#undef TW_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

#ifndef TW_NO_TORCH
void tw_sample(torch::Tensor predicts, torch::Tensor accept_index, torch::Tensor accept_token_num,
               torch::Tensor candidates, torch::Tensor retrive_index, torch::Tensor retrive_next_token,
               torch::Tensor retrive_next_sibling, torch::Tensor uniform_samples,
               torch::Tensor uniform_samples_for_final_sampling, torch::Tensor target_probs,
               torch::Tensor draft_probs, double threshold_single, double threshold_acc, int64_t stream) {
  const int64_t bs = candidates.size(0), draft = candidates.size(1), spec = accept_index.size(1);
  const int64_t vocab = target_probs.size(2);
  for (auto* p : {&candidates, &retrive_index, &retrive_next_token, &retrive_next_sibling})
    tw_check(*p, torch::kInt64, {bs, draft}, "tree tensor");
  tw_check(accept_index, torch::kInt32, {bs, spec}, "accept_index");
  tw_check(accept_token_num, torch::kInt32, {bs}, "accept_token_num");
  tw_check(predicts, torch::kInt32, {bs * draft}, "predicts");
  tw_check(uniform_samples, torch::kFloat32, {bs, draft}, "uniform_samples");
  tw_check(uniform_samples_for_final_sampling, torch::kFloat32, {bs}, "uniform_samples_for_final_sampling");
  tw_check(target_probs, torch::kFloat32, {bs, draft, vocab}, "target_probs");
  tw_check(draft_probs, torch::kFloat32, {bs, draft, vocab}, "draft_probs");
  TORCH_CHECK(draft > 0 && spec > 0 && vocab > 0);
  TORCH_CHECK(threshold_single >= 0 && threshold_single <= 1);
  TORCH_CHECK(threshold_acc >= 0 && threshold_acc <= 1);
  cudaError_t err = tw_launch_sample_any(
      predicts.data_ptr<int32_t>(), accept_index.data_ptr<int32_t>(), accept_token_num.data_ptr<int32_t>(),
      candidates.data_ptr<int64_t>(), retrive_index.data_ptr<int64_t>(), retrive_next_token.data_ptr<int64_t>(),
      retrive_next_sibling.data_ptr<int64_t>(), uniform_samples.data_ptr<float>(),
      uniform_samples_for_final_sampling.data_ptr<float>(), target_probs.data_ptr<float>(),
      draft_probs.data_ptr<float>(), (uint32_t)bs, (uint32_t)spec, (uint32_t)draft, (uint32_t)vocab,
      threshold_single, threshold_acc, reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "TreeSpeculativeSamplingTargetOnly launch: ", cudaGetErrorString(err));
}
#endif

#ifdef TW_CTYPES
extern "C" int tw_c_sample(void* predicts, void* accept_index, void* accept_token_num, void* candidates,
                           void* retrive_index, void* retrive_next_token, void* retrive_next_sibling,
                           void* uniform_samples, void* uniform_samples_for_final_sampling, void* target_probs,
                           void* draft_probs, uint32_t batch_size, uint32_t spec_tokens, uint32_t draft_tokens,
                           uint32_t vocab_size, double threshold_single, double threshold_acc, void* stream) {
  return (int)tw_launch_sample_any((int32_t*)predicts, (int32_t*)accept_index, (int32_t*)accept_token_num,
                                   (int64_t*)candidates, (int64_t*)retrive_index, (int64_t*)retrive_next_token,
                                   (int64_t*)retrive_next_sibling, (float*)uniform_samples,
                                   (float*)uniform_samples_for_final_sampling, (float*)target_probs,
                                   (float*)draft_probs, batch_size, spec_tokens, draft_tokens, vocab_size,
                                   threshold_single, threshold_acc, (cudaStream_t)stream);
}
#endif
"""

CPP_GREEDY = """
void tw_greedy(torch::Tensor predicts, torch::Tensor accept_index, torch::Tensor accept_token_num,
               torch::Tensor candidates, torch::Tensor retrive_index, torch::Tensor retrive_next_token,
               torch::Tensor retrive_next_sibling, torch::Tensor target_predict, int64_t stream);
"""

CPP_SAMPLED = """
void tw_sample(torch::Tensor predicts, torch::Tensor accept_index, torch::Tensor accept_token_num,
               torch::Tensor candidates, torch::Tensor retrive_index, torch::Tensor retrive_next_token,
               torch::Tensor retrive_next_sibling, torch::Tensor uniform_samples,
               torch::Tensor uniform_samples_for_final_sampling, torch::Tensor target_probs,
               torch::Tensor draft_probs, double threshold_single, double threshold_acc, int64_t stream);
"""

# Torch's extension flags define these; SGLang's JIT (and flashinfer's headers) build without.
UNDEF_HALF = ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]


def include_dirs(headers: Path) -> list[str]:
    """SGLang's headers, flashinfer's, and curand's where the toolkit lacks them."""
    dirs = [headers / "sgl", headers / "fi" / "flashinfer" / "data" / "include"]
    from torch.utils.cpp_extension import CUDA_HOME
    toolkit = [Path(CUDA_HOME or "/usr/local/cuda") / p for p in ("include", "targets/x86_64-linux/include")]
    if not any((d / "curand_kernel.h").is_file() for d in toolkit):
        dirs.append(headers / "curand")
    return [str(d) for d in dirs]


def arch_flag() -> str:
    major, minor = torch.cuda.get_device_capability()
    suffix = "a" if major >= 9 else ""  # SGLang's JIT targets the arch-specific variant (sm_90a)
    return f"-gencode=arch=compute_{major}{minor}{suffix},code=sm_{major}{minor}{suffix}"


def cuda_flags() -> list[str]:
    return ["-O3", "-std=c++20", "--expt-relaxed-constexpr", arch_flag(), *UNDEF_HALF]


def build(name: str, cpp: str, cuda: str, function: str, headers: Path, build_root: Path, verbose: bool):
    """torch.utils.cpp_extension.load_inline: the torch wrappers above, compiled with the kernels."""
    from torch.utils.cpp_extension import load_inline
    build_dir = build_root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return load_inline(
        name=name, cpp_sources=cpp, cuda_sources=cuda, functions=[function],
        extra_include_paths=include_dirs(headers), extra_cflags=["-O3", "-std=c++20"],
        extra_cuda_cflags=cuda_flags(), build_directory=str(build_dir), verbose=verbose)


def _check(t: torch.Tensor, dtype, shape, name: str) -> int:
    if not (t.is_cuda and t.dtype == dtype and t.is_contiguous() and tuple(t.shape) == tuple(shape)):
        raise ValueError(f"{name}: want CUDA {dtype} {tuple(shape)} contiguous, got {t.device} {t.dtype} "
                         f"{tuple(t.shape)} contiguous={t.is_contiguous()}")
    return t.data_ptr()


class CtypesKernels:
    """The same launchers built with plain nvcc into a shared library (no torch headers, no
    Python.h), for a machine where load_inline cannot build; the same checks, in Python."""

    def __init__(self, cuda: str, headers: Path, build_root: Path, name: str):
        import ctypes
        import subprocess
        from torch.utils.cpp_extension import CUDA_HOME
        build_dir = build_root / (name + "_ctypes")
        build_dir.mkdir(parents=True, exist_ok=True)
        src, lib = build_dir / "kernels.cu", build_dir / "kernels.so"
        src.write_text(cuda)
        nvcc = str(Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc")
        cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-DTW_NO_TORCH", "-DTW_CTYPES", *cuda_flags(),
               *(f"-I{d}" for d in include_dirs(headers)), str(src), "-o", str(lib)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        self.lib = ctypes.CDLL(str(lib))
        self.lib.tw_c_error.restype = ctypes.c_char_p
        self.c = ctypes

    def _run(self, fn, *args):
        rc = fn(*args)
        if rc:
            raise RuntimeError(f"launch: {self.lib.tw_c_error(rc).decode()}")

    def tw_greedy(self, pred, acc, num, cand, ri, rnt, rns, target, stream):
        c = self.c
        bs, draft = cand.shape
        spec = acc.shape[1]
        ptrs = [_check(t, torch.int64, (bs, draft), "tree tensor") for t in (cand, ri, rnt, rns, target)]
        head = [_check(pred, torch.int32, (bs * draft,), "predicts"),
                _check(acc, torch.int32, (bs, spec), "accept_index"),
                _check(num, torch.int32, (bs,), "accept_token_num")]
        self._run(self.lib.tw_c_greedy, *(c.c_void_p(p) for p in head + ptrs), c.c_uint32(bs), c.c_uint32(spec),
                  c.c_uint32(draft), c.c_void_p(stream))

    def tw_sample(self, pred, acc, num, cand, ri, rnt, rns, coins, final, probs, draft_probs, t_single, t_acc,
                  stream):
        c = self.c
        bs, draft = cand.shape
        spec, vocab = acc.shape[1], probs.shape[2]
        if not (0 <= t_single <= 1 and 0 <= t_acc <= 1):
            raise ValueError("thresholds must lie in [0, 1]")
        ptrs = [_check(pred, torch.int32, (bs * draft,), "predicts"),
                _check(acc, torch.int32, (bs, spec), "accept_index"),
                _check(num, torch.int32, (bs,), "accept_token_num"),
                *(_check(t, torch.int64, (bs, draft), "tree tensor") for t in (cand, ri, rnt, rns)),
                _check(coins, torch.float32, (bs, draft), "uniform_samples"),
                _check(final, torch.float32, (bs,), "uniform_samples_for_final_sampling"),
                _check(probs, torch.float32, (bs, draft, vocab), "target_probs"),
                _check(draft_probs, torch.float32, (bs, draft, vocab), "draft_probs")]
        self._run(self.lib.tw_c_sample, *(c.c_void_p(p) for p in ptrs), c.c_uint32(bs), c.c_uint32(spec),
                  c.c_uint32(draft), c.c_uint32(vocab), c.c_double(t_single), c.c_double(t_acc), c.c_void_p(stream))


# ---- plain torch equivalents of flashinfer's renorm (eagle_sample's top-k / top-p) ----------

def top_k_renorm(probs: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k[row] probabilities (ties at the k-th kept), renormalise."""
    sorted_p, _ = probs.sort(dim=-1, descending=True)
    k = top_k.clamp(1, probs.shape[-1]).long()
    kth = sorted_p.gather(1, (k - 1)[:, None])
    kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def top_p_renorm(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of top probabilities reaching top_p[row], renormalise."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p
    keep_sorted = before < top_p[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


# ---- random cases ----------------------------------------------------------------------------

def tree_links(rng, family, bs, helpers, ours):
    """(next_token, next_sibling [bs, n] int64, spec tokens = accept width)."""
    if family in ("eagle", "edge"):
        _, topk, steps, n = helpers.tree_shape(rng, False)
        rnt, rns = helpers.eagle_links(rng, bs, topk, steps, n, ours)
        return rnt.clone(), rns.clone(), steps + 1
    n = rng.randint(1, 16)
    mask = torch.tensor([helpers.ngram_mask(helpers.random_parents(rng, n)) for _ in range(bs)],
                        dtype=torch.bool).view(-1)
    rnt, rns = torch.zeros(2, bs, n, dtype=I64)
    ours.reconstruct_indices_from_tree_mask(mask, torch.zeros(bs, dtype=I64), torch.zeros(bs * n, dtype=I64),
                                            torch.zeros(bs, n, dtype=I64), rnt, rns, bs, n)
    return rnt.clone(), rns.clone(), n


def make_case(rng, family, helpers, ours, st):
    bs = rng.randint(1, 8)
    rnt, rns, spec = tree_links(rng, family, bs, helpers, ours)
    n = rnt.shape[1]
    parent, depth = st.parents_of(rnt, rns)
    par = parent.tolist()
    vocab = rng.randint(1000, 5000)
    edge = family == "edge"
    # Tokens: a random root, distinct tokens among each node's children.
    tokens = [[0] * n for _ in range(bs)]
    for b in range(bs):
        tokens[b][0] = rng.randrange(vocab)
        kids: dict[int, list[int]] = {}
        for j in range(1, n):
            kids.setdefault(par[b][j], []).append(j)
        for p, js in kids.items():
            for j, tok in zip(js, rng.sample(range(vocab - 1), len(js))):
                tokens[b][j] = tok
            if edge and rng.random() < 0.5:  # the vocabulary's last token drafted (and below: vetoed)
                tokens[b][rng.choice(js)] = vocab - 1
    g = torch.Generator().manual_seed(rng.randrange(2 ** 62))
    logits = torch.randn(bs * n, vocab, generator=g) * rng.uniform(1.0, 3.0)
    for b in range(bs):
        for j in range(1, n):
            boost = rng.uniform(20.0, 26.0) if edge else rng.uniform(0.0, 14.0)
            logits[b * n + par[b][j], tokens[b][j]] += boost
    temps = torch.tensor([rng.uniform(0.3, 1.5) for _ in range(bs)], dtype=F32)
    top_k = top_p = None
    if edge or rng.random() < 0.4:
        top_k = torch.tensor([rng.choice([1, 2, 3]) if edge else rng.choice([1, 2, 5, 20, 50, TOP_K_ALL])
                              for _ in range(bs)], dtype=I64)
    if not edge and rng.random() < 0.4:
        top_p = torch.tensor([rng.choice([rng.uniform(0.5, 1.0), 1.0]) for _ in range(bs)], dtype=F32)
    coin_mode = "max" if edge else rng.choices(["rand", "zero", "max", "mixed"], [0.7, 0.1, 0.1, 0.1])[0]
    coins = torch.rand(bs, n, generator=g)
    final = torch.rand(bs, generator=g)
    if coin_mode in ("zero", "max"):
        value = 0.0 if coin_mode == "zero" else COIN_MAX
        coins.fill_(value)
        final.fill_(value)
    elif coin_mode == "mixed":
        pick = torch.randint(0, 3, (bs, n + 1), generator=g)
        table = torch.stack([torch.cat([coins, final[:, None]], 1), torch.zeros(bs, n + 1),
                             torch.full((bs, n + 1), COIN_MAX)])
        mixed = table.gather(0, pick[None]).squeeze(0)
        coins, final = mixed[:, :n].contiguous(), mixed[:, n].contiguous()
    thresholds = (1.0, 1.0) if rng.random() < 0.8 else (rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
    return dict(bs=bs, n=n, spec=spec, vocab=vocab, family=family, rnt=rnt, rns=rns,
                tokens=torch.tensor(tokens, dtype=I64), parent=parent, depth=depth, logits=logits,
                temps=temps, top_k=top_k, top_p=top_p, coins=coins.contiguous(), final=final.contiguous(),
                coin_mode=coin_mode, thresholds=thresholds)


def path_to(par_row, j):
    path = [j]
    while par_row[path[-1]] >= 0:
        path.append(par_row[path[-1]])
    return path[::-1]


def choose_masks(rng, case, unmasked_paths, st, device):
    """(blocked, forced, veto_mode, chained requests) as patches/spec_verify.py composes them:
    a random pivot queue per forcing request (forced_chain finds the chain), vetoes never on or
    under a forced row, the children of a chain's last node blocked when the pivot goes on."""
    bs, n = case["bs"], case["n"]
    par, tok, dep = case["parent"].tolist(), case["tokens"].tolist(), case["depth"].tolist()
    family = case["family"]
    queue = torch.full((bs, max(n - 1, 0)), -1, dtype=I64)
    queued = [0] * bs
    for b in range(bs):
        if n > 1 and rng.random() < 0.35:
            end = rng.randrange(1, n)
            spelled = [tok[b][j] for j in path_to(par[b], end)[1:]]
            spelled = spelled[: rng.randint(1, len(spelled))]
            if rng.random() < 0.15:  # a queue whose next token was not drafted at all
                spelled = [case["vocab"] - 1 if tok[b][0] != case["vocab"] - 1 else 0] + spelled
            extra = [rng.randrange(case["vocab"]) for _ in range(rng.choice([0, 0, 1, 3]))]
            full = spelled + extra
            head = full[: n - 1]
            queue[b, :len(head)] = torch.tensor(head, dtype=I64)
            queued[b] = len(full)
    parent, depth = case["parent"].to(device), case["depth"].to(device)
    tokens = case["tokens"].to(device)
    forced = st.forced_chain(tokens, parent, depth, queue.to(device)).cpu()
    chained = forced.any(dim=1)
    forced_row = torch.zeros(bs, n, dtype=torch.bool)
    b_idx, j_idx = forced.nonzero(as_tuple=True)
    forced_row[b_idx, case["parent"][b_idx, j_idx]] = True
    under_forced = forced_row.gather(1, case["parent"].clamp(min=0)) & (case["parent"] >= 0)
    end = torch.where(forced, case["depth"], torch.full_like(case["depth"], -1)).argmax(dim=1)
    goes_on = chained & (torch.tensor(queued) > forced.sum(dim=1))
    past_chain = (case["parent"] == end[:, None]) & goes_on[:, None]

    mode = "edge" if family == "edge" else rng.choices(["random", "on_path", "fixed", "none"],
                                                        [0.45, 0.35, 0.1, 0.1])[0]
    vetoed = torch.zeros(bs, n, dtype=torch.bool)
    for b in range(bs):
        if mode in ("random", "edge"):
            q = rng.choice([0.15, 0.4, 0.8])
            for j in range(1, n):
                vetoed[b, j] = rng.random() < q or (mode == "edge" and tok[b][j] == case["vocab"] - 1)
        elif mode == "on_path":
            path = unmasked_paths[rng.choice(sorted(unmasked_paths))][b]
            for j in rng.sample(path[1:], min(len(path) - 1, rng.randint(1, 2))):
                vetoed[b, j] = True
            if len(path) == 1 and n > 1:  # nothing accepted unmasked: veto a random node
                vetoed[b, rng.randrange(1, n)] = True
        elif mode == "fixed" and not bool(chained[b]):
            for j in range(1, n):
                vetoed[b, j] = dep[b][j] == 1
    vetoed &= ~forced & ~under_forced & ~past_chain & (case["parent"] >= 0)
    blocked = vetoed | past_chain
    return blocked, forced, mode, chained


def target_probs(logits, case):
    """eagle_sample: softmax(logits / temperature), then top-k, then top-p renorm."""
    n = case["n"]
    temps = case["temps"].to(logits.device).repeat_interleave(n)[:, None]
    probs = torch.softmax(logits / temps, dim=-1)
    if case["top_k"] is not None:
        probs = top_k_renorm(probs, case["top_k"].to(logits.device).repeat_interleave(n))
    if case["top_p"] is not None:
        probs = top_p_renorm(probs, case["top_p"].to(logits.device).repeat_interleave(n))
    return probs.view(case["bs"], n, -1).contiguous()


def stream_of(device) -> int:
    return torch.cuda.current_stream().cuda_stream if device == "cuda" else 0


def sync(device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def outputs(case, device, noise_seed):
    bs, n, spec = case["bs"], case["n"], case["spec"]
    g = torch.Generator().manual_seed(noise_seed)
    return (torch.randint(-2 ** 30, 2 ** 30, (bs * n,), generator=g, dtype=I32).to(device),
            torch.full((bs, spec), -1, dtype=I32, device=device),
            torch.randint(-2 ** 30, 2 ** 30, (bs,), generator=g, dtype=I32).to(device))


def run_greedy(mod, case, logits, device, noise_seed):
    bs, n = case["bs"], case["n"]
    pred, acc, num = outputs(case, device, noise_seed)
    ri = torch.arange(bs * n, dtype=I64, device=device).view(bs, n)
    target = logits.argmax(dim=-1).view(bs, n).contiguous()
    mod.tw_greedy(pred, acc, num, case["tokens"].to(device), ri, case["rnt"].to(device),
                  case["rns"].to(device), target, stream_of(device))
    sync(device)
    return pred.cpu(), acc.cpu(), num.cpu(), target.cpu()


def run_greedy_cpu(ops, case, target, noise_seed):
    bs, n = case["bs"], case["n"]
    pred, acc, num = outputs(case, "cpu", noise_seed)
    ops.verify_tree_greedy_cpu(pred, acc, num, case["tokens"].clone(), torch.arange(bs * n, dtype=I64).view(bs, n),
                               case["rnt"].clone(), case["rns"].clone(), target.clone())
    return pred, acc, num


def run_sampled(mod, case, logits, device, noise_seed):
    pred, acc, num = outputs(case, device, noise_seed)
    bs, n = case["bs"], case["n"]
    probs = target_probs(logits, case)
    draft_probs = torch.zeros_like(probs)
    ri = torch.arange(bs * n, dtype=I64, device=device).view(bs, n)
    mod.tw_sample(pred, acc, num, case["tokens"].to(device), ri, case["rnt"].to(device), case["rns"].to(device),
                  case["coins"].to(device), case["final"].to(device), probs, draft_probs,
                  case["thresholds"][0], case["thresholds"][1], stream_of(device))
    sync(device)
    return pred.cpu(), acc.cpu(), num.cpu(), probs.view(bs * n, -1).cpu()


def accepted_paths(case, acc, num):
    """Per request: [0, accepted nodes...] (node indices), or None if malformed."""
    n, spec = case["n"], case["spec"]
    out = []
    for b in range(case["bs"]):
        k = int(num[b])
        if not 0 <= k <= spec - 1:
            out.append(None)
            continue
        out.append([int(acc[b, i]) - b * n for i in range(k + 1)])
    return out


# ---- checking --------------------------------------------------------------------------------

PROPS = ["malformed_path", "vetoed_accepted", "bonus_vetoed", "bonus_masked_inf", "forced_not_accepted",
         "greedy_cpu_mismatch"]


def new_row(family, kernel):
    return {"family": family, "kernel": kernel, "cases": 0, "requests": 0, "vetoed_nodes": 0,
            "forced_chains": 0, "forced_nodes": 0, "violations": {p: 0 for p in PROPS},
            "accepted_unmasked": 0, "accepted_masked": 0, "bonus_zero_prob": 0, "bonus_zero_prob_masked": 0,
            "bonus_zero_prob_masked_is_vocab_minus_1": 0,
            "examples": []}


def request_detail(case, b, path, pred, masked_logits, blocked, probs):
    """What a violation needs to be understood: the request's accepted path, the bonus token,
    and the bonus row's drafted children and (sampled) positive support with probabilities."""
    n, par, tok = case["n"], case["parent"][b].tolist(), case["tokens"][b].tolist()
    last = path[-1]
    row = b * n + last
    bonus = int(pred[row])
    detail = {"request": b, "accepted_path": path, "bonus": bonus, "vocab_minus_1": case["vocab"] - 1,
              "bonus_logit_masked": float(masked_logits[row, bonus]) if 0 <= bonus < case["vocab"] else None,
              "children_of_last": [{"node": j, "token": tok[j], "blocked": bool(blocked[b, j]),
                                    "logit_masked": float(masked_logits[row, tok[j]]),
                                    **({"prob": float(probs[row, tok[j]])} if probs is not None else {})}
                                   for j in range(1, n) if par[j] == last]}
    if probs is not None:
        support = (probs[row] > 0).nonzero().flatten()[:16].tolist()
        detail["bonus_prob"] = float(probs[row, bonus]) if 0 <= bonus < case["vocab"] else None
        detail["row_support"] = [[t, float(probs[row, t])] for t in support]
        detail["row_support_size"] = int((probs[row] > 0).sum())
        kids = [c["prob"] for c in detail["children_of_last"]]
        acc32 = torch.tensor(0.0, dtype=F32)
        for q in kids:  # the kernel's running float32 prob_acc over the children, in sibling order
            acc32 = acc32 + torch.tensor(q, dtype=F32)
        detail["children_prob_acc_f32"] = float(acc32)
        detail["coin_at_last"] = float(case["coins"][b, last])
        detail["final_coin"] = float(case["final"][b])
    return detail


def check_masked(row, case, paths, pred, masked_logits, blocked, forced, probs=None, example=None):
    """Properties (1)-(3) for one masked run; returns the violation names seen."""
    n = case["n"]
    par, tok = case["parent"].tolist(), case["tokens"].tolist()
    seen, details = [], []
    for b in range(case["bs"]):
        path = paths[b]
        if path is None or path[0] != 0 or any(par[b][path[i]] != path[i - 1] for i in range(1, len(path))):
            seen.append("malformed_path")
            continue
        here = []
        if any(bool(blocked[b, j]) for j in path[1:]):
            here.append("vetoed_accepted")
        last = path[-1]
        bonus = int(pred[b * n + last])
        vetoed_here = {tok[b][j] for j in range(1, n) if par[b][j] == last and bool(blocked[b, j])}
        if bonus in vetoed_here:
            here.append("bonus_vetoed")
        if not 0 <= bonus < case["vocab"] or math.isinf(float(masked_logits[b * n + last, bonus])):
            here.append("bonus_masked_inf")
        if probs is not None and 0 <= bonus < case["vocab"] and float(probs[b * n + last, bonus]) == 0.0:
            row["bonus_zero_prob_masked"] += 1
            row["bonus_zero_prob_masked_is_vocab_minus_1"] += int(bonus == case["vocab"] - 1)
        chain = sorted((j for j in range(n) if bool(forced[b, j])), key=lambda j: case["depth"][b, j].item())
        if chain and len(chain) <= case["spec"] - 1 and path[1:len(chain) + 1] != chain:
            here.append("forced_not_accepted")
        row["accepted_masked"] += len(path) - 1
        if here:
            details.append({"violations": here, **request_detail(case, b, path, pred, masked_logits, blocked, probs)})
        seen += here
    for s in seen:
        row["violations"][s] += 1
    if seen and example is not None and len(row["examples"]) < 6:
        row["examples"].append({**example, "violations": sorted(set(seen)), "requests": details})
    return seen


def describe(case, blocked, forced, mode):
    small = lambda t: t.tolist() if t.numel() <= 256 else "..."  # noqa: E731
    return {"bs": case["bs"], "n": case["n"], "spec": case["spec"], "vocab": case["vocab"],
            "family": case["family"], "veto_mode": mode, "coin_mode": case["coin_mode"],
            "thresholds": case["thresholds"], "parent": small(case["parent"]), "tokens": small(case["tokens"]),
            "blocked": small(blocked), "forced": small(forced),
            "top_k": None if case["top_k"] is None else case["top_k"].tolist(),
            "top_p": None if case["top_p"] is None else case["top_p"].tolist(),
            "coins": small(case["coins"]), "final": case["final"].tolist()}


def run_case(i, rng, family, kernels, ops, st, helpers, rows, device):
    case = make_case(rng, family, helpers, ops, st)
    bs, n = case["bs"], case["n"]
    logits = case["logits"].to(device)
    seed = rng.randrange(2 ** 31)
    paths_unmasked, results = {}, {}
    # Unmasked runs: statistics, and the nodes an "on_path" veto aims at.
    if "greedy" in kernels:
        pred, acc, num, target = run_greedy(kernels["greedy"], case, logits, device, seed)
        results["greedy"] = (pred, acc, num, target, run_greedy_cpu(ops, case, target, seed))
        paths_unmasked["greedy"] = accepted_paths(case, acc, num)
    if "sampled" in kernels:
        pred, acc, num, probs = run_sampled(kernels["sampled"], case, logits, device, seed)
        results["sampled"] = (pred, acc, num, probs)
        paths_unmasked["sampled"] = accepted_paths(case, acc, num)
    rows_here = {}
    for kernel in kernels:
        row = rows_here[kernel] = rows.setdefault((family, kernel), new_row(family, kernel))
        row["cases"] += 1
        row["requests"] += bs
    malformed = {k: sum(p is None for p in paths) for k, paths in paths_unmasked.items()}
    if any(malformed.values()):  # a kernel wrote an impossible accept_num: nothing to build on
        for kernel, count in malformed.items():
            rows_here[kernel]["violations"]["malformed_path"] += count
        return
    blocked, forced, mode, _ = choose_masks(rng, case, paths_unmasked, st, device)
    masked = logits.clone()
    dev_parent, dev_tokens = case["parent"].to(device), case["tokens"].to(device)
    st.mask_in_parent_rows(masked, dev_parent, dev_tokens, blocked.to(device))
    st.force_in_parent_rows(masked, dev_parent, dev_tokens, forced.to(device))
    masked_cpu = masked.cpu()
    for kernel, row in rows_here.items():
        unmasked, paths = results[kernel], paths_unmasked[kernel]
        row["accepted_unmasked"] += sum(len(p) - 1 for p in paths)
        row["vetoed_nodes"] += int(blocked.sum())
        row["forced_chains"] += int(forced.any(dim=1).sum())
        row["forced_nodes"] += int(forced.sum())
        example = {"case": i, "kernel": kernel, **describe(case, blocked, forced, mode)}
        if kernel == "greedy":
            pred, acc, num, target = run_greedy(kernels["greedy"], case, masked, device, seed)
            cpu = run_greedy_cpu(ops, case, target, seed)
            for ours, theirs in ((unmasked[4], unmasked[:3]), (cpu, (pred, acc, num))):
                if not all(torch.equal(a, b) for a, b in zip(ours, theirs)):
                    row["violations"]["greedy_cpu_mismatch"] += 1
                    if len(row["examples"]) < 4:
                        row["examples"].append({**example, "violations": ["greedy_cpu_mismatch"],
                                                "cpu": [t.tolist() for t in ours],
                                                "cuda": [t.tolist() for t in theirs]})
            check_masked(row, case, accepted_paths(case, acc, num), pred, masked_cpu, blocked, forced,
                         example=example)
        else:
            probs = unmasked[3]
            for b, p in enumerate(paths):
                bonus = int(unmasked[0][b * n + p[-1]])
                row["bonus_zero_prob"] += int(not 0 <= bonus < case["vocab"]
                                              or float(probs[b * n + p[-1], bonus]) == 0.0)
            pred, acc, num, probs = run_sampled(kernels["sampled"], case, masked, device, seed)
            paths_masked = accepted_paths(case, acc, num)
            check_masked(row, case, paths_masked, pred, masked_cpu, blocked, forced, probs=probs, example=example)
            # What the plugin commits from that draw (patches/spec_verify.py _no_masked_bonus).
            kept = rows.setdefault((family, "sampled+commit"), new_row(family, "sampled+commit"))
            for key in ("cases", "requests"):
                kept[key] += 1 if key == "cases" else bs
            kept["vetoed_nodes"] += int(blocked.sum())
            kept["forced_chains"] += int(forced.any(dim=1).sum())
            committed = commit_bonus(st, case, logits, blocked, paths_masked, pred, device)
            check_masked(kept, case, paths_masked, committed, masked_cpu, blocked, forced, probs=probs,
                         example={**example, "kernel": "sampled+commit"})


def commit_bonus(st, case, logits, blocked, paths, pred, device):
    """Each request's bonus as patches/spec_verify.py commits it: verify's draw, or, where
    that is a token the vetoes masked (-inf), the row's best finite token
    (spec_tree.unmask_drawn, run with the veto masks on and the forced rows put back)."""
    n = case["n"]
    vetoed = logits.clone()
    st.mask_in_parent_rows(vetoed, case["parent"].to(device), case["tokens"].to(device), blocked.to(device))
    out = pred.to(device).clone()
    rows = torch.tensor([b * n + q[-1] for b, q in enumerate(paths) if q is not None], dtype=torch.long,
                        device=device)
    if rows.numel():
        drawn = out[rows]
        st.unmask_drawn(vetoed, rows, drawn)
        out[rows] = drawn
    return out.cpu()


# ---- a CPU stand-in for both kernels, to exercise this harness without a GPU ----------------

class CpuGreedy:
    """--cpu-dry-run: the CPU stand-in in place of VerifyTreeGreedy."""

    def __init__(self, ops):
        self.ops = ops

    def tw_greedy(self, *tensors_and_stream):
        self.ops.verify_tree_greedy_cpu(*tensors_and_stream[:8])


class CpuSampled:
    """--cpu-dry-run: TreeSpeculativeSamplingTargetOnly transcribed to Python (sequential
    sums, so float rounding may differ from the CUDA block reductions)."""

    @staticmethod
    def tw_sample(pred, acc, num, cand, ri, rnt, rns, coins, final, probs, draft, t_single, t_acc, _stream):
        bs, n = cand.shape
        spec, vocab = acc.shape[1], probs.shape[2]
        t_acc = max(t_acc, 1e-9)
        for b in range(bs):
            prob_acc, node, coin = 0.0, 0, float(coins[b, 0])
            last = int(ri[b, 0])
            acc[b, 0] = last
            k, cur = 0, 0
            for _ in range(1, spec):
                cur = int(rnt[b, cur])
                while cur != -1:
                    tok = int(cand[b, cur])
                    p = float(probs[b, node, tok])
                    prob_acc += p
                    if p > 0 and (coin < prob_acc / t_acc or p >= t_single):
                        prob_acc, node, coin = 0.0, cur, float(coins[b, cur])
                        pred[last] = tok
                        k += 1
                        acc[b, k] = int(ri[b, cur])
                        last = int(ri[b, cur])
                        break
                    draft[b, node, tok] = probs[b, node, tok]
                    cur = int(rns[b, cur])
                if cur == -1:
                    break
            num[b] = k
            q = probs[b, node]
            p = draft[b, node] if k != spec - 1 else torch.zeros_like(q)
            relu = (q - p).clamp(min=0)
            u = float(final[b]) * float(relu.sum())
            hits = ((relu.cumsum(0) > u) & (relu > 0)).nonzero()
            valid = (relu > 0).nonzero()
            pred[last] = int(hits[0]) if len(hits) else int(valid[-1]) if len(valid) else vocab - 1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--cases", type=int, default=600, help="random batches per tree family")
    parser.add_argument("--edge-cases", type=int, default=300, help="batches of the edge family")
    parser.add_argument("--max-seconds", type=float, default=150.0,
                        help="stop drawing cases after this long (all families share it)")
    parser.add_argument("--budget-seconds", type=float, default=float("inf"),
                        help="stop drawing cases once this long has passed since start (builds included)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--headers", type=Path, default=REPO / ".gpu", help="sgl/, fi/, curand/ header folders")
    parser.add_argument("--build-dir", type=Path, default=Path("/tmp/tokenwise_spec_verify_build"))
    parser.add_argument("--verbose-build", action="store_true")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="no GPU: Python stand-ins for both kernels, to exercise the harness only")
    args = parser.parse_args(argv)
    began = time.monotonic()

    st = load_by_path("tokenwise_spec_tree", SPEC_TREE)
    ops = load_by_path("tokenwise_spec_ops", SPEC_OPS)
    helpers = load_by_path("tokenwise_spec_kernels_bench", SPEC_KERNELS_BENCH)
    kernels, errors, build_s = {}, {}, {}
    if args.cpu_dry_run:
        device = "cpu"
        kernels = {"greedy": CpuGreedy(ops), "sampled": CpuSampled()}
    elif not torch.cuda.is_available():
        print("no CUDA device: this check needs one (--cpu-dry-run exercises the harness)", file=sys.stderr)
        return 2
    else:
        device = "cuda"
    how = {}
    for kernel, name, cpp, cuda, fn in () if args.cpu_dry_run else (
            ("greedy", "tw_sgl0523_verify_tree_greedy", CPP_GREEDY, CUDA_GREEDY, "tw_greedy"),
            ("sampled", "tw_sgl0523_tree_spec_sampling", CPP_SAMPLED, CUDA_SAMPLED, "tw_sample")):
        start = time.monotonic()
        try:
            kernels[kernel], how[kernel] = build(name, cpp, cuda, fn, args.headers, args.build_dir,
                                                 args.verbose_build), "load_inline"
        except Exception:  # noqa: BLE001 - fall back to plain nvcc + ctypes, and say so
            errors[f"{kernel} load_inline"] = traceback.format_exc(limit=4)[-6000:]
            print(f"build {kernel}: load_inline failed, trying nvcc + ctypes", flush=True)
            try:
                kernels[kernel], how[kernel] = CtypesKernels(cuda, args.headers, args.build_dir, name), "nvcc+ctypes"
            except Exception:  # noqa: BLE001
                errors[f"{kernel} nvcc+ctypes"] = traceback.format_exc(limit=4)[-6000:]
        build_s[kernel] = round(time.monotonic() - start, 1)
        print(f"build {kernel}: {how.get(kernel, 'FAILED')} ({build_s[kernel]}s)", flush=True)

    rows: dict = {}
    rng = random.Random(args.seed)
    start = time.monotonic()
    stopped_early, batches = False, 0
    plan = [("eagle", args.cases), ("ngram", args.cases), ("edge", args.edge_cases)]
    # Interleave the families so a time limit cuts all of them alike.
    schedule = [f for i in range(max(c for _, c in plan)) for f, c in plan if i < c]
    if kernels:
        for i, family in enumerate(schedule):
            now = time.monotonic()
            if now - start > args.max_seconds or now - began > args.budget_seconds:
                stopped_early = True
                break
            try:
                run_case(i, rng, family, kernels, ops, st, helpers, rows, device)
                batches += 1
            except Exception:  # noqa: BLE001 - a launch failure: stop, report
                errors[f"case {i} ({family})"] = traceback.format_exc(limit=6)[-6000:]
                break
    seconds = round(time.monotonic() - start, 1)

    header = (f"{'family':7s} {'kernel':14s} {'cases':>6s} {'reqs':>6s} {'vetoed':>7s} {'chains':>6s} "
              + " ".join(f"{p:>11.11s}" for p in PROPS) + f" {'acc_unmask':>10s} {'acc_mask':>9s} {'zero_p':>7s}")
    print("\n" + header)
    for r in rows.values():
        reqs = max(r["requests"], 1)
        r["mean_accept_unmasked"] = round(r["accepted_unmasked"] / reqs, 4)
        r["mean_accept_masked"] = round(r["accepted_masked"] / reqs, 4)
        print(f"{r['family']:7s} {r['kernel']:14s} {r['cases']:6d} {r['requests']:6d} {r['vetoed_nodes']:7d} "
              f"{r['forced_chains']:6d} " + " ".join(f"{r['violations'][p]:11d}" for p in PROPS)
              + f" {r['mean_accept_unmasked']:10.3f} {r['mean_accept_masked']:9.3f}"
              + f" {r['bonus_zero_prob']}/{r['bonus_zero_prob_masked']}"
              + f" (V-1: {r['bonus_zero_prob_masked_is_vocab_minus_1']})")
    # The raw sampled row's bonus is SGLang's draw before the plugin commits it: its
    # "sampled+commit" row holds what the client can get; the raw one is information.
    raw_bonus = lambda r, p: r["kernel"] == "sampled" and p.startswith("bonus_")  # noqa: E731
    total_viol = {p: sum(r["violations"][p] for r in rows.values() if not raw_bonus(r, p)) for p in PROPS}
    for k, e in errors.items():
        print(f"\n{k} could not build/run:\n{e}", file=sys.stderr)
    headers = args.headers
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run: Python stand-ins)",
        "capability": list(torch.cuda.get_device_capability()) if device == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "sglang_sources": (headers / "sgl" / "VERSION").read_text().strip()
        if (headers / "sgl" / "VERSION").is_file() else "unknown",
        "flashinfer_headers": (headers / "fi" / "VERSION").read_text().strip()
        if (headers / "fi" / "VERSION").is_file() else "unknown",
        "source_sha256": {
            "sgl_kernel/speculative/sampling.cuh": sha256(headers / "sgl/sgl_kernel/speculative/sampling.cuh"),
            "sgl_kernel/speculative/eagle.cuh": sha256(headers / "sgl/sgl_kernel/speculative/eagle.cuh"),
            "flashinfer/sampling.cuh": sha256(headers / "fi" / "flashinfer" / "data" / "include" / "flashinfer"
                                              / "sampling.cuh"),
            "plugin/spec_tree.py": sha256(SPEC_TREE), "spec_ops.py": sha256(SPEC_OPS)},
        "include_dirs": include_dirs(headers) if device == "cuda" else None, "build_seconds": build_s,
        "built_with": how, "seed": args.seed,
        "seconds": seconds, "stopped_early_by_time": stopped_early,
        "cases_requested": {f: c for f, c in plan},
        "cases_run": batches, "dry_run_on_cpu": args.cpu_dry_run,
        "violations": total_viol, "errors": errors,
        "ok": len(kernels) == 2 and not any(total_viol.values())
        and all(k.endswith("load_inline") and k.split()[0] in kernels for k in errors),
        "notes": ["accept lengths are accepted drafts per request (bonus token not counted)",
                  "the 'sampled' rows' bonus_* columns are the kernel's draw before the plugin's commit "
                  "(information, not counted in 'violations'); 'sampled+commit' rows hold the committed bonus "
                  "(patches/spec_verify.py replaces a drawn -inf token by its row's best finite one)",
                  "zero_p column: bonus tokens with zero target probability, unmasked/masked (sampled kernel "
                  "fallback sampled_id = vocab-1 when nothing is left to sample), information only",
                  "bonus_zero_prob_masked_is_vocab_minus_1: of the masked zero-probability bonus tokens, how many "
                  "were vocab-1 (the kernel's fallback id)"],
        "rows": list(rows.values()),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['cases_run']} batches in {seconds}s (stopped by time: {stopped_early}); "
          f"violations: {total_viol}; errors: {sorted(errors)}")
    if any(total_viol.values()):
        return 1
    unrescued = [k for k in errors if not k.endswith("load_inline") or k.split()[0] not in kernels]
    return 2 if unrescued or len(kernels) < 2 else 0


if __name__ == "__main__":
    sys.exit(main())

"""The torch_native draft attention (patches/cpu_draft_attention.py), without a server.

A real KV pool (SGLang's MHATokenToKVPool, noise everywhere so a wrong slot shows) and a
req_to_token table with scattered slots; the draft-slot layout comes from SGLang's own
helpers, as in eagle_worker_common.prepare_for_draft (assign_draft_cache_locs_contiguous_func,
whose CPU branch is sgl_kernel's assign_draft_cache_locs_contiguous_cpu: called directly here,
since this process is not SGLang's CPU engine) and EagleDraftWorker.draft_forward
(per_step_draft_out_cache_loc). Every backend output
is checked against attention written out by hand (softmax(q k^T * scale) v, GQA by
repeating K/V heads) over the keys the step should see, taken from a per-request list of
the K/V of each position rather than from the pool.
"""
from __future__ import annotations

import pkgutil
import types

import pytest
import torch

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.speculative import draft_utils
from sglang.srt.speculative.draft_utils import DraftBackendFactory
from sglang.srt.speculative.eagle_utils import per_step_draft_out_cache_loc

from sgl_kernel import assign_draft_cache_locs_contiguous_cpu
from tokenwise_safety.patches import cpu_draft_attention as cda
from tokenwise_safety.patches import cpu_verify_attention

HQ, HKV, DIM = 4, 2, 8  # GQA: two query heads per KV head
POOL_SIZE, MAX_REQS, CTX = 2048, 8, 128


def make_runner(seed: int, page_size: int = 1):
    g = torch.Generator().manual_seed(seed)
    pool = MHATokenToKVPool(POOL_SIZE, 1, torch.float32, HKV, DIM, 1, "cpu", False)
    for buf in (pool.get_key_buffer(0), pool.get_value_buffer(0)):
        buf.copy_(torch.randn(buf.shape, generator=g))
    # Every (request, position) gets its own slot, scattered over the pool (slot 0 is padding).
    slots = torch.randperm(POOL_SIZE, generator=g)[: MAX_REQS * CTX] + 1
    config = types.SimpleNamespace()
    return types.SimpleNamespace(
        device="cpu", page_size=page_size, draft_attention_backend=None,
        req_to_token_pool=types.SimpleNamespace(req_to_token=slots.view(MAX_REQS, CTX).to(torch.int32)),
        token_to_kv_pool=pool,
        model_config=types.SimpleNamespace(hf_config=config, hf_text_config=config))


def make_layer(sliding_window_size: int = -1):
    return types.SimpleNamespace(
        layer_id=0, tp_q_head_num=HQ, tp_k_head_num=HKV, qk_head_dim=DIM, v_head_dim=DIM,
        scaling=DIM ** -0.5, is_cross_attention=False, sliding_window_size=sliding_window_size,
        attn_type=AttentionType.DECODER, logit_cap=0.0, k_scale=None, v_scale=None,
        k_scale_float=None, v_scale_float=None)


def attend(q, keys, values, scale):
    """q [HQ, DIM] over keys/values [n, HKV, DIM] -> [HQ, DIM], written out."""
    rep = HQ // HKV
    k = keys.repeat_interleave(rep, dim=1).transpose(0, 1)  # [HQ, n, DIM]
    v = values.repeat_interleave(rep, dim=1).transpose(0, 1)
    w = torch.softmax(torch.einsum("hd,hnd->hn", q, k) * scale, dim=-1)
    return torch.einsum("hn,hnd->hd", w, v)


def prefix_kv(runner, pool_idx: int, n: int):
    """Per-position K/V of a request's committed prefix, read once from the pool."""
    slots = runner.req_to_token_pool.req_to_token[pool_idx, :n].long()
    pool = runner.token_to_kv_pool
    return list(pool.get_key_buffer(0)[slots].clone()), list(pool.get_value_buffer(0)[slots].clone())


def rand_qkv(g, rows):
    # As RadixAttention.forward hands them to the backend: q flat, k/v [rows, heads, dim].
    return (torch.randn(rows, HQ * DIM, generator=g), torch.randn(rows, HKV, DIM, generator=g),
            torch.randn(rows, HKV, DIM, generator=g))


def make_factory(runner, topk, num_steps):
    return DraftBackendFactory(runner, topk, num_steps)


def refuse(*_args, **_kwargs):
    raise AssertionError("fell through to SGLang's factory")


@pytest.fixture
def torch_native(monkeypatch):
    """The configured (prefill, decode) backends, as the CPU engine without AMX resolves them."""
    monkeypatch.setattr(draft_utils, "attention_backends", lambda: ("torch_native", "torch_native"))
    monkeypatch.setattr(draft_utils, "get_spec",
                        lambda: types.SimpleNamespace(speculative_attention_mode="prefill"))


def assign_draft_locs(runner, pool_indices, seq_lens, out_cache_loc, topk, num_steps):
    # assign_draft_cache_locs_contiguous_func's CPU branch, verbatim.
    req_to_token = runner.req_to_token_pool.req_to_token
    assign_draft_cache_locs_contiguous_cpu(pool_indices, req_to_token, seq_lens, out_cache_loc,
                                           req_to_token.shape[1], topk, num_steps)


def decode_batch(runner, g, bs, topk, num_steps):
    pool_indices = torch.randperm(MAX_REQS, generator=g)[:bs].to(torch.int64)
    seq_lens = torch.randint(3, CTX - topk * num_steps - 8, (bs,), generator=g).to(torch.int64)
    out_cache_loc = torch.empty(bs * topk * num_steps, dtype=torch.int64)
    assign_draft_locs(runner, pool_indices, seq_lens, out_cache_loc, topk, num_steps)
    return types.SimpleNamespace(
        forward_mode=ForwardMode.DECODE, batch_size=bs, seq_lens=seq_lens,
        req_pool_indices=pool_indices, out_cache_loc=out_cache_loc, encoder_lens=None)


def run_draft_decode(runner, backend, fb, topk, num_steps, g, layer):
    """EagleDraftWorker.draft_forward's loop: plan once, then step i writes out_cache_loc[i]
    and runs under attn_backends[i]. Returns per-step (q, k, v, out)."""
    backend.init_forward_metadata(fb)
    step_locs = per_step_draft_out_cache_loc(fb.out_cache_loc, fb.batch_size, topk, num_steps)
    steps = []
    for i in range(num_steps - 1):
        fb.out_cache_loc = step_locs[i]
        q, k, v = rand_qkv(g, fb.batch_size * topk)
        out = backend.attn_backends[i].forward(q, k, v, layer, fb)
        steps.append((q, k, v, out))
        # The step's K/V landed in its reserved slots.
        pool = runner.token_to_kv_pool
        assert torch.equal(pool.get_key_buffer(0)[step_locs[i]], k)
        assert torch.equal(pool.get_value_buffer(0)[step_locs[i]], v)
    return steps


@pytest.mark.parametrize("seed", range(4))
def test_chain_draft_step_is_causal_attention_over_prefix_and_earlier_drafts(seed, torch_native):
    g = torch.Generator().manual_seed(100 + seed)
    runner, layer = make_runner(seed), make_layer()
    bs, num_steps = 1 + seed, 2 + seed  # num_steps 2..5: 1..4 step backends
    backend = cda.around_create_decode_backend(refuse, make_factory(runner, 1, num_steps))
    assert isinstance(backend, cda.TorchNativeMultiStepDraftBackend)
    assert len(backend.attn_backends) == num_steps - 1
    fb = decode_batch(runner, g, bs, 1, num_steps)
    prefixes = [prefix_kv(runner, int(r), int(n)) for r, n in zip(fb.req_pool_indices, fb.seq_lens)]
    steps = run_draft_decode(runner, backend, fb, 1, num_steps, g, layer)
    for i, (q, k, v, out) in enumerate(steps):
        for b in range(bs):
            keys = torch.stack(prefixes[b][0] + [s[1][b].view(HKV, DIM) for s in steps[: i + 1]])
            values = torch.stack(prefixes[b][1] + [s[2][b].view(HKV, DIM) for s in steps[: i + 1]])
            want = attend(q[b].view(HQ, DIM), keys, values, layer.scaling)
            torch.testing.assert_close(out[b].view(HQ, DIM), want, rtol=1e-5, atol=1e-5)


def test_chain_draft_step_honours_the_sliding_window(torch_native):
    g = torch.Generator().manual_seed(7)
    window = 5
    runner, layer = make_runner(7), make_layer(sliding_window_size=window)
    backend = cda.around_create_decode_backend(refuse, make_factory(runner, 1, 4))
    fb = decode_batch(runner, g, 3, 1, 4)
    prefixes = [prefix_kv(runner, int(r), int(n)) for r, n in zip(fb.req_pool_indices, fb.seq_lens)]
    steps = run_draft_decode(runner, backend, fb, 1, 4, g, layer)
    for i, (q, _, _, out) in enumerate(steps):
        for b in range(3):
            keys = prefixes[b][0] + [s[1][b].view(HKV, DIM) for s in steps[: i + 1]]
            values = prefixes[b][1] + [s[2][b].view(HKV, DIM) for s in steps[: i + 1]]
            # SGLang's torch_native window: keys at positions >= query position - window.
            lo = max(0, len(keys) - 1 - window)
            want = attend(q[b].view(HQ, DIM), torch.stack(keys[lo:]), torch.stack(values[lo:]), layer.scaling)
            torch.testing.assert_close(out[b].view(HQ, DIM), want, rtol=1e-5, atol=1e-5)


def test_draft_decode_table_follows_the_triton_kv_index_formula():
    g = torch.Generator().manual_seed(3)
    req_to_token = torch.randint(0, 10_000, (MAX_REQS, CTX), generator=g, dtype=torch.int32)
    for topk, num_steps in ((1, 4), (2, 3), (4, 5)):
        pool_indices = torch.randperm(MAX_REQS, generator=g)[:3]
        seq_lens = torch.randint(1, 40, (3,), generator=g)
        table = cda.draft_decode_table(req_to_token, pool_indices, seq_lens, topk, num_steps)
        for b in range(3):
            r, n = int(pool_indices[b]), int(seq_lens[b])
            for t in range(topk):
                row = table[b * topk + t]
                # generate_draft_decode_kv_indices (page_size 1): prefix, then seq_len + t * num_steps + s.
                assert torch.equal(row[:n], req_to_token[r, :n])
                assert torch.equal(row[n:n + num_steps], req_to_token[r, n + t * num_steps:n + (t + 1) * num_steps])


@pytest.mark.parametrize("seed", range(2))
def test_tree_draft_rows_see_the_prefix_and_their_own_branch(seed, torch_native):
    g = torch.Generator().manual_seed(200 + seed)
    topk, num_steps, bs = 3, 4, 2
    runner, layer = make_runner(10 + seed), make_layer()
    backend = cda.around_create_decode_backend(refuse, make_factory(runner, topk, num_steps))
    fb = decode_batch(runner, g, bs, topk, num_steps)
    prefixes = [prefix_kv(runner, int(r), int(n)) for r, n in zip(fb.req_pool_indices, fb.seq_lens)]
    steps = run_draft_decode(runner, backend, fb, topk, num_steps, g, layer)
    for i, (q, _, _, out) in enumerate(steps):
        for b in range(bs):
            for t in range(topk):
                row = b * topk + t
                keys = torch.stack(prefixes[b][0] + [s[1][row].view(HKV, DIM) for s in steps[: i + 1]])
                values = torch.stack(prefixes[b][1] + [s[2][row].view(HKV, DIM) for s in steps[: i + 1]])
                want = attend(q[row].view(HQ, DIM), keys, values, layer.scaling)
                torch.testing.assert_close(out[row].view(HQ, DIM), want, rtol=1e-5, atol=1e-5)


def draft_extend_batch(runner, pool_indices, seq_lens, d):
    """prepare_for_draft_extend's DRAFT_EXTEND_V2 batch: prefix = seq_lens, d tokens per
    request written to the verify window req_to_token[r, seq_lens:seq_lens + d]."""
    rows = runner.req_to_token_pool.req_to_token
    out_cache_loc = torch.cat([rows[int(r), int(n):int(n) + d] for r, n in zip(pool_indices, seq_lens)]).long()
    return types.SimpleNamespace(
        forward_mode=ForwardMode.DRAFT_EXTEND_V2, batch_size=len(seq_lens), seq_lens=seq_lens + d,
        extend_prefix_lens=seq_lens.to(torch.int32),
        extend_seq_lens=torch.full((len(seq_lens),), d, dtype=torch.int32),
        req_pool_indices=pool_indices, out_cache_loc=out_cache_loc, encoder_lens=None)


@pytest.mark.parametrize("seed", range(3))
def test_draft_extend_is_causal_over_prefix_and_window(seed, torch_native):
    g = torch.Generator().manual_seed(300 + seed)
    runner, layer = make_runner(20 + seed), make_layer()
    backend = cda.around_create_draft_extend_backend(refuse, make_factory(runner, 1, 3))
    assert type(backend) is TorchNativeAttnBackend
    assert backend.prefill_attention_backend_str == backend.decode_attention_backend_str == "torch_native"
    d, bs = 4, 2 + seed
    pool_indices = torch.randperm(MAX_REQS, generator=g)[:bs].to(torch.int64)
    seq_lens = torch.randint(1, CTX - d - 1, (bs,), generator=g).to(torch.int64)
    prefixes = [prefix_kv(runner, int(r), int(n)) for r, n in zip(pool_indices, seq_lens)]
    fb = draft_extend_batch(runner, pool_indices, seq_lens, d)
    backend.init_forward_metadata(fb)
    q, k, v = rand_qkv(g, bs * d)
    # Through the verify seam, as on a server: it must leave DRAFT_EXTEND_V2 to SGLang.
    out = cpu_verify_attention.around_forward_extend(TorchNativeAttnBackend.forward_extend, backend, q, k, v, layer, fb)
    for b in range(bs):
        for j in range(d):
            keys = torch.stack(prefixes[b][0] + [k[b * d + s].view(HKV, DIM) for s in range(j + 1)])
            values = torch.stack(prefixes[b][1] + [v[b * d + s].view(HKV, DIM) for s in range(j + 1)])
            want = attend(q[b * d + j].view(HQ, DIM), keys, values, layer.scaling)
            torch.testing.assert_close(out[b * d + j].view(HQ, DIM), want, rtol=1e-5, atol=1e-5)


def test_a_round_draft_extend_then_draft_decode_reads_what_extend_wrote(torch_native):
    """One STANDALONE round in miniature: draft extend over the verify window, accept_len of
    it committed (seq_lens += accept_len), then the next draft's steps see exactly the prefix
    plus the accepted rows (the rest of the window is overwritten by the draft)."""
    g = torch.Generator().manual_seed(42)
    runner, layer = make_runner(42), make_layer()
    num_steps, d, bs = 3, 4, 3
    factory = make_factory(runner, 1, num_steps)
    extend = cda.around_create_draft_extend_backend(refuse, factory)
    decode = cda.around_create_decode_backend(refuse, factory)
    pool_indices = torch.randperm(MAX_REQS, generator=g)[:bs].to(torch.int64)
    seq_lens = torch.randint(2, 60, (bs,), generator=g).to(torch.int64)
    history = [prefix_kv(runner, int(r), int(n)) for r, n in zip(pool_indices, seq_lens)]
    fb = draft_extend_batch(runner, pool_indices, seq_lens, d)
    extend.init_forward_metadata(fb)
    _, k, v = rand_qkv(g, bs * d)
    extend.forward(rand_qkv(g, bs * d)[0], k, v, layer, fb)
    accept = torch.tensor([1, d, 2])
    for b in range(bs):
        history[b][0].extend(k[b * d + s].view(HKV, DIM) for s in range(int(accept[b])))
        history[b][1].extend(v[b * d + s].view(HKV, DIM) for s in range(int(accept[b])))
    new_lens = seq_lens + accept
    out_cache_loc = torch.empty(bs * num_steps, dtype=torch.int64)
    assign_draft_locs(runner, pool_indices, new_lens, out_cache_loc, 1, num_steps)
    dfb = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=bs, seq_lens=new_lens,
                                req_pool_indices=pool_indices, out_cache_loc=out_cache_loc, encoder_lens=None)
    steps = run_draft_decode(runner, decode, dfb, 1, num_steps, g, layer)
    for i, (q, _, _, out) in enumerate(steps):
        for b in range(bs):
            keys = torch.stack(history[b][0] + [s[1][b].view(HKV, DIM) for s in steps[: i + 1]])
            values = torch.stack(history[b][1] + [s[2][b].view(HKV, DIM) for s in steps[: i + 1]])
            torch.testing.assert_close(out[b].view(HQ, DIM), attend(q[b].view(HQ, DIM), keys, values, layer.scaling),
                                       rtol=1e-5, atol=1e-5)


def test_sglang_alone_refuses_torch_native(torch_native):
    """The failure these hooks fill, unchanged in the pinned SGLang."""
    runner = make_runner(0)
    with pytest.raises(ValueError, match="decode attention backend torch_native"):
        make_factory(runner, 1, 3).create_decode_backend()
    with pytest.raises(ValueError, match="attention backend torch_native"):
        make_factory(runner, 1, 3).create_draft_extend_backend()


def test_other_backends_and_single_step_fall_through(monkeypatch):
    runner = make_runner(0)
    calls = []

    def original(factory, *args, **kwargs):
        calls.append(factory)
        return "sglang's"

    monkeypatch.setattr(draft_utils, "get_spec", lambda: types.SimpleNamespace(speculative_attention_mode="prefill"))
    monkeypatch.setattr(draft_utils, "attention_backends", lambda: ("triton", "triton"))
    assert cda.around_create_decode_backend(original, make_factory(runner, 1, 3)) == "sglang's"
    assert cda.around_create_draft_extend_backend(original, make_factory(runner, 1, 3)) == "sglang's"
    monkeypatch.setattr(draft_utils, "attention_backends", lambda: ("torch_native", "torch_native"))
    assert cda.around_create_decode_backend(original, make_factory(runner, 1, 1)) == "sglang's"  # None upstream
    assert len(calls) == 3


def test_backend_choice_follows_sglangs_resolution(monkeypatch):
    runner = make_runner(0)
    mode = types.SimpleNamespace(speculative_attention_mode="prefill")
    monkeypatch.setattr(draft_utils, "get_spec", lambda: mode)
    monkeypatch.setattr(draft_utils, "attention_backends", lambda: ("triton", "torch_native"))
    # Draft extend reads the prefill backend unless --speculative-attention-mode decode.
    assert cda.around_create_draft_extend_backend(lambda f: "sglang's", make_factory(runner, 1, 3)) == "sglang's"
    mode.speculative_attention_mode = "decode"
    assert isinstance(cda.around_create_draft_extend_backend(refuse, make_factory(runner, 1, 3)), TorchNativeAttnBackend)
    # The draft runner's own backend (--speculative-draft-attention-backend) wins over the configured one.
    monkeypatch.setattr(draft_utils, "attention_backends", lambda: ("triton", "triton"))
    runner.draft_attention_backend = "torch_native"
    backend = cda.around_create_decode_backend(refuse, make_factory(runner, 1, 3))
    assert all(b.decode_attention_backend_str == "torch_native" for b in [backend, *backend.attn_backends])


def test_tree_drafts_with_pages_are_refused(torch_native):
    with pytest.raises(NotImplementedError, match="page size 16"):
        cda.around_create_decode_backend(refuse, make_factory(make_runner(0, page_size=16), 2, 3))
    cda.around_create_decode_backend(refuse, make_factory(make_runner(0, page_size=16), 1, 3))  # chains are fine


def test_step_without_plan_fails_loudly(torch_native):
    runner = make_runner(0)
    backend = cda.around_create_decode_backend(refuse, make_factory(runner, 1, 3))
    fb = decode_batch(runner, torch.Generator().manual_seed(0), 2, 1, 3)
    with pytest.raises(RuntimeError, match="without metadata"):
        backend.attn_backends[0].forward(*rand_qkv(torch.Generator(), 2), make_layer(), fb)


def test_targets_resolve_in_the_pinned_sglang():
    for target in (cda.CREATE_DECODE_BACKEND, cda.CREATE_DRAFT_EXTEND_BACKEND):
        assert callable(pkgutil.resolve_name(target)), target

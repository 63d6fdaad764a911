"""Tensor-parallel DMS inference (dms_flex/parallel.py) against the unsharded model.

Two gloo ranks on the CPU run each check once (one spawn for the module, a file rendezvous, a
collective timeout and a wall-clock limit so that a hang fails instead of blocking CI); every rank
builds the same tiny model from its seed, keeps an unsharded copy as the reference (TP=1) and shards
the other. Each test below asserts that its check passed on both ranks.

Logit bound (float32): sharding changes only the order of summation (output_proj and w2 sum two
partial products of K/2 terms through the all-reduce instead of one GEMM over K terms; the column-
parallel GEMMs may block differently). Each reordering moves a layer's output by about sqrt(K) * eps
relative (K <= 64, eps = 1.2e-7: ~1e-6); over two layers we allow 2e-5 of the logits' scale, 40x the
~5e-7 measured, and far under the gaps between greedy choices. int8 K/V: a value that lands within
that rounding of a quantization boundary takes the neighbouring code, so a stored code may differ by
one (checked) and the logits by up to one quantization step, 1/127 of their scale (measured 8e-4). Decisions (`l > 0`) sit far from zero in
these models (tests/helpers.py, tiny_model), so every eviction must be identical: the per-head live
lengths are compared exactly.
"""

import copy
import json
import os
import tempfile
import time
import threading
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dms_flex import fusion, parallel
from dms_flex import torchtune_model as tm
from tests.helpers import greedy_cached, tiny_model

WORLD = 2
TIMEOUT_S = 420  # the whole two-rank run, compile of the tiny step included (~1 minute on two busy cores)
REL_BOUND = 2e-5
INT8_REL_BOUND = 1 / 127
STEPS = 10


# ============================================================================ the checks (run on every rank)
def _compare(name, model_kw, rank, kv_dtype=None, prefill_kw=None, fuse=False):
    """Greedy decode of the sharded model against the unsharded one: collectives first, then asserts
    (an assertion on one rank must not leave the other waiting in a collective). fuse: both models'
    projections fused (fusion.fuse_projections) before sharding."""
    ref = tiny_model(**model_kw)
    ref.requires_grad_(False)
    if fuse:
        assert fusion.fuse_projections(ref) == len(ref.layers)
    tp = parallel.shard_model(copy.deepcopy(ref))
    prompt = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(len(name)))
    B = prompt.shape[0]
    with torch.no_grad():
        ref_toks, ref_logits, ref_state = greedy_cached(
            ref, prompt, STEPS, state=tm.InferenceState(ref, B, kv_dtype=kv_dtype), **(prefill_kw or {})
        )
        toks, logits, state = greedy_cached(
            tp, prompt, STEPS, state=tm.InferenceState(tp, B, kv_dtype=kv_dtype), **(prefill_kw or {})
        )
    whole = parallel.compression(state)  # collective
    totals = parallel.kv_bytes(state)  # collective

    assert torch.equal(toks, ref_toks), f"greedy tokens differ:\n{toks}\n{ref_toks}"
    scale = float(ref_logits.abs().max())
    err = float((logits - ref_logits).abs().max())
    bound = (INT8_REL_BOUND if kv_dtype == torch.int8 else REL_BOUND) * scale
    assert err <= bound, f"logits differ by {err:.3g} (bound {bound:.3g})"
    hkv = ref.layers[0].attn.num_kv_heads // WORLD
    heads = slice(rank * hkv, (rank + 1) * hkv)
    evicted = False
    for c, rc in zip(state.caches, ref_state.caches):
        assert c.k.shape[1] == hkv and c.length.shape == (B, hkv), "a rank holds only its own KV heads"
        assert torch.equal(c.length, rc.length[:, heads]), f"lengths {c.length} vs {rc.length[:, heads]}"
        assert torch.equal(c.slot_pos, rc.slot_pos[:, heads])
        for b in range(B):
            for h in range(hkv):
                n = int(c.length[b, h])
                for mine, theirs in ((c.k, rc.k), (c.v, rc.v)):
                    a, r = mine[b, h, :n].float(), theirs[b, h + heads.start, :n].float()
                    assert (a - r).abs().max() <= 1e-5 * max(1.0, float(r.abs().max())) + (1 if c.quantized else 0)
        evicted |= bool((rc.length < ref_state.next_pos[:, None]).any())
    assert evicted, "the reference evicted nothing: the check would not see a wrong eviction"
    for layer in tp.layers if fuse else ():  # fused again, over the rank's slices
        a = layer.attn
        assert fusion.fused_is_current(a, "dms_qkv", [a.q_proj, a.k_proj, a.v_proj])
        assert a.dms_qkv_weight.shape[0] == (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
        assert fusion.fused_is_current(layer.mlp, "dms_w13", [layer.mlp.w1, layer.mlp.w3])
    assert torch.allclose(whole.per_layer_head, ref_state.compression().per_layer_head)
    assert totals == ref_state.kv_bytes()


def check_borrowed(rank):
    _compare("borrowed", dict(decision="borrowed", window=3), rank)


def check_fused_qwen2(rank):  # sharded through the fused views (biases included), fused again
    _compare("fused_qwen2", dict(family="qwen2", decision="borrowed", window=3), rank, fuse=True)


def check_adapter_qwen2(rank):  # q/k/v biases, adapter rows
    _compare("adapter_qwen2", dict(family="qwen2", decision="adapter", window=2, heads=(4, 2)), rank)


def check_adapter_layer_scope(rank):  # every KV head follows global head 0's adapter row
    _compare("adapter_layer_scope", dict(decision="adapter", scope="layer", window=3, heads=(8, 4)), rank)


def check_int8_chunked(rank):  # int8 K/V, prompt appended in chunks of 8 positions
    _compare("int8_chunked", dict(decision="borrowed", window=4), rank, torch.int8, dict(chunk_size=8))


def check_generate_multiturn(rank):
    """The real loop (generate_tokens), two turns on one state: the same tokens as the unsharded model."""
    from dms_flex.generate import generate_tokens

    ref = tiny_model(window=3)
    tp = parallel.shard_model(copy.deepcopy(ref))
    turns = [[[5, 9, 1, 33, 2, 7, 8, 41, 3]], [[12, 4, 4, 50]]]
    out = {}
    for name, m in (("ref", ref), ("tp", tp)):
        state = tm.InferenceState(m, 1)
        out[name] = [generate_tokens(m, t, state, max_new_tokens=8).tokens for t in turns]
    assert out["tp"] == out["ref"], out


def check_compiled(rank):
    """torch.compile(decode_step, fullgraph=True): the functional all-reduce inside the traced graph (traced by
    dynamo and AOT autograd; backend aot_eager, so CI builds no C++ kernels: the GPU test runs inductor)."""
    ref = tiny_model(window=3)
    ref.requires_grad_(False)
    tp = parallel.shard_model(copy.deepcopy(ref))
    prompt = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(3))
    step = torch.compile(tm.decode_step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():  # (a compiled step with autograd on is another matter: inference runs without)
        ref_toks, ref_logits, ref_state = greedy_cached(ref, prompt, 6)
        toks, logits, state = greedy_cached(tp, prompt, 6, step=step)
    assert torch.equal(toks, ref_toks)
    err = float((logits - ref_logits).abs().max())
    assert err <= REL_BOUND * float(ref_logits.abs().max()), err
    hkv = ref.layers[0].attn.num_kv_heads // WORLD
    for c, rc in zip(state.caches, ref_state.caches):
        assert torch.equal(c.length, rc.length[:, rank * hkv : (rank + 1) * hkv])


def check_errors(rank):
    """Clear errors on the real group: heads that do not divide, a decision only rank 0 could read,
    weights that are no longer plain tensors."""
    with pytest.raises(ValueError, match="KV heads of every layer to divide by 2; layer 0 has 1"):
        parallel.shard_model(tiny_model(heads=(4, 1)))
    with pytest.raises(ValueError, match="scope='layer' with the borrowed neuron"):
        parallel.shard_model(tiny_model(scope="layer"))
    m = tiny_model()
    m.layers[1].attn.q_proj.weight = torch.nn.Parameter(_Marked(m.layers[1].attn.q_proj.weight.detach()))
    with pytest.raises(ValueError, match="layer 1's attn.q_proj.weight is a _Marked .*shard the model first"):
        parallel.shard_model(m)
    # the one-shot all-reduce needs an NCCL group (and symmetric memory): a gloo group gets None (NCCL's path)
    assert parallel.one_shot_all_reduce_options() is None


class _Marked(torch.Tensor):  # stands for a quantized (tensor-subclass) weight
    pass


CHECKS = {
    f.__name__[len("check_") :]: f
    for f in (
        check_borrowed,
        check_adapter_qwen2,
        check_fused_qwen2,
        check_adapter_layer_scope,
        check_int8_chunked,
        check_generate_multiturn,
        check_compiled,
        check_errors,
    )
}


def _rank_main(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    results = {}
    try:
        for name, check in CHECKS.items():
            t0 = time.perf_counter()
            try:
                check(rank)
                results[name] = None
            except Exception:  # noqa: BLE001 - reported by the test of that check
                results[name] = traceback.format_exc()
            results[name + ".seconds"] = time.perf_counter() - t0
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        results["shutdown"] = parallel.shutdown(timeout_s=60)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


# ============================================================================ the two-rank run and the tests
@pytest.fixture(scope="module")
def rank_results():
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tmp, "inductor"))
        ctx = mp.start_processes(
            _rank_main,
            args=(WORLD, os.path.join(tmp, "rendezvous"), tmp),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    pytest.fail(f"the {WORLD}-rank run did not finish in {TIMEOUT_S} s (a collective hung?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                results.append(json.load(f))
    return results


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_two_ranks_equal_one(rank_results, check):
    for rank, res in enumerate(rank_results):
        assert check in res, f"rank {rank} never ran {check}"
        assert res[check] is None, f"rank {rank}, {check}:\n{res[check]}"


def test_each_rank_destroys_its_process_group(rank_results):
    assert [res.get("shutdown") for res in rank_results] == [True, True]


def test_shutdown_gives_up_on_a_destroy_that_never_returns(tmp_path, monkeypatch):
    """parallel.shutdown: no group -> True; a destroy that blocks -> False after the timeout, not a hang."""
    assert parallel.shutdown(timeout_s=0.1) is True
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    real = dist.destroy_process_group
    release = threading.Event()
    try:
        monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: release.wait(30))
        t0 = time.monotonic()
        assert parallel.shutdown(timeout_s=0.3) is False
        assert time.monotonic() - t0 < 5
        monkeypatch.setattr(dist, "destroy_process_group", real)
        release.set()
        assert parallel.shutdown(timeout_s=30) is True and not dist.is_initialized()
    finally:
        release.set()
        if dist.is_initialized():
            real()


def test_divisibility_error_names_the_heads():
    m = tiny_model(heads=(4, 2))
    parallel.check_divisible(m, 2)
    with pytest.raises(ValueError, match=r"query heads of every layer to divide by 3; layer 0 has 4 \(num_heads=4, "):
        parallel.check_divisible(m, 3)
    with pytest.raises(ValueError, match="KV heads of every layer to divide by 4; layer 0 has 2"):
        parallel.check_divisible(m, 4)
    with pytest.raises(ValueError, match="MLP hidden units of every layer to divide by 2; layer 0 has 63"):
        parallel.check_divisible(_narrow_mlp(), 2)


def _narrow_mlp():
    m = tiny_model(heads=(4, 2))
    for layer in m.layers:
        layer.mlp.w1 = torch.nn.Linear(32, 63, bias=False)
    return m


def test_one_rank_is_a_no_op():
    m = tiny_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert parallel.shard_model(m) is m
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not hasattr(m, "tp_group")


# ============================================================================ two GPUs
GPU_CASES = {  # name -> (model dtype, KV storage, all-reduce)
    "float32": (torch.float32, None, "nccl"),  # exactness: decisions identical, logits to float32 reordering
    "bf16_int8kv": (torch.bfloat16, torch.int8, "nccl"),  # what one deploys: bf16 weights, int8 K/V
    # the step compiled with parallel.one_shot_all_reduce_options, in one CUDA graph
    "float32_one_shot": (torch.float32, None, "one-shot"),
}


def _gpu_rank_main(rank, world, init_file, out_dir):
    """Head dim 64 (the Triton kernels), the compiled CUDA-graph step (mode="reduce-overhead") on
    each rank against the unsharded model's eager step on the same GPU, over the same forced tokens.
    Each rank logs its phases with times (gpu{rank}.progress) and dumps every thread's stack after
    GPU_STACK_DUMP_S (gpu{rank}.stacks): a run that outlasts the test's deadline shows where it was."""
    import faulthandler

    stacks = open(os.path.join(out_dir, f"gpu{rank}.stacks"), "w")
    faulthandler.dump_traceback_later(GPU_STACK_DUMP_S, repeat=True, file=stacks)
    _progress(out_dir, rank, "start")
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=180),
        device_id=torch.device("cuda", rank),
    )
    err, res = None, {}
    try:
        for case, (dtype, kv, ar) in GPU_CASES.items():
            res[case] = _gpu_case(
                rank, world, dtype, kv, lambda what: _progress(out_dir, rank, f"{case}: {what}"), all_reduce=ar
            )
    except Exception:  # noqa: BLE001
        err = traceback.format_exc()
    with open(os.path.join(out_dir, f"gpu{rank}.json"), "w") as f:
        json.dump({"error": err, "res": res}, f)
    _progress(out_dir, rank, "results written; shutting down the process group")
    # destroy_process_group after the compiled CUDA-graph step never returned on 2 H200s (RESULTS.md 25):
    # parallel.shutdown gives up after its timeout, and the rank leaves without the interpreter's teardown
    down = parallel.shutdown(timeout_s=60)
    _progress(out_dir, rank, f"process group destroyed: {down}")
    if not down:
        os._exit(0)


GPU_STACK_DUMP_S = 240
_T0 = time.monotonic()


def _progress(out_dir, rank, what):
    with open(os.path.join(out_dir, f"gpu{rank}.progress"), "a") as f:
        f.write(f"{time.monotonic() - _T0:7.1f} s  {what}\n")


class _OneGraph:
    """A decode step in one CUDA graph, as dms_flex/stepping.py's GraphedStepper runs it: two real steps
    on a side stream (compile, warm-up, the symmetric buffers allocated), the third captured, then replays
    with the token copied into the captured input."""

    def __init__(self, step):
        self.step, self.graph, self.warm, self.tok, self.out = step, None, 0, None, None

    def __call__(self, model, tok, state):
        if self.tok is None:  # one input tensor throughout: the capture must not meet a recompile
            self.tok = tok.clone()
        self.tok.copy_(tok)
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.warm < 2:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(model, self.tok, state)
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return out
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.step(model, self.tok, state)
        self.graph.replay()
        return self.out


def _gpu_case(rank, world, dtype, kv, progress=lambda what: None, all_reduce="nccl"):
    from torch._inductor.utils import run_and_get_code
    from torchtune.models.llama3._component_builders import llama3

    from dms_flex.config import DMSConfig

    torch.manual_seed(0)
    kw = dict(vocab_size=512, num_layers=2, num_heads=8, num_kv_heads=4, embed_dim=512, max_seq_len=512)
    ref = llama3(**kw, intermediate_dim=1024)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    ref = tm.add_dms(ref.to("cuda", dtype).eval(), DMSConfig(window=16, alpha_scale=5.0, alpha_offset=0.0))
    ref.requires_grad_(False)
    tp = parallel.shard_model(copy.deepcopy(ref))
    one_shot = None
    if all_reduce == "one-shot":  # default-mode compile in one CUDA graph per step, as generate's loop runs it
        options = parallel.one_shot_all_reduce_options()
        one_shot = options is not None
        step = _OneGraph(torch.compile(tm.decode_step, fullgraph=True, options=options))
    else:
        step = torch.compile(tm.decode_step, fullgraph=True, mode="reduce-overhead")
    forced = torch.randint(0, 512, (4, 96), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    out, code = {}, ""
    for name, m, fn in (("ref", ref, tm.decode_step), ("tp", tp, step)):
        state = tm.InferenceState(m, 4, max_seq_len=512, kv_dtype=kv)
        with torch.inference_mode():
            logits = [tm.prefill(m, forced[:, :64], state)]
            progress(f"{name} prefilled")
            for t in range(64, 96):
                if name == "tp" and t == 64:  # the first call compiles: keep inductor's code to see the collective
                    y, codes = run_and_get_code(fn, m, forced[:, t : t + 1], state)
                    logits.append(y.clone())
                    code = "\n".join(codes)
                    continue
                logits.append(fn(m, forced[:, t : t + 1], state).clone())  # a graph's output is reused
                if t < 68:
                    progress(f"{name} step {t}")
        out[name] = (torch.stack(logits, 1).float(), [c.length.clone() for c in state.caches])
    (got, lengths), (want, ref_lengths) = out["tp"], out["ref"]
    heads = slice(rank * 2, rank * 2 + 2)
    same = sum(int((a == b[:, heads]).sum()) for a, b in zip(lengths, ref_lengths))
    return dict(
        max_err=float((got - want).abs().max()),
        scale=float(want.abs().max()),
        mean_rel_err=float((got - want).abs().mean() / want.abs().mean()),
        argmax_agree=float((got.argmax(-1) == want.argmax(-1)).float().mean()),
        lengths_equal_fraction=same / sum(a.numel() for a in lengths),
        max_length_diff=max(int((a - b[:, heads]).abs().max()) for a, b in zip(lengths, ref_lengths)),
        evicted=sum(int(x.sum()) for x in ref_lengths) < 4 * 96 * 4 * len(ref_lengths),
        one_shot_enabled=one_shot,
        one_shot_kernels=code.count("torch.ops.symm_mem.one_shot_all_reduce.default("),  # calls, not comments
        nccl_all_reduces=code.count("torch.ops._c10d_functional.all_reduce_.default("),
    )


@pytest.mark.gpu
def test_two_gpus_compiled_step_equals_one():
    """float32: only the summation order differs (and cuBLAS's blocking per shape), so decisions are
    identical and logits within 1e-3 of their scale (TF32 is off for matmuls by default; 1e-3 leaves
    room for the kernels' fp32 accumulation order). bf16 + int8 K/V: every layer rounds its output to
    bf16 (2^-8 relative) and the all-reduce sums two bf16 partials, so a decision logit within that
    rounding of 0 can flip and move one head's length by a token; the bound is on the mean relative
    logit error (3%), 95% argmax agreement (random weights: near-tied logits), and on the (layer, row,
    head) lengths: 80% identical, none more than 2 tokens away."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _gpu_rank_main, args=(2, os.path.join(tmp, "rendezvous"), tmp), nprocs=2, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + 900
        try:
            while not ctx.join(timeout=5):
                assert time.monotonic() < deadline, "the 2-GPU run hung:\n" + _gpu_logs(tmp)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        print(_gpu_logs(tmp))  # the phases' times (shown with -rA or on failure)
        for r in range(2):
            with open(os.path.join(tmp, f"gpu{r}.json")) as f:
                got = json.load(f)
            assert got["error"] is None, got["error"]
            exact, bf16 = got["res"]["float32"], got["res"]["bf16_int8kv"]
            assert exact["evicted"] and bf16["evicted"], got
            assert exact["max_err"] <= 1e-3 * exact["scale"], (r, exact)
            assert exact["lengths_equal_fraction"] == 1.0 and exact["argmax_agree"] >= 0.99, (r, exact)
            assert bf16["mean_rel_err"] <= 0.03 and bf16["argmax_agree"] >= 0.95, (r, bf16)
            # 16 (layer, row, head) lengths per rank: a flip moves one of them by a token (seen: 1 of 16 on an H200)
            assert bf16["lengths_equal_fraction"] >= 0.8 and bf16["max_length_diff"] <= 2, (r, bf16)
            # the one-shot kernel over symmetric memory (parallel.one_shot_all_reduce_options): every all-reduce
            # of the step lowered to it (2 layers x 2), and the same float32 exactness as NCCL's sum
            shot = got["res"]["float32_one_shot"]
            assert shot["evicted"] and shot["one_shot_enabled"] and shot["one_shot_kernels"] >= 4, (r, shot)
            assert shot["nccl_all_reduces"] == 0 and exact["nccl_all_reduces"] >= 4, (r, shot, exact)
            assert shot["max_err"] <= 1e-3 * shot["scale"] and shot["lengths_equal_fraction"] == 1.0, (r, shot)


def _gpu_logs(tmp) -> str:
    """Each rank's phase log and, where it was written, its stack dump."""
    out = []
    for r in range(2):
        for kind in ("progress", "stacks"):
            path = os.path.join(tmp, f"gpu{r}.{kind}")
            if os.path.exists(path):
                with open(path) as f:
                    out.append(f"--- rank {r} {kind}\n{f.read()[-6000:]}")
    return "\n".join(out)


# ============================================================================ the benchmark (benchmarks/bench_tp_decode.py)
def _bench():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_tp_decode

    return bench_tp_decode


def test_bench_summary_names_each_all_reduce_against_tp1(capsys):
    """bench_tp_decode's summary: each TP=N row (NCCL's all-reduce or the one-shot kernel) over the TP=1 row
    of the same case; a one-shot row is named as such; `--all-reduce one-shot` needs --mode compile-graph."""
    b = _bench()
    base = dict(ctx=64, batch=1, cache="8", imbalance_of_step_median=0.01)
    rows = [dict(base, tp=1, step_ms=4.0), dict(base, tp=2, all_reduce="nccl", step_ms=3.0)]
    rows.append(dict(base, tp=2, all_reduce="one-shot", step_ms=2.0))
    got = b.summary(rows, 2)["step_tpN_over_tp1"]
    assert got == {"ctx64_B1_cr8": 0.75, "ctx64_B1_cr8_one-shot": 0.5}
    with pytest.raises(SystemExit):
        b.main(["--device", "cpu", "--preset", "tiny", "--mode", "graph", "--all-reduce", "one-shot"])
    assert "needs --mode compile-graph" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        b.main(["--device", "cpu", "--preset", "tiny", "--all-reduce", "nccl", "nccl"])
    assert "name each kind once" in capsys.readouterr().err


def test_bench_head_lengths_and_fill():
    """Per-head lengths: the asked mean, in [window + 1, ctx], seeded; the synthetic cache holds them as
    a decode would have left it (slots [0, n) hold the last n positions, the ring the newest w + 1)."""
    b = _bench()
    n = b.head_lengths("smollm2", 4, 3, 8, 4096, 8, 63, seed=1)
    assert n.shape == (4, 3, 8) and torch.equal(n, b.head_lengths("smollm2", 4, 3, 8, 4096, 8, 63, seed=1))
    assert abs(float(n.float().mean()) / 4096 - 1 / 8) < 0.01 and int(n.min()) >= 64 and int(n.max()) <= 4096
    assert float(n.float().std() / n.float().mean()) > 0.5  # heads differ (the profile's spread)
    assert torch.equal(b.head_lengths("uniform", 2, 1, 2, 4096, 8, 63), torch.full((2, 1, 2), 512))
    m = tiny_model(window=7, max_seq_len=512)
    state = tm.InferenceState(m, 3, capacity=450, max_seq_len=512)
    live = b.head_lengths("smollm2", 2, 3, 2, 400, 4, 7, seed=2)
    b.bds.DEVICE = "cpu"
    b.fill_heads(state, live, 400)
    assert int(state.next_pos[0]) == 400
    for c, lv in zip(state.caches, live):
        assert torch.equal(c.length, lv)
        for bb in range(3):
            for h in range(2):
                k = int(lv[bb, h])
                assert c.slot_pos[bb, h, :k].tolist() == list(range(400 - k, 400))
                assert (c.slot_pos[bb, h, k:] == -1).all()
                ring = c.win_slot[bb, h]
                assert sorted(c.slot_pos[bb, h, ring].tolist()) == list(range(400 - 8, 400))
                assert all(int(c.slot_pos[bb, h, ring[p % 8]]) == p for p in range(392, 400))


def test_bench_tp_decode_cpu_smoke(tmp_path):
    """`torchrun --nproc_per_node 2 benchmarks/bench_tp_decode.py` on the CPU (gloo, tiny preset): TP=1
    and TP=2 rows for every case, per-rank attention times, the summary of the issue's targets."""
    import subprocess
    import sys

    out = tmp_path / "tp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["benchmarks/bench_tp_decode.py", "--device", "cpu", "--preset", "tiny", "--ctx", "1024"]
    cmd += ["--batch", "1", "2", "--steps", "2", "--draws", "2", "--out", str(out)]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    rows = {(r["tp"], r["batch"], r["cache"]): r for r in got["rows"]}
    assert set(rows) == {(tp, B, c) for tp in (1, 2) for B in (1, 2) for c in ("1", "8")}
    assert all("error" not in r and r["step_ms"] > 0 for r in rows.values())
    assert len(rows[2, 2, "8"]["attn_ms_per_rank"]) == 2 and rows[2, 2, "8"]["draws"] == 2
    assert len(rows[1, 2, "8"]["attn_ms_per_rank"]) == 1
    assert set(got["summary"]["step_tpN_over_tp1"]) == {f"ctx1024_B{B}_cr{c}" for B in (1, 2) for c in ("1", "8")}
    assert set(got["summary"]["step_tpN_at_N_x_batch_over_tp1"]) == {"ctx1024_B1->2_cr1", "ctx1024_B1->2_cr8"}


def test_generate_cli_under_torchrun_equals_one_rank(tmp_path):
    """`torchrun --nproc_per_node 2 -m dms_flex.generate --tp 2 --checkpoint DIR` on the CPU (gloo), the demo as a
    user runs it: the same greedy text and the same CR per layer as one process, over a tiny random Llama of
    4 query / 2 KV heads whose 40-word vocabulary makes the greedy text vary."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers import save_tiny_llama

    words = ["<unk>"] + [f"w{i}" for i in range(39)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "tiny"
    save_tiny_llama(folder, len(words), std=1.0, seed=3)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    args = ["-m", "dms_flex.generate", "--checkpoint", str(folder), "--prompt", "w1 w2 w3 w4 w5 w6"]
    args += ["--max-new-tokens", "24", "--device", "cpu", "--window", "2"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(cmd):
        p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        text = lines[lines.index("-" * 60) - 1]
        cr = next(ln for ln in lines if ln.startswith("DMS window"))
        return text, cr, p.stdout

    one = run([sys.executable, *args])
    two = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args, "--tp", "2"]
    )
    assert len(set(one[0].split())) >= 3, one[0]  # not a degenerate repetition
    assert two[0] == one[0] and two[1] == one[1], (one[:2], two[:2])
    assert "tensor-parallel over 2 ranks" in two[2]

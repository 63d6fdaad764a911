"""--kv int8 / --weight-quant of the evaluation: the early checks, the weight quantization of a model, the
unquantized KL/PPL reference, and the setting recorded per run and in results.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict

import torch
from torch import nn

from .. import quant
from . import baselines as bl

if TYPE_CHECKING:
    from .methods import Method


def check_quantization(args, device: torch.device, dtype: torch.dtype) -> None:
    """Fail early, with a ValueError (printed as `error: ...`), on a --kv / --weight-quant this setup cannot run."""
    if args.kv == "model" and args.weight_quant == "none":
        return
    what = " and ".join(
        x
        for x in (
            f"--kv {args.kv}" if args.kv != "model" else "",
            f"--weight-quant {args.weight_quant}" if args.weight_quant != "none" else "",
        )
        if x
    )
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{what} needs torchao (pip install torchao): {e}") from None
    if args.kv == "int8":
        try:  # the cache's own round trip, on this device and dtype
            q, s = quant.quantize_kv(torch.randn(1, 1, 2, 8, device=device, dtype=dtype))
            quant.dequantize_kv(q, s, dtype)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            raise ValueError(f"--kv int8 cannot run on {device} with {dtype}: {e}") from None


def quantize_model(model: nn.Module, mode: str, log: Callable[[str], None] = print, what: str = "the model") -> int:
    """quant.quantize_weights in place; int4 first casts the model to bfloat16 (torchao's int4 layouts, CPU
    and CUDA, take bf16 weights; dms_flex.generate does the same). Returns the number of quantized weights."""
    if mode == "none":
        return 0
    p = next(model.parameters())
    if mode == "int4" and p.dtype != torch.bfloat16:
        log(f"note: int4 weights need bf16: casting {what} from {p.dtype} to torch.bfloat16")
        model.to(torch.bfloat16)
    try:
        quant.quantize_weights(model, mode)
    except (RuntimeError, NotImplementedError, AssertionError, TypeError) as e:
        raise ValueError(f"--weight-quant {mode} failed for {what} on {p.device} ({p.dtype}): {e}") from None
    n = len(quant.quantized_weight_names(model))
    if n == 0:
        raise ValueError(
            f"--weight-quant {mode}: no linear layer of {what} could be quantized (int4 needs input "
            f"widths that are multiples of 32)"
        )
    return n


def load_reference(args, base, folder, log: Callable[[str], None] = print):
    """The KL/PPL reference: --reference DIR; else, when LoRA factors were merged into --model's weights (a
    LoRA retrofit folder, or an --adapter with LoRA), the same folder without them: the model before the
    retrofit, as the distillation's teacher was; else --model itself (the same module when its weights stay
    unquantized, else an unquantized copy). Returns (model, name)."""
    from ..checkpoints import pretrained

    p = next(base.model.parameters())
    name = str(folder or base.family)
    if args.reference and not (
        folder is not None and Path(args.reference).resolve() == Path(folder).resolve() and args.weight_quant == "none"
    ):
        t = time.perf_counter()
        ref = pretrained.load_dms_model(args.reference, dtype=p.dtype, device=p.device).model
        if ref.tok_embeddings.num_embeddings != base.model.tok_embeddings.num_embeddings:
            raise ValueError(
                f"--reference {args.reference} has a vocabulary of {ref.tok_embeddings.num_embeddings} "
                f"tokens, --model {base.model.tok_embeddings.num_embeddings}: KL needs the same tokenizer"
            )
        log(f"reference: {args.reference} loaded in {time.perf_counter() - t:.1f}s")
        return ref, str(args.reference)
    if getattr(base, "lora", None) is not None and folder is not None:
        t = time.perf_counter()
        ref = pretrained.load_dms_model(folder, dtype=p.dtype, device=p.device, merge_lora=False).model
        merged_from = base.adapter if getattr(base, "adapter", None) is not None else folder
        log(
            f"reference: {folder} without the LoRA merged from {merged_from} (the model before the retrofit), "
            f"loaded in {time.perf_counter() - t:.1f}s; vanilla below is the LoRA student with a dense cache"
        )
        return ref, f"{folder} (without the LoRA of {merged_from})"
    if args.weight_quant != "none":
        # memory: one more copy of the weights in the model dtype (e.g. 16 GB for an 8B model in bf16), held
        # for the whole run; the quantized model is the smaller of the two
        import copy

        return copy.deepcopy(base.model), name + " (an unquantized copy)"
    return base.model, name


def kv_label(m: Method, dtype: torch.dtype) -> str:
    model_dtype = str(dtype).replace("torch.", "")
    if m.int8_kv:
        return "int8"
    if m.kv_int8:  # a policy under --kv int8
        return f"{model_dtype} (PolicyState has no int8 KV storage)"
    return model_dtype


def quantization_info(args, dtype, reference: nn.Module, ref_name: str, n_quantized: int) -> Dict[str, Any]:
    model_dtype = str(dtype).replace("torch.", "")
    policies = [m for m in args.methods if m in bl.POLICIES]
    kv_by = {m: ("int8" if args.kv == "int8" and m in ("vanilla", "dms") else model_dtype) for m in args.methods}
    info = {
        "kv": args.kv,
        "kv_by_method": kv_by,
        "weights": args.weight_quant,
        "quantized_weights": n_quantized,
        "model_dtype": model_dtype,
        "reference": ref_name,
        "reference_dtype": str(next(reference.parameters()).dtype).replace("torch.", ""),
        "reference_kv": "full precision (its dtype)",
        "reference_weights": "unquantized",
    }
    if args.kv == "int8" and policies:
        info["note"] = (
            f"the baselines ({', '.join(policies)}) keep K/V in {model_dtype}: PolicyState has no int8 KV storage"
        )
    return info

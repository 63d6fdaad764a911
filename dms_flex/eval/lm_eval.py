"""lm-eval (EleutherAI's lm-evaluation-harness) model over dms_flex: ``--model dms_flex``.

The harness asks a model three things; here each runs through dms_flex's model and caches:
- ``loglikelihood(context, continuation)``: the context is prefilled into the method's cache and
  the continuation read token by token through decode steps, so every continuation token is scored
  from what the cache holds at that moment (for vanilla and DMS the teacher-forced forward gives the
  same logits and is used instead: one forward, exact DMS masking);
- ``loglikelihood_rolling(text)``: the harness's rolling windows of ``max_length`` tokens (the first
  conditioned on the end-of-text token, each later one predicting up to max_length new tokens with as
  much preceding context as fits), each scored like a continuation;
- ``generate_until(context, gen_kwargs)``: prefill and decode (greedy unless ``do_sample`` with a
  temperature > 0), cut at the first ``until`` string.

Methods are those of `python -m dms_flex.eval`: ``vanilla``, ``dms``, ``streaming``, ``h2o``, ``tova``
(policies need ``cr``). Local-file tasks come from the harness's own ``--include_path``. Without
``pretrained`` the model is the embedded SmolLM2-135M-Instruct with its packaged DMS adapter (``adapter=DIR``
picks another adapter, ``no_adapter=true`` none), as ``python -m dms_flex.eval`` uses it. A recorded run on the
local task ``benchmarks/lm_eval_task/arith_mc.yaml``: benchmarks/RESULTS.md, "lm-eval adapter: a real run".

    python -m dms_flex.eval.lm_eval --model dms_flex \\
        --model_args pretrained=DIR,method=dms,window=64 --tasks my_task --include_path my_tasks/

(`python -m dms_flex.eval.lm_eval` registers the model and hands the rest of the command line to
lm-eval's own CLI; from Python, call `register()` before ``lm_eval.simple_evaluate(model="dms_flex")``
or pass an instance: ``simple_evaluate(model=make_lm(...))``.) lm-eval is imported only by
`register` / `make_lm` / `main`: `DMSFlexLM` works without it.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..generate import SamplingConfig
from .methods import METHODS, Method
from .metrics import generate_rows

MODEL_NAME = "dms_flex"


class DMSFlexLM:
    """The harness's model interface over a dms_flex model (lm-eval's `LM` is mixed in by register())."""

    def __init__(
        self,
        pretrained: Optional[str] = None,
        method: str = "dms",
        cr: Optional[float] = None,
        window: Optional[int] = None,
        alpha_offset: Optional[float] = None,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        batch_size: Any = 1,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        sinks: int = 4,
        heavy_fraction: float = 0.5,
        model=None,
        tokenizer=None,
        adapter: Optional[str] = None,
        no_adapter: Any = False,
        **unused,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}")
        if method in ("streaming", "h2o", "tova") and cr is None:
            raise ValueError(f"method={method} needs a compression ratio: add cr=N to the model arguments")
        if model is None:
            from ..checkpoints import pretrained as pt

            folder = pretrained
            if folder is None:  # the embedded SmolLM2 with its packaged DMS adapter, as python -m dms_flex.eval
                from ..checkpoints.embedded import default_model

                folder, adapter, _ = default_model(adapter, str(no_adapter).lower() in ("1", "true", "yes"))
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch_dtype = (
                getattr(torch, dtype) if dtype else (torch.bfloat16 if "cuda" in str(device) else torch.float32)
            )
            overrides = {k: v for k, v in (("window", window), ("alpha_offset", alpha_offset)) if v is not None}
            dm = pt.load_dms_model(
                folder, dms_overrides=overrides or None, dtype=torch_dtype, device=device, adapter=adapter
            )
            model, tokenizer = dm.model, dm.tokenizer
        if tokenizer is None:
            raise ValueError("the lm-eval adapter needs a tokenizer (the checkpoint folder has none)")
        self.model, self.tokenizer = model, tokenizer
        cfg = getattr(model, "dms_config", None)
        if method == "dms" and cfg is not None and (window is not None or alpha_offset is not None):
            overrides = {k: v for k, v in (("window", window), ("alpha_offset", alpha_offset)) if v is not None}
            model.dms_config = cfg.replace(**overrides)
        policy_kw = {"streaming": {"sinks": sinks}, "h2o": {"heavy_fraction": heavy_fraction}}.get(method, {})
        self.method = Method(
            method,
            model,
            cr=None if cr is None else float(cr),
            requested_cr=cr,
            dms_config=getattr(model, "dms_config", None),
            policy_kw=policy_kw,
        )
        self._max_length = int(max_length or model.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self._device_ = next(model.parameters()).device

    # ------------------------------------------------------------------ what the harness reads
    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(eos if eos is not None else 0)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos if bos is not None else self.eot_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "dms_flex")).replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tok_encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ scoring
    def _split(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Token ids of context and continuation as the harness defines them: spaces at the end of
        the context belong to the continuation, and the continuation is what the whole string adds."""
        n_spaces = len(context) - len(context.rstrip(" "))
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary: encode separately
            return ctx or [self.prefix_token_id], self.tok_encode(continuation)
        return ctx or [self.prefix_token_id], whole[len(ctx) :]

    @torch.no_grad()
    def score(self, context: List[int], continuation: List[int]) -> Tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding would produce it)."""
        if not continuation:
            return 0.0, True
        ids = (list(context) + list(continuation))[-(self.max_length + 1) :]
        n_ctx = len(ids) - len(continuation)
        if n_ctx < 1:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}")
        m = self.method
        x = torch.tensor([ids], device=self._device_)
        if m.name in ("vanilla", "dms"):
            logits = m.teacher_forced(x[:, :-1])[0][0, n_ctx - 1 :]
        else:
            state = m.new_state(1, len(ids))
            steps = [m.prefill(x[:, :n_ctx], state)[0]]
            for t in range(n_ctx, len(ids) - 1):
                steps.append(m.step(x[:, t : t + 1], state)[0])
            logits = torch.stack(steps)
        lp = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation, device=lp.device)
        return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            out.append(self.score(*self._split(context, continuation)))
        return out

    def rolling_windows(self, tokens: List[int]) -> List[Tuple[List[int], List[int]]]:
        """(context, predicted) pairs covering every token once; each pair's input fits max_length."""
        L = self.max_length
        pairs, s = [], 0
        while s < len(tokens):
            e = min(len(tokens), s + L)
            n_ctx = L + 1 - (e - s)
            ctx = tokens[max(0, s - n_ctx) : s] if s > 0 else [self.prefix_token_id]
            pairs.append((ctx, tokens[s:e]))
            s = e
        return pairs

    def loglikelihood_rolling(self, requests) -> List[float]:
        out = []
        for req in requests:
            tokens = self.tok_encode(req.args[0])
            out.append(sum(self.score(c, p)[0] for c, p in self.rolling_windows(tokens)))
        return out

    def generate_until(self, requests) -> List[str]:
        out = []
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0) or 0.0)
            sampling = SamplingConfig(temperature if kw.get("do_sample") and temperature > 0 else 0.0)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            ids = ids[-max(1, self.max_length - max_new) :]
            toks, _ = generate_rows(self.method, [ids], max_new, stop_tokens=[self.eot_token_id], sampling=sampling)
            text = self.tok_decode(toks[0])
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


# ============================================================================ lm-eval glue
_REGISTERED = None


def register():
    """Register the harness model class under "dms_flex" (imports lm-eval) and return it."""
    global _REGISTERED
    if _REGISTERED is not None:
        return _REGISTERED
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError(f"the lm-eval adapter needs lm-eval: pip install lm-eval ({e})") from e

    class DMSFlexHarnessLM(DMSFlexLM, LM):
        # lm-eval builds the model from --model_args (a string or, since 0.4.9, a dict) plus its own settings
        # (batch_size, device, ...); a key given in --model_args wins over the harness's (lm-eval 0.4.13 passes
        # device both ways)
        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**{**extra, **dict(arg_dict or {})})

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
            from lm_eval.utils import simple_parse_args_string

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    DMSFlexHarnessLM.__name__ = "DMSFlexHarnessLM"
    register_model(MODEL_NAME)(DMSFlexHarnessLM)
    _REGISTERED = DMSFlexHarnessLM
    return DMSFlexHarnessLM


def make_lm(**kwargs):
    """An instance of the registered class: lm_eval.simple_evaluate(model=make_lm(...), ...)."""
    return register()(**kwargs)


def main(argv=None) -> int:
    """lm-eval's CLI with the dms_flex model registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The evaluated methods: vanilla, DMS (its CR measured, or its alpha_offset calibrated to a requested CR)
and the training-free baselines of `dms_flex.eval.baselines`, each a `Method` with its own cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .. import stats
from .. import torchtune_model as tm
from ..config import DMSConfig
from . import baselines as bl
from .quantization import quantize_model

METHODS = ("vanilla", "dms") + bl.POLICIES


@dataclass
class Method:
    """One way of running the model: its cache, its CR and where its decisions come from."""

    name: str  # one of METHODS
    model: nn.Module
    cr: Optional[float] = None  # policies: the CR they run at; dms: the achieved CR once measured
    requested_cr: Optional[float] = None
    dms_config: Optional[DMSConfig] = None  # dms: the settings to run with
    setting: str = ""  # dms: where the decisions come from (printed)
    policy_kw: Dict[str, Any] = field(default_factory=dict)
    # KV storage of the cached paths and of the teacher-forced forward: int8 (one scale per token and KV
    # head, as `InferenceState(kv_dtype=torch.int8)` stores it) for vanilla and dms; the policies'
    # PolicyState has no int8 storage, so a policy ignores it (it keeps K/V in the model dtype)
    kv_int8: bool = False
    # dms from a checkpoint (--dms-checkpoint): its folder, and the DMSConfig fields replaced after it is
    # loaded (per-CR window, alpha_offset); `prepare_dms` sets model and dms_config
    checkpoint: Optional[str] = None
    dms_overrides: Dict[str, Any] = field(default_factory=dict)
    calibrate: bool = False  # dms: bisect alpha_offset until the measured CR meets requested_cr
    # attention of the full-sequence forwards (teacher-forced perplexity and its vanilla reference, the DMS CR
    # measurement): the dense masked-SDPA reference (exact, no FlexAttention compile per new batch shape) by
    # default; --attention flex / auto switch it
    attention: str = "dense"

    @property
    def int8_kv(self) -> bool:
        """Whether this method's K/V really go through int8 (policies never do)."""
        return self.kv_int8 and self.name in ("vanilla", "dms")

    @property
    def compressed(self) -> bool:
        return self.name != "vanilla"

    @property
    def label(self) -> str:
        if self.name == "vanilla":
            return "vanilla"
        cr = f"{self.cr:.2f}x" if self.cr is not None else "?"
        return f"{self.name}@{cr}"

    def _activate(self) -> None:
        if self.dms_config is not None:
            self.model.dms_config = self.dms_config

    def policy(self) -> bl.EvictionPolicy:
        return bl.EvictionPolicy(self.name, float(self.cr), **self.policy_kw)

    def new_state(self, batch_size: int, max_seq_len: int):
        self._activate()
        if self.name in bl.POLICIES:
            return bl.PolicyState(self.model, batch_size, self.policy(), max_seq_len=max_seq_len)
        return tm.InferenceState(
            self.model,
            batch_size,
            max_seq_len=max_seq_len,
            eviction=self.name == "dms",
            kv_dtype=torch.int8 if self.int8_kv else None,
        )

    def prefill(self, tokens, state, lengths=None) -> torch.Tensor:
        self._activate()
        if isinstance(state, bl.PolicyState):
            return bl.prefill_with_policy(self.model, tokens, state, lengths)
        return tm.prefill(self.model, tokens, state, lengths)

    def step(self, token, state) -> torch.Tensor:
        self._activate()
        if isinstance(state, bl.PolicyState):
            return bl.decode_step_with_policy(self.model, token, state)
        with torch.no_grad():
            return tm.decode_step(self.model, token, state)

    def teacher_forced(self, tokens):
        """Full-sequence forward (vanilla, dms): (logits (B, T, V), evicted per layer or [])."""
        self._activate()
        out = tm.forward_train(
            self.model,
            tokens,
            eviction=self.name == "dms",
            training=False,
            backend=self.attention,
            kv_int8=self.int8_kv,
        )
        return tm.logits_of(self.model, out.hidden), out.evicted


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def measure_dms_cr(method: Method, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Achieved CR of a DMS method on the perplexity windows: kept fraction once each window's
    second-to-last token is read (the last is only a target), as `perplexity` reports it."""
    method._activate()
    window = method.dms_config.effective_window
    kept = []
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i : i + batch_size, :-1].to(_device_of(method.model))
            out = tm.forward_train(
                method.model, x, eviction=True, training=False, backend=method.attention, kv_int8=method.int8_kv
            )
            kept.append(torch.stack([stats.kept_fraction(ev, window) for ev in out.evicted]).mean(dim=(0, 2)))
    return 1.0 / max(float(torch.cat(kept).mean()), 1e-12)


def calibrate_alpha_offset(
    method: Method, windows: torch.Tensor, target_cr: float, iters: int = 14, log: Callable[[str], None] = print
) -> float:
    """Bisection on alpha_offset (a larger offset evicts less) until the measured CR meets target_cr.
    Returns the offset whose CR came closest."""
    base = method.dms_config
    tried: Dict[float, float] = {}

    def cr_at(off: float) -> float:
        method.dms_config = base.replace(alpha_offset=float(off))
        tried[off] = measure_dms_cr(method, windows)
        return tried[off]

    s = base.alpha_scale
    lo, hi = -s, s
    for k in range(8):
        if cr_at(lo) >= target_cr:
            break
        lo -= s * 2**k
    for k in range(8):
        if cr_at(hi) <= target_cr:
            break
        hi += s * 2**k
    for _ in range(iters):
        mid = (lo + hi) / 2
        if cr_at(mid) > target_cr:
            lo = mid
        else:
            hi = mid
    best = min(tried, key=lambda o: abs(tried[o] - target_cr))
    method.dms_config = base.replace(alpha_offset=float(best))
    if abs(tried[best] - target_cr) / target_cr > 0.05:
        log(
            f"calibration: CR {target_cr} not reachable with this model and window "
            f"({base.effective_window}); closest CR {tried[best]:.2f} at alpha_offset {best:.3f}"
        )
    return best


def build_methods(args, base) -> List[Method]:
    """DMS runs (one per requested CR that has a DMS setting, else one with the model's own) and the
    baselines at each requested CR. A DMS run is made ready (loaded, calibrated, CR measured) by
    `prepare_dms` just before it runs: a per-CR checkpoint (CR=DIR) is in memory only for its run, the
    shared one (--dms-checkpoint DIR) for all DMS runs."""
    methods: List[Method] = []
    kv_int8 = args.kv == "int8"
    whole = args.dms_checkpoint_all
    if "dms" in args.methods:
        per_cr = sorted(
            set(args.dms_checkpoint)
            | set(args.dms_alpha_offset)
            | set(args.dms_window_at)
            | (set(args.cr) if args.dms_calibrate else set())
        )
        for c in per_cr:
            over: Dict[str, Any] = {}
            if c in args.dms_window_at:
                over["window"] = args.dms_window_at[c]
            m = Method("dms", base.model, requested_cr=c, kv_int8=kv_int8)
            if c in args.dms_checkpoint:  # a retrofit for this CR: its own settings (a per-CR window aside)
                m.checkpoint, m.setting = args.dms_checkpoint[c], f"checkpoint {args.dms_checkpoint[c]}"
            else:
                m.checkpoint = whole
                prefix = f"checkpoint {whole}: " if whole else ""
                if c in args.dms_alpha_offset:
                    over["alpha_offset"] = args.dms_alpha_offset[c]
                    m.setting = prefix + f"alpha_offset {args.dms_alpha_offset[c]:g}"
                elif args.dms_calibrate:
                    m.calibrate, m.setting = True, prefix + "calibrate"
                else:  # only a per-CR window brought this CR here
                    m.setting = prefix + f"window {args.dms_window_at[c]}"
            if m.checkpoint is None:
                m.dms_config = base.dms.replace(**over) if over else base.dms
            else:  # prepare_dms loads it and applies the overrides to its own settings
                m.model, m.dms_overrides = None, over
            methods.append(m)
        if not per_cr:
            if whole:
                methods.append(
                    Method(
                        "dms",
                        None,
                        checkpoint=whole,
                        setting=f"checkpoint {whole}: its own DMS settings",
                        kv_int8=kv_int8,
                    )
                )
            else:
                methods.append(
                    Method(
                        "dms", base.model, dms_config=base.dms, setting="the model's own DMS settings", kv_int8=kv_int8
                    )
                )
    kw = {"streaming": {"sinks": args.sinks}, "h2o": {"heavy_fraction": args.heavy_fraction}, "tova": {}}
    for name in bl.POLICIES:
        if name in args.methods:
            # kv_int8 only labels them: PolicyState has no int8 storage (Method.int8_kv is False for a policy)
            methods += [
                Method(name, base.model, cr=c, requested_cr=c, policy_kw=kw[name], kv_int8=kv_int8) for c in args.cr
            ]
    for m in methods:
        m.attention = args.attention
    return methods


class CheckpointLoader:
    """The DMS checkpoints of --dms-checkpoint, each loaded once (in the evaluated model's dtype and device,
    weight-quantized like it, with --dms-window's override) and kept until `release`."""

    def __init__(self, args, like: nn.Module, log: Callable[[str], None] = print):
        self.args, self.like, self.log = args, like, log
        self.loaded: Dict[str, Any] = {}

    def get(self, folder: str):
        if folder not in self.loaded:
            from ..checkpoints import pretrained

            p = next(self.like.parameters())
            window = self.args.dms_window
            t = time.perf_counter()
            dm = pretrained.load_dms_model(
                folder, dms_overrides={"window": window} if window is not None else None, dtype=p.dtype, device=p.device
            )
            quantize_model(dm.model, self.args.weight_quant, self.log, what=f"checkpoint {folder}")
            self.loaded[folder] = dm
            self.log(f"dms: loaded checkpoint {folder} in {time.perf_counter() - t:.1f}s; DMS settings {dm.dms}")
        return self.loaded[folder]

    def release(self, folder: str) -> None:
        self.loaded.pop(folder, None)


def prepare_dms(m: Method, args, base, cal: torch.Tensor, log, checkpoints: Optional[CheckpointLoader] = None) -> None:
    """Load the run's checkpoint (through `checkpoints`, which keeps a shared one), calibrate alpha_offset
    if asked, and measure the achieved CR."""
    if m.checkpoint is not None:
        dm = (checkpoints or CheckpointLoader(args, base.model, log)).get(m.checkpoint)
        m.model = dm.model
        m.dms_config = dm.dms.replace(**m.dms_overrides) if m.dms_overrides else dm.dms
    if m.calibrate:
        off = calibrate_alpha_offset(m, cal, m.requested_cr, log=log)
        m.calibrate = False
        m.setting = (f"checkpoint {m.checkpoint}: " if m.checkpoint else "") + f"alpha_offset {off:.3f} (calibrated)"
    m.cr = measure_dms_cr(m, cal)
    log(
        f"dms: {m.setting}: window {m.dms_config.effective_window}, achieved CR {m.cr:.2f}"
        + (f" (requested {m.requested_cr:g})" if m.requested_cr else "")
        + (", int8 K/V" if m.int8_kv else "")
    )

"""DMS settings: one validated dataclass, and the compression-ratio schedule.

Field names follow docs/design.md, "Semantics"; the released checkpoint format (`dms_alpha_scale`,
`dms_initial_alpha_offset`, `dms_window_size`, `dms_cr`) maps onto them in `to_hf` / `from_hf`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

DECISION_VARIANTS = ("borrowed", "adapter")
DECISION_SCOPES = ("head", "layer")


class DMSConfigError(ValueError):
    """A DMS setting is out of its allowed range; the message names field, value and range."""


@dataclass(frozen=True)
class DMSConfig:
    # Token t stays visible to queries t..t+window; marked tokens vanish for queries >= t+window+1.
    window: int = 512
    # Where the decision logit comes from: "borrowed" (last q channel of each group's first head,
    # no new parameters) or "adapter" (Linear(RMSNorm(x)), zero-initialised).
    decision: str = "borrowed"
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    # Temperature of the training relaxation alpha = sigmoid((l + noise) / tau).
    tau: float = 0.1
    # "head": one decision per KV head; "layer": head 0's decision broadcast to all KV heads.
    scope: str = "head"
    # The paper's weaker ablation: a marked token disappears as soon as its successor arrives.
    immediate_eviction: bool = False
    # Linear compression-ratio schedule for the compression loss.
    initial_cr: float = 1.0
    final_cr: float = 8.0
    final_step: int = 700

    def __post_init__(self) -> None:
        self._check(
            "window",
            self.window,
            isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 0,
            "an integer >= 0 (0 means immediate eviction)",
        )
        self._check("decision", self.decision, self.decision in DECISION_VARIANTS, f"one of {DECISION_VARIANTS}")
        self._check(
            "alpha_scale", self.alpha_scale, _finite(self.alpha_scale) and self.alpha_scale > 0, "a finite number > 0"
        )
        self._check("alpha_offset", self.alpha_offset, _finite(self.alpha_offset), "a finite number")
        self._check("tau", self.tau, _finite(self.tau) and self.tau > 0, "a finite number > 0")
        self._check("scope", self.scope, self.scope in DECISION_SCOPES, f"one of {DECISION_SCOPES}")
        self._check(
            "immediate_eviction", self.immediate_eviction, isinstance(self.immediate_eviction, bool), "True or False"
        )
        self._check(
            "initial_cr", self.initial_cr, _finite(self.initial_cr) and self.initial_cr >= 1, "a finite number >= 1"
        )
        self._check(
            "final_cr",
            self.final_cr,
            _finite(self.final_cr) and self.final_cr >= self.initial_cr,
            f"a finite number >= initial_cr ({self.initial_cr})",
        )
        self._check(
            "final_step",
            self.final_step,
            isinstance(self.final_step, int) and not isinstance(self.final_step, bool) and self.final_step >= 0,
            "an integer >= 0",
        )

    @staticmethod
    def _check(field: str, value: Any, ok: bool, allowed: str) -> None:
        if not ok:
            raise DMSConfigError(f"DMSConfig.{field}={value!r} is invalid: it must be {allowed}.")

    @property
    def effective_window(self) -> int:
        """The window the eviction rule uses: 0 under the immediate-eviction ablation."""
        return 0 if self.immediate_eviction else self.window

    def target_cr(self, step: int) -> float:
        """CR(step): linear from initial_cr at step 0 to final_cr at final_step, then held."""
        if self.final_step == 0:
            return float(self.final_cr)
        frac = min(max(step, 0), self.final_step) / self.final_step
        return float(self.initial_cr + (self.final_cr - self.initial_cr) * frac)

    def alpha_target(self, step: int) -> float:
        """Fraction of tokens the compression loss asks to be evicted: 1 - 1/CR(step)."""
        return 1.0 - 1.0 / self.target_cr(step)

    def replace(self, **changes: Any) -> "DMSConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise DMSConfigError(
                f"unknown DMSConfig field(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DMSConfig":
        return cls().replace(**dict(d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- the released checkpoint format (config.json keys) ---------------------------------
    def to_hf(self) -> dict:
        return {
            "dms_alpha_scale": self.alpha_scale,
            "dms_initial_alpha_offset": self.alpha_offset,
            "dms_window_size": self.window,
            "dms_cr": self.final_cr,
            "dms_decision": self.decision,
            "dms_scope": self.scope,
            "dms_immediate_eviction": self.immediate_eviction,
            "dms_tau": self.tau,
        }

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "DMSConfig":
        """The DMS settings of a released-format config; errors name `source` and the key."""
        required = ("dms_alpha_scale", "dms_initial_alpha_offset", "dms_window_size")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise DMSConfigError(
                f"{source} lacks the DMS keys {missing}; a DMS checkpoint has "
                f"{list(required) + ['dms_cr']}. Is this a DMS checkpoint?"
            )

        def number(key):
            value = cfg[key]
            try:
                if isinstance(value, bool):
                    raise TypeError
                return float(value)
            except (TypeError, ValueError):
                raise DMSConfigError(f"{source}: {key}={value!r} is invalid: it must be a number") from None

        kw = dict(
            alpha_scale=number("dms_alpha_scale"),
            alpha_offset=number("dms_initial_alpha_offset"),
            window=cfg["dms_window_size"],
        )
        if "dms_cr" in cfg:
            kw["final_cr"] = number("dms_cr")
        for key, field in (
            ("dms_decision", "decision"),
            ("dms_scope", "scope"),
            ("dms_immediate_eviction", "immediate_eviction"),
            ("dms_tau", "tau"),
        ):
            if key in cfg:
                kw[field] = cfg[key]
        try:
            return cls(**kw)
        except DMSConfigError as e:
            msg = str(e)
            for field, key in HF_KEY_OF_FIELD.items():
                if msg.startswith(f"DMSConfig.{field}="):
                    raise DMSConfigError(f"{source}: {key}={cfg.get(key)!r} is invalid ({msg})") from None
            raise DMSConfigError(f"{source}: {msg}") from None


#: config.json key of each DMSConfig field the released format carries (for error messages)
HF_KEY_OF_FIELD = {
    "alpha_scale": "dms_alpha_scale",
    "alpha_offset": "dms_initial_alpha_offset",
    "window": "dms_window_size",
    "final_cr": "dms_cr",
    "decision": "dms_decision",
    "scope": "dms_scope",
    "immediate_eviction": "dms_immediate_eviction",
    "tau": "dms_tau",
}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

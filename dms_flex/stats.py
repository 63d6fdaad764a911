"""Compression statistics (docs/design.md, "Compression ratio"): what "8x" means.

Per (layer, batch row, KV head): kept fraction = tokens retained / tokens seen, tokens still in the
window counted as retained. CR = 1 / mean(kept fraction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .masks import is_far


def kept_fraction(evicted: torch.Tensor, window: int, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """evicted: (B, Hkv, T) hard decisions about each token (already shifted); lengths: (B,) tokens
    seen per row (default T). Returns (B, Hkv): the fraction a cache would hold after the last token."""
    B, H, T = evicted.shape
    if lengths is None:
        lengths = torch.full((B,), T, device=evicted.device)
    pos = torch.arange(T, device=evicted.device)
    last = (lengths - 1)[:, None, None]
    seen = pos[None, None, :] < lengths[:, None, None]
    gone = evicted & is_far(last, pos[None, None, :], window) & seen
    kept = seen.sum(-1) - gone.sum(-1)
    return kept.float() / lengths[:, None].clamp_min(1).float()


@dataclass
class CompressionReport:
    per_layer_head: torch.Tensor  # (L, Hkv) kept fraction, averaged over batch rows

    @property
    def kept(self) -> float:
        return float(self.per_layer_head.mean())

    @property
    def ratio(self) -> float:
        return 1.0 / max(self.kept, 1e-12)

    @property
    def per_layer_ratio(self) -> List[float]:
        return [1.0 / max(float(k), 1e-12) for k in self.per_layer_head.mean(dim=1)]

    def format(self) -> str:
        layers = " ".join(f"{r:.1f}" for r in self.per_layer_ratio)
        return f"CR {self.ratio:.2f}x (kept {100 * self.kept:.1f}% of KV); per layer: {layers}"


def compression_report(kept_per_layer: Sequence[torch.Tensor]) -> CompressionReport:
    """kept_per_layer: one (B, Hkv) kept-fraction tensor per layer."""
    stacked = torch.stack([k.float().cpu() for k in kept_per_layer])  # (L, B, H)
    return CompressionReport(per_layer_head=stacked.mean(dim=1))


def plot_kept_heatmap(report: CompressionReport, path: str, title: str = "DMS kept fraction") -> str:
    """PNG heat map of kept fraction per layer (rows) and KV head (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report.per_layer_head.numpy()
    fig, ax = plt.subplots(figsize=(max(4, data.shape[1] * 0.6 + 2), max(3, data.shape[0] * 0.25 + 1.5)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (CR {report.ratio:.2f}x)")
    fig.colorbar(im, ax=ax, label="kept fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

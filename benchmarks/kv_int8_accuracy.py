"""KL of next-token distributions between an int8 and a full-precision KV cache, DMS off and DMS on.

The int8 numerics are those of the compact cache (symmetric, one scale per token and KV head,
`dms_flex.quant`), applied in the teacher-forced forward (`forward_train(kv_int8=True)`), which the
tests show equals cached generation. DMS on: the embedded SmolLM2 has no trained decisions, so the
borrowed neuron's offset is calibrated on the text to evict the fraction that gives the requested
CR (window 16), and the achieved CR is reported.

Usage: python benchmarks/kv_int8_accuracy.py [--checkpoint DIR] [--tokens 1024] [--cr 8] [--out kl.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from dms_flex import decisions, stats
from dms_flex.checkpoints import pretrained
from dms_flex import torchtune_model as tm


def text_tokens(tok, n: int) -> torch.Tensor:
    """Held-out text available offline everywhere: Python standard-library sources."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((lib / f).read_text() for f in ("argparse.py", "json/decoder.py", "json/encoder.py"))
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    return torch.tensor([ids])


def kl(p_logits, q_logits):
    """Mean per-token KL(p || q) in nats."""
    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def calibrate_offset(model, toks, cr: float, window: int) -> float:
    """alpha_offset that makes the borrowed neuron evict ~(1 - 1/CR) of the tokens."""
    cfg = model.dms_config
    logits = []
    with torch.no_grad():
        x = model.tok_embeddings(toks)
        for layer in model.layers:
            q, k, v = tm._project(layer.attn, layer.sa_norm(x))
            logits.append(decisions.borrowed_logits(q.transpose(1, 2), layer.attn.num_kv_heads, cfg) + cfg.alpha_offset)
            x = layer(x)
    raw = torch.cat([l.flatten() for l in logits])
    return float(torch.quantile(raw.float(), 1.0 / cr))


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--cr", type=float, default=8.0)
    p.add_argument(
        "--window", type=int, default=None, help="DMS window (default: a retrofit's own; 16 for an untrained model)"
    )
    p.add_argument("--out")
    a = p.parse_args()
    folder = a.checkpoint
    if folder is None:
        from dms_flex.checkpoints.embedded import default_model_dir

        folder = default_model_dir()
    dm = pretrained.load_dms_model(folder, dms_overrides={"window": a.window} if a.window is not None else None)
    m = dm.model
    if not dm.dms_trained and a.window is None:
        m.dms_config = m.dms_config.replace(window=16)
    if torch.cuda.is_available():
        m.cuda()
    window = m.dms_config.effective_window
    toks = text_tokens(dm.tokenizer, a.tokens).to(next(m.parameters()).device)
    results = {"checkpoint": str(folder), "tokens": toks.shape[1], "window": window, "trained": dm.dms_trained}

    def logits(**kw):
        out = tm.forward_train(m, toks, training=False, **kw)
        return tm.logits_of(m, out.hidden), out

    ref_dense, _ = logits(eviction=False)
    int8_dense, _ = logits(eviction=False, kv_int8=True)
    results["dense"] = {"kl_int8_vs_full": kl(ref_dense, int8_dense)}
    if dm.dms_trained:  # a retrofit: its own decisions (no calibration)
        offset = m.dms_config.alpha_offset
    else:  # untrained: calibrate the borrowed neuron's offset to the requested CR
        offset = calibrate_offset(m, toks, a.cr, window)
        m.dms_config = m.dms_config.replace(alpha_offset=offset)
    ref_dms, out = logits()
    int8_dms, _ = logits(kv_int8=True)
    achieved = stats.compression_report([stats.kept_fraction(e.cpu(), window) for e in out.evicted]).ratio
    results["dms"] = {
        "alpha_offset": offset,
        "achieved_cr": achieved,
        "kl_int8_vs_full": kl(ref_dms, int8_dms),
        "kl_dms_vs_dense": kl(ref_dense, ref_dms),
        "kl_dms_int8_vs_dense": kl(ref_dense, int8_dms),
    }
    print(f"{folder}: {toks.shape[1]} tokens of Python stdlib source")
    print(f"  dense cache:  KL(full || int8 KV) = {results['dense']['kl_int8_vs_full']:.2e} nats/token")
    print(
        f"  DMS CR {achieved:.2f} (window {window}): KL(full || int8 KV) = {results['dms']['kl_int8_vs_full']:.2e}; "
        f"KL(dense || DMS) = {results['dms']['kl_dms_vs_dense']:.3f}; KL(dense || DMS+int8) = "
        f"{results['dms']['kl_dms_int8_vs_dense']:.3f}"
    )
    if a.out:
        json.dump(results, open(a.out, "w"), indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""Plain helper functions shared by the test modules (fixtures live in tests/conftest.py).

- tiny torchtune decoders with DMS (`tiny_model`) and the teacher-forced / greedy-cached comparison
  (`teacher_forced`, `greedy_cached`, `assert_matches_reference`);
- tiny Hugging Face models and folders (`make_hf`, `save_tiny_llama`, `tiny_tokenizer`);
- the retrofit recipe as a user runs it (`run_recipe`) and what it leaves behind (`log_lines`, `weights`).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dms_flex import stats
from dms_flex import torchtune_model as tm
from dms_flex.config import DMSConfig


# ============================================================================ tiny torchtune models
def tiny_model(
    family="llama",
    seed=0,
    decision="borrowed",
    window=3,
    scope="head",
    offset=0.0,
    heads=(4, 2),
    max_seq_len=96,
    vocab_size=64,
    embed_dim=32,
):
    """A 2-layer torchtune Llama-3 (or Qwen2) of width embed_dim (32) with DMS (alpha_scale 5, alpha_offset `offset`),
    weights N(0, 0.3) so that decisions and logits are far from zero; adapters random when used."""
    from torchtune.models.llama3._component_builders import llama3
    from torchtune.models.qwen2._component_builders import qwen2

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size,
        num_layers=2,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=2 * embed_dim,
    )
    m = (llama3(**kw) if family == "llama" else qwen2(**kw, rope_base=10000)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    tm.add_dms(m, DMSConfig(window=window, decision=decision, scope=scope, alpha_scale=5.0, alpha_offset=offset))
    if decision == "adapter":
        with torch.no_grad():
            for layer in m.layers:
                layer.attn.dms_adapter.linear.weight.normal_(0, 0.5)
    return m


def teacher_forced(m, tokens, **forward_kw):
    """(logits, hard decisions per layer) of the full-sequence DMS forward without noise."""
    out = tm.forward_train(m, tokens, training=False, **forward_kw)
    return tm.logits_of(m, out.hidden), out.evicted


def greedy_cached(m, prompt, steps, state=None, step=None, **prefill_kw):
    """Prefill `prompt` into `state` (a fresh InferenceState by default), then `steps` greedy decode steps
    through `step` (default tm.decode_step). Returns (prompt + generated tokens, logits of the prefill's
    last position and of every step (B, steps + 1, V), state)."""
    state = state or tm.InferenceState(m, prompt.shape[0])
    step = step or tm.decode_step
    logits = [tm.prefill(m, prompt, state, **prefill_kw)]
    toks = [prompt]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        toks.append(nxt)
        logits.append(step(m, nxt, state))
    return torch.cat(toks, 1), torch.stack(logits, 1), state


def assert_matches_reference(m, full, cached_logits, n_prompt, state, atol=2e-4, rtol=1e-4, **forward_kw):
    """Cached logits (from position n_prompt - 1 on) equal the teacher-forced ones over `full`, the greedy
    tokens are their argmax, and every cache holds exactly the tokens the hard rule keeps."""
    window = m.dms_config.effective_window
    ref_logits, evicted = teacher_forced(m, full, **forward_kw)
    # logits at prompt end and every decoded position equal the full-sequence DMS forward
    ref = ref_logits[:, n_prompt - 1 :]
    assert torch.allclose(cached_logits, ref, atol=atol, rtol=rtol), float((cached_logits - ref).abs().max())
    assert torch.equal(cached_logits.argmax(-1)[:, :-1], full[:, n_prompt:])
    # live slots equal the number of tokens the rule keeps, per row, layer and head
    seen = full.shape[1]
    for cache, ev in zip(state.caches, evicted):
        kept = stats.kept_fraction(ev, window) * seen
        assert torch.equal(cache.length, kept.round().long())


# ============================================================================ tiny Hugging Face models
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# original context 16 puts the 8 RoPE frequencies of head_dim 16 (theta 1e4) in all three
# bands of Llama-3.1 scaling (kept, smoothed, divided by the factor).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def hf_cases():
    """case name -> (config class, model class, config keys) of the tiny transformers models."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    return {
        "llama_untied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
        "llama_tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
        "llama_rope_llama3": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE)),
        "llama_tied_rope_llama3": (
            LlamaConfig,
            LlamaForCausalLM,
            dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
        ),
        "qwen2_untied": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
        "qwen2_tied": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    }


def __getattr__(name):
    """`CASES` (hf_cases()) on first use, so that importing this module does not import transformers."""
    if name == "CASES":
        return hf_cases()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def randomize_hf(model):
    """HF's init (std 0.02, zero biases, unit norms) gives near-zero logits that would hide errors."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def make_hf(case, **overrides):
    """A tiny random transformers model of `case` (see hf_cases), TINY's sizes unless overridden."""
    cfg_cls, model_cls, kw = hf_cases()[case]
    cfg = cfg_cls(**{**TINY, **kw, **overrides})
    return randomize_hf(model_cls(cfg)).eval()


def save_tiny_llama(
    folder, vocab_size, max_position_embeddings=512, tie_word_embeddings=False, seed=0, std=None, config_keys=None
):
    """Save a 2-layer Llama of width 32 (4 query, 2 KV heads) in Hugging Face format into `folder`:
    transformers' init under manual_seed(seed), or every weight N(0, std); `config_keys` are added to
    its config.json (e.g. DMS settings). Returns `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std)
    model.save_pretrained(folder)
    if config_keys:
        path = Path(folder) / "config.json"
        conf = json.loads(path.read_text())
        conf.update(config_keys)
        path.write_text(json.dumps(conf))
    return folder


def tiny_tokenizer():
    """A 3-word fast tokenizer: <unk> 0, hello 1, world 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


# ============================================================================ the retrofit recipe
def tune_cmd():
    exe = shutil.which("tune")
    return [exe] if exe else [sys.executable, "-m", "torchtune._cli.tune"]


def run_recipe(cwd, *args, nproc=None, timeout=300):
    """`tune run [--nproc_per_node N] dms_retrofit ARGS` in `cwd`; the CompletedProcess gets `.seconds`."""
    cmd = tune_cmd() + ["run"] + (["--nproc_per_node", str(nproc)] if nproc else []) + ["dms_retrofit", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    p.seconds = time.perf_counter() - t0
    return p


def log_lines(run_dir):
    """[(step, {metric: value})] from the run's torchtune log."""
    (log,) = sorted((Path(run_dir) / "logs").glob("log_*.txt"))
    rows = []
    for line in log.read_text().splitlines():
        m = re.match(r"Step (\d+) \| (.*)", line)
        if m:
            vals = dict(kv.split(":", 1) for kv in m.group(2).split())
            rows.append((int(m.group(1)), {k: float(v) for k, v in vals.items()}))
    return rows


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def eval_batch():
    """The recipes' eval batch of the tiny configs: two 256-token rows of packed stdlib sources."""
    from dms_flex import data as dms_data

    tok = dms_data.byte_tokenizer()
    packed = dms_data.PackedDocuments(
        dms_data.python_sources_dataset(tok, ["json", "textwrap", "bisect", "heapq"]),
        256,
        pad_id=tok.pad_id,
        max_rows=16,
    )
    return torch.utils.data.default_collate([packed[0], packed[1]])

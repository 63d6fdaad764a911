"""Reasoning-gym problems for `python -m dms_flex.eval` (``pip install reasoning-gym==0.1.25``): the items, their
solved examples (shots) and the answer extraction; reasoning-gym's own ``score_answer`` scores them.

Many shots make the prompts long: with ``--reasoning-shots 48`` a basic_arithmetic prompt of the embedded
SmolLM2's chat template is about 1,500 tokens, so a 64-token DMS window holds a small part of it and the
achieved CR on these inputs is a real one (benchmarks/RESULTS.md, section 15's reasoning column).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence


REASONING_GYM_HINT = "pip install reasoning-gym==0.1.25"
REASONING_INSTRUCTION = "Give only the final answer, with no explanation."
# held out from the retrofit's reasoning set (dms_flex.data builds it with seed 0)
REASONING_SEED = 1234


@dataclass
class ReasoningItem:
    task: str
    question: str
    entry: dict
    dataset: object  # the reasoning-gym dataset that scores it
    shots: List[tuple] = field(default_factory=list)  # (question, answer) worked examples shown first

    def score(self, answer: Optional[str]) -> float:
        return float(self.dataset.score_answer(answer=answer, entry=self.entry))


def reasoning_available() -> Optional[str]:
    """None if reasoning-gym imports, else why not."""
    if importlib.util.find_spec("reasoning_gym") is None:
        return f"reasoning-gym is not installed ({REASONING_GYM_HINT})"
    try:
        import reasoning_gym  # noqa: F401
    except Exception as e:  # a broken install: say so and skip
        return f"reasoning-gym does not import: {type(e).__name__}: {e}"
    return None


def reasoning_items(
    tasks: Sequence[str],
    per_task: int,
    seed: int = REASONING_SEED,
    task_kwargs: Optional[Dict[str, dict]] = None,
    shots: int = 0,
) -> List[ReasoningItem]:
    """per_task problems of each task; `shots` solved examples per task (drawn with another seed)
    go before each question: a small model follows the answer format from examples, not from rules."""
    import reasoning_gym

    unknown = sorted(set(tasks) - set(reasoning_gym.factory.DATASETS))
    if unknown:
        raise ValueError(f"unknown reasoning-gym task(s) {unknown}")
    items = []
    for task in tasks:
        kw = (task_kwargs or {}).get(task, {})
        ds = reasoning_gym.create_dataset(task, size=per_task, seed=seed, **kw)
        examples = []
        if shots:
            ex = reasoning_gym.create_dataset(task, size=shots, seed=seed + 1, **kw)
            examples = [(e["question"], str(e["answer"])) for e in ex]
        items += [ReasoningItem(task, e["question"], e, ds, examples) for e in ds]
    return items


def render_solved(tok, shots: Sequence[tuple], question: Optional[str] = None) -> List[int]:
    """Token ids of solved examples, each a user turn (its question and `REASONING_INSTRUCTION`) and an assistant
    turn (its answer), then `question` as the open last turn when given (with the template's generation prompt).
    A tokenizer without a chat template gets plain "Question: ...\nAnswer: ..." text. `tok` is a Hugging Face
    tokenizer. The evaluation's prompts (`dms_flex.eval.metrics.render_reasoning`) and the retrofit's solved
    conversations (`dms_flex.data.solved_reasoning_dataset`) are both rendered here, so they share one format."""

    def ask(q):
        return f"{q}\n{REASONING_INSTRUCTION}"

    if getattr(tok, "chat_template", None):
        msgs = []
        for q, a in shots:
            msgs += [{"role": "user", "content": ask(q)}, {"role": "assistant", "content": str(a)}]
        if question is not None:
            msgs.append({"role": "user", "content": ask(question)})
        ids = tok.apply_chat_template(msgs, add_generation_prompt=question is not None, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"Question: {ask(q)}\nAnswer: {a}\n\n" for q, a in shots)
    if question is not None:
        text += f"Question: {ask(question)}\nAnswer:"
    return list(tok(text, add_special_tokens=False)["input_ids"])


def extract_answer(text: str) -> str:
    """The answer in <answer> tags if any (reasoning-gym's convention), else the first non-empty line
    without a leading 'Answer:' and a trailing period."""
    m = re.findall(r"<answer>\s?(.*?)\s?</answer>", text, flags=re.DOTALL)
    if m:
        return m[-1].strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(the )?(final )?answer( is)?\s*[:=]?\s*", "", line, flags=re.IGNORECASE)
    return line.rstrip(".").strip()

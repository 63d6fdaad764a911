"""What a run records, and the checks of a resume.

Every step_NNNNNN/ and final/ holds a run record (retrofit_run.json: the run id, the step, the settings
that change the result (RESULT_KEYS) and the hash of the packed data); a step folder's recipe_state.pt
carries it too. A resumed run must be the same run: same settings, same data, step <= max_steps.
`resume_from=latest` takes the newest intact checkpoint of the run started last in output_dir, falling
back past damaged ones."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from dms_flex import checkpoints as ckpt
from dms_flex.config import DMSConfig

from .config_checks import RecipeError

RECIPE_STATE = "recipe_state.pt"
# in output_dir: which run was started there last and what the recipe wrote (anything else there is the
# user's, and refused without overwrite=true); in every step_NNNNNN/ and final/: the run that wrote it
RUN_RECORD = "retrofit_run.json"
STEP_RE = re.compile(r"^step_\d+$")
# the settings that change a run's result: a resumed run must have the same (the data are checked too)
RESULT_KEYS = (
    "checkpoint_dir",
    "model",
    "tokenizer",
    "dataset",
    "max_seq_len",
    "split_across_rows",
    "shuffle",
    "seed",
    "dms",
    "train_adapter_only",
    "optimizer",
    "lr_scheduler",
    "clip_grad_norm",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "dtype",
    "kd_temperature",
    "quant",
    "save_dtype",
)
_RESULT_DEFAULTS = {
    "split_across_rows": True,
    "shuffle": True,
    "train_adapter_only": False,
    "kd_temperature": 1.0,
    "save_dtype": "bf16",
}


class Resume(NamedTuple):
    """The checkpoint a run resumes: its folder, recipe state and run record (None: written before runs
    were recorded)."""

    folder: Path
    state: Dict[str, Any]
    record: Optional[Dict[str, Any]]


def result_settings(
    cfg: DictConfig, dms: DMSConfig, kv_int8: bool, base_weights: str, zeroing_steps: int = 0, lora=None
) -> Dict[str, Any]:
    """The settings that change a run's result (RESULT_KEYS), as JSON values: recorded in every
    checkpoint, and equal in a run that resumes it. The zeroing phase and LoRA are recorded when on
    (`zeroing_steps`, `lora`: a LoRASettings), so that checkpoints of runs without them still resume."""
    out: Dict[str, Any] = {}
    for key in RESULT_KEYS:
        node = cfg.get(key, _RESULT_DEFAULTS.get(key))
        out[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    out["dms"] = dms.to_dict()  # defaults filled in: an omitted field equals its default
    out["quant"] = {"kv_int8": kv_int8, "base_weights": base_weights}
    if zeroing_steps:
        out["zeroing_steps"] = zeroing_steps
    if lora is not None:
        out["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "modules": list(lora.modules), "dropout": lora.dropout}
    return json.loads(json.dumps(out, default=str))


def make_record(
    run_id: str, step: int, settings: Dict[str, Any], data: Dict[str, Any], world_size: int
) -> Dict[str, Any]:
    """The run record a checkpoint folder carries."""
    return {
        "recipe": "dms_retrofit",
        "run_id": run_id,
        "step": step,
        "settings": settings,
        "data": data,
        "world_size": world_size,
    }


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict) and value:
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def settings_diff(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """`key=value in the checkpoint, value now` for every setting that differs (dotted keys)."""
    a, b = _flatten(saved), _flatten(now)
    missing = object()
    return [
        f"{k}={a.get(k, '(unset)')!r} there, {b.get(k, '(unset)')!r} now"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


def describe_data(d: Dict[str, Any]) -> str:
    return (
        f"{d.get('documents', '?')} documents, {d.get('tokens', '?')} tokens in {d.get('rows', '?')} rows, "
        f"hash {str(d.get('sha256', '?'))[:12]}"
    )


def read_record(folder: Path) -> Optional[Dict[str, Any]]:
    """The run record of a checkpoint folder (None when missing or unreadable)."""
    try:
        record = json.loads((folder / RUN_RECORD).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "run_id" in record else None


def checkpoint_problem(folder: Path) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """(None, its recipe state) for an intact step folder; (what is wrong, None) for a damaged one
    (config.json, weights files or recipe_state.pt unreadable, e.g. truncated by a kill or a full disk)."""
    from safetensors import safe_open

    try:
        ckpt.read_hf_config(folder)
        for f in ckpt.weight_files(folder):
            with ckpt.safetensors_errors(f), safe_open(str(f), "pt"):
                pass
    except (FileNotFoundError, ValueError) as e:
        return str(e), None
    try:
        # mmap: only what is used is read (rank 0 reads the optimizer tensors, the others get their shards)
        state = torch.load(folder / RECIPE_STATE, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises (zip, pickle, mmap errors)
        return (
            f"{folder / RECIPE_STATE} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            None,
        )
    if not isinstance(state, dict) or "step" not in state:
        return f"{folder / RECIPE_STATE} is not a recipe state of dms_retrofit", None
    return None, state


# ---------------------------------------------------------------------------------------------- resume
def choose_resume(
    value, output_dir: Path, run_id: Optional[str], settings: Dict[str, Any], max_steps: int, log: Callable[[str], None]
) -> Optional[Resume]:
    """The checkpoint to resume (None: a new run). A checkpoint must be intact and of this run: the
    settings that change the result equal (RESULT_KEYS; the data are checked once loaded,
    check_resumed_state) and its step not past max_steps. `latest`: the newest intact checkpoint in
    output_dir of the run started there last (`run_id`; any run when output_dir records none)."""
    if value in (None, "", False):
        return None
    if str(value) == "latest":
        return latest_checkpoint(output_dir, run_id, settings, max_steps, log)
    folder = Path(os.path.expanduser(str(value))).absolute()
    if not (folder / RECIPE_STATE).is_file():
        raise RecipeError(
            f"resume_from={value}: {folder} holds no {RECIPE_STATE}; resume from a step_NNNNNN "
            f"folder that a run wrote (final/ is not resumable)"
        )
    problem, state = checkpoint_problem(folder)
    if problem:
        raise RecipeError(f"cannot resume from {folder}: {problem}")
    return accept_checkpoint(folder, state, settings, max_steps, log)


def latest_checkpoint(
    output_dir: Path, run_id: Optional[str], settings: Dict[str, Any], max_steps: int, log: Callable[[str], None]
) -> Resume:
    steps = sorted(
        (p for p in output_dir.glob("step_*") if p.is_dir() and STEP_RE.match(p.name)),
        key=lambda p: int(p.name[5:]),
        reverse=True,
    )
    others, damaged = [], []
    for folder in steps:
        record = read_record(folder)
        if record is None:
            others.append(
                f"{folder.name} (no {RUN_RECORD}: "
                f"{'written by an older version' if (folder / RECIPE_STATE).is_file() else 'incomplete'})"
            )
            continue
        if run_id is not None and record.get("run_id") != run_id:
            others.append(f"{folder.name} (run {record.get('run_id')})")
            continue
        problem, state = checkpoint_problem(folder)
        if problem:
            log(f"warning: {folder} is damaged ({problem}); looking for an older intact checkpoint")
            damaged.append(folder.name)
            continue
        if damaged:
            log(
                f"resume_from=latest: {', '.join(damaged)} damaged: falling back to {folder.name}, the "
                f"newest intact checkpoint of this run"
            )
        return accept_checkpoint(folder, state, settings, max_steps, log)
    whose = f"run {run_id}, the run last started there," if run_id else "any run"
    raise RecipeError(
        f"resume_from=latest: no intact checkpoint of {whose} in {output_dir}"
        + (f"; damaged: {', '.join(damaged)}" if damaged else "")
        + (
            f"; other checkpoints there: {', '.join(others[:4])}: resume one with resume_from=PATH (its settings "
            f"must equal this run's)"
            if others
            else ""
        )
        + "; or leave resume_from out to start a new run"
    )


def accept_checkpoint(
    folder: Path, state: Dict[str, Any], settings: Dict[str, Any], max_steps: int, log: Callable[[str], None]
) -> Resume:
    record = state.get("run") or read_record(folder)
    step = int(state["step"])
    if step > max_steps:
        raise RecipeError(
            f"cannot resume from {folder}: it is at step {step}, past max_steps={max_steps} "
            f"(a checkpoint of another run?)"
        )
    if record is None:
        log(
            f"warning: {folder} was written before runs were recorded: only its DMS settings can be "
            f"checked against this run's"
        )
    else:
        diff = settings_diff(record.get("settings", {}), settings)
        if diff:
            raise RecipeError(
                f"cannot resume from {folder}: it belongs to a run with other settings "
                f"({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}); resume with that run's "
                f"settings, or start a new run (leave resume_from out)"
            )
    return Resume(folder, state, record)


def check_resumed_state(
    folder: Path,
    state: Dict[str, Any],
    data_fingerprint: Dict[str, Any],
    dms: DMSConfig,
    world_size: int,
    log: Callable[[str], None],
) -> None:
    """Once the data are packed: the checkpoint's run trained on the same data, with the same DMS
    settings (a warning when the number of ranks differs)."""
    run = state.get("run")
    if run is not None and run.get("data", {}).get("sha256") != data_fingerprint["sha256"]:
        then, now = run.get("data", {}), data_fingerprint
        raise RecipeError(
            f"cannot resume from {folder}: its run trained on other data ({describe_data(then)}) "
            f"than this config gives ({describe_data(now)}): the dataset files or the data "
            f"settings changed; resume with that run's data, or start a new run"
        )
    if state["dms"] != dms.to_dict():
        diff = {k: (v, dms.to_dict()[k]) for k, v in state["dms"].items() if dms.to_dict()[k] != v}
        raise RecipeError(
            f"cannot resume from {folder}: its DMS settings differ from the config's (checkpoint, config): {diff}"
        )
    if state["world_size"] != world_size:
        log(
            f"warning: {folder} was written by {state['world_size']} rank(s), this run has "
            f"{world_size}: the data order and noise will differ from an uninterrupted run"
        )

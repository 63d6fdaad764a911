"""output_dir: checked at start-up, before anything is built or written, to hold nothing but what this
recipe wrote there (recorded in its run record, retrofit_run.json) unless overwrite=true; leftovers of
an interrupted atomic save are cleaned up (a folder that was being replaced gets its previous version
back); every entry the recipe writes is claimed in the run record first."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from dms_flex import checkpoints as ckpt

from .config_checks import RecipeError
from .run_record import RUN_RECORD, STEP_RE

_OURS_RE = re.compile(rf"^(step_\d+|final|{re.escape(RUN_RECORD)})$")  # what a temporary name may stand for


def read_manifest(output_dir: Path) -> Dict[str, Any]:
    path = output_dir / RUN_RECORD
    manifest = {"run_id": None, "written": [], "foreign": []}
    if not path.is_file():
        return manifest
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not (
            isinstance(data, dict)
            and data.get("recipe") == "dms_retrofit"
            and isinstance(data.get("written", []), list)
        ):
            raise ValueError("not a run record of dms_retrofit")
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"{path} is damaged ({e}): it records what this recipe wrote in {output_dir}; use a new "
            f"output_dir, or delete the file and pass overwrite=true"
        ) from None
    manifest.update(run_id=data.get("run_id"), written=[str(n) for n in data.get("written", [])])
    return manifest


def check_output_dir(output_dir: Path, overwrite: bool) -> Dict[str, Any]:
    """output_dir's run record, once output_dir is known to hold nothing but what this recipe wrote
    there (its run record lists it; step folders copied in to resume carry their own), or with
    overwrite=true: RecipeError otherwise, before anything is built or written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RecipeError(f"output_dir={output_dir} is a file: give a folder (a new one, or one this recipe wrote)")
    manifest = read_manifest(output_dir)
    if not output_dir.is_dir():
        return manifest
    foreign = []
    for entry in sorted(output_dir.iterdir()):
        temp = ckpt.TEMP_NAME_RE.match(entry.name)
        if entry.name in (RUN_RECORD, *manifest["written"]) or (temp and _OURS_RE.match(temp.group("name"))):
            continue
        if entry.is_dir() and STEP_RE.match(entry.name) and (entry / RUN_RECORD).is_file():
            continue  # a checkpoint of this recipe, copied here to be resumed
        foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    if foreign and not overwrite:
        raise RecipeError(
            f"output_dir={output_dir} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} this "
            f"recipe did not write ({', '.join(foreign[:6])}{', ...' if len(foreign) > 6 else ''}): "
            f"refusing to write there; choose a new or empty output_dir, or pass overwrite=true to "
            f"let this run replace what it writes (final/, step_NNNNNN/, kept_heatmap.png)"
        )
    manifest["foreign"] = foreign
    return manifest


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def clean_leftovers(output_dir: Path, log) -> None:
    """Remove what an interrupted save left in output_dir (the temporary folders and files of an
    atomic save); a folder that was being replaced and is missing gets its previous version back."""
    removed, restored = [], []
    for entry in sorted(output_dir.iterdir()):
        temp = ckpt.TEMP_NAME_RE.match(entry.name)
        if temp and _OURS_RE.match(temp.group("name")):
            target = output_dir / temp.group("name")
            if temp.group("kind") == "old" and entry.is_dir() and not target.exists():
                os.rename(entry, target)
                restored.append(target.name)
            else:
                _remove(entry)
                removed.append(entry.name)
        elif entry.is_dir() and (STEP_RE.match(entry.name) or entry.name == "final"):
            for inner in sorted(entry.iterdir()):
                if ckpt.TEMP_NAME_RE.match(inner.name):
                    _remove(inner)
                    removed.append(f"{entry.name}/{inner.name}")
    if restored:
        log(f"restored {', '.join(restored)} (a save was interrupted while it replaced them)")
    if removed:
        log(f"removed what an interrupted save left in {output_dir}: {', '.join(removed)}")


class OutputDir:
    """output_dir and its run record: checked when built (before anything is written); `prepare`,
    `claim` and `record_run` write (rank 0 only)."""

    def __init__(self, path: Path, overwrite: bool):
        self.path, self.overwrite = path, overwrite
        self.manifest = check_output_dir(path, overwrite)

    @property
    def run_id(self) -> Optional[str]:
        """The run started here last (None: output_dir records none)."""
        return self.manifest.get("run_id")

    def prepare(self, log_dir, log: Callable[[str], None]) -> None:
        """Create output_dir, clean leftovers of an interrupted save, claim the config copy and a log
        folder inside output_dir."""
        self.path.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.path, log)
        if self.manifest["foreign"]:
            log(
                f"overwrite=true: {self.path} holds entries this recipe did not write "
                f"({', '.join(self.manifest['foreign'][:6])}); the run replaces those it writes to"
            )
        self.claim("torchtune_config.yaml")
        if log_dir is not None:
            inside = Path(os.path.expanduser(str(log_dir))).absolute()
            if inside != self.path and self.path in inside.parents:
                self.claim(inside.relative_to(self.path).parts[0], replace=False)

    def record_run(self, run_id: str) -> None:
        self.manifest["run_id"] = run_id
        self._save()

    def claim(self, name: str, replace: bool = True) -> None:
        """Record in output_dir's run record that the recipe writes `name` there (rank 0), refusing an
        entry the recipe did not write (one that appeared after start-up) unless overwrite=true, which
        removes it first when `replace`."""
        if name in self.manifest["written"]:
            return
        path = self.path / name
        ours = path.is_dir() and STEP_RE.match(name) and (path / RUN_RECORD).is_file()
        if (path.exists() or path.is_symlink()) and not ours:
            if not self.overwrite:
                raise RecipeError(
                    f"{path} was not written by this recipe (it appeared during the run): refusing to "
                    f"replace it; move it away and resume with resume_from=latest, or pass "
                    f"overwrite=true"
                )
            if replace:
                _remove(path)
        self.manifest["written"] = sorted(set(self.manifest["written"]) | {name})
        self._save()

    def _save(self) -> None:
        data = {"recipe": "dms_retrofit", "run_id": self.manifest.get("run_id"), "written": self.manifest["written"]}
        tmp = self.path / f".{RUN_RECORD}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.path / RUN_RECORD)

"""Atomic folder writes: a folder appears complete or not at all, and readable like any other.

``write_folder_atomically(folder, fill)`` fills a temporary sibling and renames it into place (an
existing folder is swapped out by two renames, only once the new one is complete). An interrupted
write leaves ``.NAME.tmp-XXXX`` / ``.NAME.old-XXXX`` siblings (`TEMP_NAME_RE`), never a half-written
``folder``. ``make_readable`` gives the result the modes a plain mkdir / open would.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["TEMP_NAME_RE", "write_folder_atomically", "make_readable"]

# Files of an existing folder that a save replaces (everything else is carried over).
_WEIGHT_FILE_RE = re.compile(r"^(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?)$")
#: the temporary names an interrupted atomic save leaves behind: `.NAME.tmp-XXXX` (a folder or file being
#: written) and `.NAME.old-XXXX` (the folder being replaced, between the two renames)
TEMP_NAME_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9A-Za-z_]+$")


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_folder_atomically(
    folder,
    fill: Callable[[Path], None],
    *,
    carry_over: bool = True,
    marker: str = "config.json",
    kind: str = "a checkpoint",
) -> Path:
    """Create ``folder`` by running ``fill(tmp)`` on a temporary folder in the same parent, then
    renaming it into place. An existing ``folder`` stays untouched until the new one is complete;
    it is then swapped out by two renames (its files other than weights and the ones just written,
    e.g. tokenizer or generation config, are carried over when ``carry_over``). A non-empty
    existing folder is only replaced when it holds ``marker`` (it is ``kind``)."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is a file: pass a folder path")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).exists():
        raise ValueError(
            f"{folder} exists, is not empty and holds no {marker}: refusing to replace a folder "
            f"that is not {kind}; pass a new or empty folder"
        )
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        fill(tmp)
        make_readable(tmp)  # mkdtemp's 0700 (and safetensors' 0600 files) would hide it from others
        if carry_over and folder.is_dir():
            written = {p.name for p in tmp.iterdir()}
            for entry in folder.iterdir():
                if entry.name in written or _WEIGHT_FILE_RE.match(entry.name) or TEMP_NAME_RE.match(entry.name):
                    continue  # replaced, or left by an interrupted save
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        _fsync_tree(tmp)
        if folder.exists():
            old = parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def make_readable(root) -> None:
    """Give `root` and everything under it the modes a plain mkdir / open would (0777 / 0666 less the
    umask): mkdtemp makes 0700 folders and safetensors writes 0600 files, unreadable to the group
    and others although the folder around them is readable."""
    umask = os.umask(0)
    os.umask(umask)
    root = Path(root)
    if not root.is_dir():
        root.chmod((0o666 & ~umask) | (root.stat().st_mode & 0o111))
        return
    root.chmod(0o777 & ~umask)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, (0o666 & ~umask) | (os.stat(path).st_mode & 0o111))

"""The core (config, decisions, masks, losses, stats, cache, attention, kernels, the torchtune-free
inference loop) imports with torchtune and transformers unavailable: integrations depend on the core,
never the other way round (docs/design.md, "Where the rule lives")."""

import subprocess
import sys

CORE = [
    "dms_flex",
    "dms_flex.config",
    "dms_flex.decisions",
    "dms_flex.masks",
    "dms_flex.losses",
    "dms_flex.stats",
    "dms_flex.cache",
    "dms_flex.attention",
    "dms_flex.quant",
    "dms_flex.kernels",
    "dms_flex.kernels.reference",
    "dms_flex.kernels.prefill",
    "dms_flex.kernels.decode_update",
    "dms_flex.kernels.decode",
    "dms_flex.kernels.train_attention",
    "dms_flex.generate",
]

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchtune", "transformers"):
            raise ImportError(f"blocked for the layering test: {name}")
sys.meta_path.insert(0, Block())
import importlib
for m in MODS:
    importlib.import_module(m)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torchtune", "transformers"))
assert not bad, bad
print("ok")
"""


def test_core_imports_without_torchtune_and_transformers():
    code = BLOCKER.replace("MODS", repr(CORE))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_the_blocker_blocks():
    code = BLOCKER.replace("MODS", repr(["dms_flex.hf"]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "blocked for the layering test" in r.stderr

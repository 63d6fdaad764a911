"""``python -m dms_flex.pretrained export-adapter ...``: the former name of ``python -m dms_flex.checkpoints
export-adapter`` (the Python API lives in dms_flex.checkpoints)."""

import sys

from .checkpoints.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m dms_flex.pretrained"))

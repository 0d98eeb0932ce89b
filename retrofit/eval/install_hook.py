"""Write the .pth file that makes ``lm_eval --model retrofit`` work in this environment (run by `make setup`)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

PTH_NAME = "retrofit-lm-eval.pth"


def install() -> Path:
    hook_dir = Path(__file__).resolve().parent / "startup"
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    # A .pth line that is a path joins sys.path; a line starting with "import" runs at start-up.
    pth.write_text(f"{hook_dir}\nimport retrofit_lm_eval_hook\n")
    return pth


if __name__ == "__main__":
    print(f"wrote {install()}")

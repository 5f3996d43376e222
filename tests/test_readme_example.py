"""The README's Python-API example, copied as a newcomer would, runs (with fewer steps and less data)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# the example's sizes → a short run; everything else is the README's own text
SHRINK = {"max_steps=100": "max_steps=4", "every_n_steps=50": "every_n_steps=2", "step-50": "step-2", "max_bytes=8_000_000": "max_bytes=400_000"}


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_trains_and_resumes(tmp_path: Path) -> None:
    code = readme_example()
    for old, new in SHRINK.items():
        assert old in code, f"the README example no longer contains {old!r}: update SHRINK"
        code = code.replace(old, new)
    script = tmp_path / "example.py"
    script.write_text(code + '\nprint(f"rank {trainer.global_rank} done at step {trainer.global_step}")\n')
    # a fresh shell's environment: an earlier in-process run of this pytest may have set a port that is still taken
    launch_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE")
    env = {key: value for key, value in os.environ.items() if key not in launch_vars} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rank 0 done at step 4" in run.stdout
    assert (tmp_path / "ckpt" / "step-4" / ".metadata").exists()

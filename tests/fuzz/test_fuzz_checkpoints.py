"""The CI-size fuzz run: about 200 mutated and hostile checkpoints through the public loaders.

It runs in its own interpreter so that its peak memory is its own. ``make fuzz`` runs the larger
seeded run recorded in docs/security.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_fuzzed_checkpoints_never_traceback_run_code_or_blow_memory():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz.fuzz", "--count", "200", "--seed", "0",
                           "--max-rss-mb", "300"], capture_output=True, timeout=600, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    assert lines, proc.stderr.decode(errors="replace")[-3000:]
    result = json.loads(lines[-1])
    assert result["failures"] == [], result["failures"][:10]
    assert not result["payload_ran"]
    assert result["peak_growth_mb"] <= 300
    assert sum(result["outcomes"].values()) == 200
    # Every format was exercised, and valid variants still load.
    assert set(result["formats"]) == {"hf", "hf_sharded", "hostile", "legacy.pt", "lightning.ckpt", "st.safetensors",
                                      "train.pth", "zip.pt"}
    assert result["outcomes"].get("loaded", 0) > 0
    assert proc.returncode == 0

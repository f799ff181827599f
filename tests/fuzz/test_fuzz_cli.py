"""The CI-size command-line fuzz run: about 100 argument strings over every subcommand, one round of
two concurrent writers and one killed run followed by a rerun.

It runs in its own interpreter so that its peak memory is its own. ``make fuzz`` runs the larger
seeded run recorded in docs/security.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_RSS_MB = 1500


def test_fuzzed_command_lines_never_traceback_lose_rows_or_blow_memory():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz.cli_fuzz", "--count", "100", "--seed", "0",
                           "--writers", "1", "--kills", "1", "--processes", "2", "--max-rss-mb", str(MAX_RSS_MB)],
                          capture_output=True, timeout=900, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    assert lines, proc.stderr.decode(errors="replace")[-3000:]
    result = json.loads(lines[-1])
    assert result["failures"] == [], json.dumps(result["failures"][:10], indent=1)
    assert result["tracebacks"] == 0 and not result["payload_ran"]
    assert max(result["peak_rss_mb"], result["child_peak_rss_mb"]) <= MAX_RSS_MB
    # Every subcommand was fuzzed, with successes as well as refusals.
    assert set(result["per_command"]) == {"demo", "prune", "report", "score", "select", "tpv"}
    assert sum(result["exit_codes"].values()) == 100
    assert result["exit_codes"].get("0", 0) > 0 and result["exit_codes"].get("2", 0) > 0
    assert len(result["concurrent_rounds"]) == 1 and len(result["kill_rounds"]) == 1
    assert proc.returncode == 0

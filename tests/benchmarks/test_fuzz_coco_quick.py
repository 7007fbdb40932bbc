"""The COCO fuzz's quick mode: every targeted mutation of the reliability issue is refused in one line, and no
mutation (targeted or random) ends in another exception type, a long or multi-line message, or an error while
reading the items of a dataset that loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "fuzz_coco.py"


def test_quick_fuzz_of_coco_data_loads_or_refuses_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert result["failures"] == 0 and {c["outcome"] for c in cases} <= {"loads", "refused"}
    targeted = [c for c in cases if c["kind"] == "targeted"]
    assert len(targeted) >= 30 and all(c["outcome"] == "refused" for c in targeted)
    assert len(cases) - len(targeted) >= 25  # the valid data and the random mutations
    for c in cases:
        if c["outcome"] == "refused":
            assert c["error"] in ("ValueError", "FileNotFoundError") and c["message_chars"] <= 500, c
    names = {c["mutation"] for c in targeted}
    for wanted in ("duplicate image id", "category id 0", "png header 50000x50000", "json nested 200,000 deep",
                   "flip map index out of range", "rle negative count", "bbox a long number string"):  # fmt: skip
        assert wanted in names
    assert "mutation" in proc.stdout and "refused" in proc.stdout and f"wrote {out}" in proc.stdout

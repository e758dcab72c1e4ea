"""The README's demo runs and checks itself."""

import subprocess
import sys
from pathlib import Path


def test_demo(tmp_path):
    demo = Path(__file__).parent.parent / "examples" / "demo.py"
    proc = subprocess.run([sys.executable, str(demo), str(tmp_path / "work")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "demo OK" in proc.stdout and "exact tensors:     21 of 21" in proc.stdout

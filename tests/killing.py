"""Kill -9 a stage running in a subprocess once it has written N checkpoints."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from tasks.artifacts import PartWriter
from tests.conftest import ROOT


def kill_when(code: str, count: Callable[[], int], n: int, tmp_path: Path, timeout_s: float = 60) -> int:
    """Run `code` (a Python snippet) in a subprocess and SIGKILL it as soon as `count()` reaches `n`.
    Returns `count()` after the kill."""
    script = tmp_path / f"run_{n}.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(code)
                      + "\nprint('finished without being killed')\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    while time.time() < deadline and count() < n and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (out.decode()[-2000:], err.decode()[-2000:])
    return count()


def kill_after_parts(code: str, parts_dir: Path, n_parts: int, tmp_path: Path, timeout_s: float = 60) -> int:
    """Kill -9 `code` once it has written `n_parts` checkpoint parts into `parts_dir`; the parts on disk after."""
    return kill_when(code, lambda: len(PartWriter(parts_dir).existing()), n_parts, tmp_path, timeout_s)

"""The demo's exact pipeline (scripts/demo.sh, which `make demo` runs), on every CPU kernel
path this host offers: it answers the question right and prints no warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_kernels import ROOT, supported_capabilities

pytestmark = pytest.mark.real


def test_demo_answers_paris_quietly_on_every_capability(real_model, tmp_path):
    sli = Path(sys.executable).with_name("sli")
    assert sli.exists(), f"the sli entry point is not installed next to {sys.executable}"
    for cap in supported_capabilities():
        env = dict(os.environ, SLI=str(sli), ATEN_CPU_CAPABILITY=cap)
        env.pop("PYTHONWARNINGS", None)
        r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), str(tmp_path / "cache")], env=env,
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, (cap, r.stderr[-3000:])
        answer = r.stdout.split("Answer:", 1)[1].split("\n[", 1)[0]  # the generated text, before the stats line
        assert "Paris" in answer, (cap, answer)
        assert "verified" in r.stdout and "checksums ok" in r.stdout
        noisy = [ln for ln in (r.stdout + r.stderr).splitlines() if re.search(r"warn|deprecat", ln, re.I)]
        assert not noisy, (cap, noisy)

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: learning tests that take up to a few minutes on 2 CPU cores (run in CI)")


@pytest.fixture(scope="session")
def skeleton_toy_run(tmp_path_factory):
    """Run folder of skeleton_contrast.py's default toy command (seed 0, 1 thread), trained once for the learning
    tests that read it (its knn_vs_random_init.json and backbone.pth)."""
    out_dir = tmp_path_factory.mktemp("skeleton_toy") / "run"
    cmd = [sys.executable, os.path.join(ROOT, "skeleton_contrast.py"), "--seed", "0", "--out-dir", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out_dir

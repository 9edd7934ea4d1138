import os
import pathlib
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: learning tests that take up to a few minutes on 2 CPU cores (run in CI)")
    config.addinivalue_line("markers", "script_run(script, *args): the test reads this script run's folder "
                            "(`script_run` fixture); the run starts in the background when the session starts")


class ScriptRuns:
    """The script runs that the selected tests ask for (marker `script_run`), run one after another on a background
    thread, each in a fresh interpreter with one intra-op thread, while the other tests run in this process: on two
    cores the long learning runs no longer leave one core idle. Equal commands run once and are shared."""

    def __init__(self, base_dir):
        self.base_dir, self.runs, self.proc, self.stopped = base_dir, {}, None, False
        self.thread = threading.Thread(target=self._work, daemon=True)

    def add(self, command):
        if command not in self.runs:
            out_dir = os.path.join(self.base_dir, f"run{len(self.runs)}")
            self.runs[command] = dict(out_dir=out_dir, done=threading.Event(), error=None)
        return self.runs[command]

    def _work(self):
        for command, run in list(self.runs.items()):
            args = [a.replace("{out}", run["out_dir"]) for a in command[1:]]  # "{out}": the run's folder
            cmd = [sys.executable, os.path.join(ROOT, command[0]), *args, "--out-dir", run["out_dir"]]
            if not self.stopped:  # the limit catches a hang, not load
                self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                             env=dict(os.environ, OMP_NUM_THREADS="1"))
                try:
                    out, _ = self.proc.communicate(timeout=1800)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    out = self.proc.communicate()[0] + "\n(killed after 1800 s)"
                run["stdout"] = out
                if self.proc.returncode != 0:
                    run["error"] = f"{' '.join(cmd)} exited {self.proc.returncode}:\n{out[-5000:]}"
            run["done"].set()

    def wait(self, command):
        """-> (out_dir, stdout) of a finished run; a failed run fails the test with its output."""
        run = self.runs[command]
        run["done"].wait()
        assert run["error"] is None, run["error"]
        return pathlib.Path(run["out_dir"]), run["stdout"]

    def stop(self):
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def _command(marker):
    return tuple(str(a) for a in marker.args)


@pytest.fixture(scope="session", autouse=True)
def script_runs(request, tmp_path_factory):
    runs = ScriptRuns(str(tmp_path_factory.mktemp("script_runs")))
    for item in request.session.items:
        marker = item.get_closest_marker("script_run")
        if marker is not None:
            runs.add(_command(marker))
    runs.thread.start()
    yield runs
    runs.stop()


@pytest.fixture
def script_run(request, script_runs):
    """(out_dir, stdout) of this test's `script_run` marker's run (waits for it)."""
    return script_runs.wait(_command(request.node.get_closest_marker("script_run")))

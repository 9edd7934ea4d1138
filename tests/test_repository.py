"""The project speaks of itself only: no pointers outside the repository, no notes about who ran what where."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Assembled from pieces so that this file does not match itself.
FORBIDDEN = re.compile("|".join([r"\.\./" + "shared", "/work/" + "shared", "reference" + " notes",
                                 r"reference-" + r"implementations\.md", "docs" + "_wip",
                                 r"this (" + r"session|task)\b", "no GPU " + "was available"]), re.IGNORECASE)


def tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if f.endswith((".py", ".md", ".txt", ".ini")) or f.startswith(".ci/")]


def test_no_pointers_outside_the_repository():
    hits = []
    for name in tracked_text_files():
        with open(os.path.join(ROOT, name), encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if FORBIDDEN.search(line):
                    hits.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not hits, "project files point outside the repository:\n" + "\n".join(hits)


def test_readme_is_short_and_narrow():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 400, f"README.md has {len(lines)} lines (at most 400)"
    wide = [i + 1 for i, line in enumerate(lines) if len(line) > 120 and not line.startswith("|")]
    assert not wide, f"README.md lines wider than 120 characters: {wide[:10]}"

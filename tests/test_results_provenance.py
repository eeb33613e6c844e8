"""Every result names the commit its code is: in a checkout, and in a `git archive` export
(the snapshot a lent GPU runs), which has no .git and may sit inside another repository."""
from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from benchmarks.results import ARCHIVED_COMMIT, git_commit

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def head() -> str:
    try:
        return _git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.fail("these tests run in a git checkout of the project (CI clones it)")


def test_a_checkout_reports_its_head(head):
    assert git_commit(REPO).removesuffix("-dirty") == head


def test_an_export_inside_another_repository_reports_the_commit_it_was_exported_from(head, tmp_path):
    outer = tmp_path / "outer"
    outer.mkdir()
    _git("init", "-q", cwd=outer)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "unrelated", cwd=outer)
    archive = subprocess.run(["git", "archive", "HEAD", str(ARCHIVED_COMMIT)], cwd=REPO,
                             capture_output=True, check=True).stdout
    export = outer / "snapshot"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(export, filter="data")
    assert git_commit(export) == head
    assert _git("rev-parse", "HEAD", cwd=export) != head  # what git alone would have recorded

"""`.ci/gpu`, the GPU session's one prepared script, dry-run here (plumbing only): its preflight prints
one line per package before any test and stops with the missing piece named, never spending a device
call on an import error; bad phases are refused before any set-up."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO, child_env


def _gpu(*args: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", ".ci/gpu", *args], cwd=REPO, env=child_env(OUT=str(tmp_path), **env),
                          capture_output=True, text=True, timeout=300)


def test_check_prints_every_package_and_the_coalesced_methods(tmp_path):
    res = _gpu("check", tmp_path=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("torch", "pydantic_core", "pydantic_settings", "pytest_timeout", "cupy", "sklearn"):
        assert any(line.startswith(name + " ") for line in res.stdout.splitlines()), name
    assert "hasattr(Backend, 'all_gather_single_coalesced')" in res.stdout
    assert "preflight ok" in res.stdout and (tmp_path / "env.txt").is_file()
    assert (tmp_path / "pytest_args").read_text() in ("--timeout=180", "")  # --timeout only with pytest-timeout


def test_preflight_stops_with_the_missing_piece_named(tmp_path):
    res = _gpu("check", tmp_path=tmp_path, REQUIRE_CUDA="1")  # this machine has no CUDA device
    assert res.returncode == 3 and "STOP: missing a CUDA device" in res.stdout, res.stdout


def test_unknown_phase_is_refused_before_set_up(tmp_path):
    res = _gpu("run", "tests", "benchmark", tmp_path=tmp_path)
    assert res.returncode == 2 and "unknown phase 'benchmark'; valid: tests, study, bench" in res.stdout
    assert not (tmp_path / "env.txt").exists()  # nothing installed or probed

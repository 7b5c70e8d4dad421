"""metrics.jsonl read back after crashes and resumes (fastnet.metrics.read_metrics)."""

from __future__ import annotations

import json

import pytest

from fastnet.metrics import MetricsWriter, read_metrics


def _write(path, records, torn_after=None):
    lines = [json.dumps(r) for r in records]
    if torn_after is not None:
        lines.insert(torn_after, '{"kind": "step", "st')  # a line the crash cut short
    path.write_text("\n".join(lines) + "\n")


def test_a_resume_supersedes_the_crashed_sessions_later_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"kind": "step", "step": s} for s in (1, 2, 3)] + [{"kind": "epoch", "step": 3, "top1": 1.0}]
           + [{"kind": "step", "step": 4}, {"kind": "resume", "step": 3}]  # crashed after 4, resumed from 3
           + [{"kind": "epoch", "step": 3, "top1": 2.0}, {"kind": "step", "step": 4}, {"kind": "summary"}],
           torn_after=5)
    got = read_metrics(path)
    assert [(r["kind"], r.get("step")) for r in got] == [("step", 1), ("step", 2), ("step", 3), ("resume", 3),
                                                        ("epoch", 3), ("step", 4), ("summary", None)]
    assert next(r for r in got if r["kind"] == "epoch")["top1"] == 2.0  # the record written again wins
    assert len(read_metrics(path, superseded=True)) == 9  # everything that parses


def test_a_torn_line_elsewhere_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"kind": "step", "step": 1}, {"kind": "step", "step": 2}], torn_after=1)
    with pytest.raises(ValueError, match="line 2 is not a JSON record"):
        read_metrics(path)


def test_the_writer_ends_a_torn_last_line_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "step": 1}\n{"kind": "st')
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write("resume", step=1)
    writer.close()
    assert [r["kind"] for r in read_metrics(path)] == ["step", "resume"]

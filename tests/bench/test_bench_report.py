"""docs/BENCHMARKS.md keeps its hand-written text: `make bench` rewrites only its results section."""
from __future__ import annotations

from pathlib import Path

from bench.report import BEGIN, END, write_section


def test_write_section_replaces_only_the_marked_part(tmp_path: Path):
    doc = tmp_path / "BENCHMARKS.md"
    write_section(doc, f"{BEGIN}\nfirst\n{END}\n")
    doc.write_text("# Benchmarks\n\nnotes before\n\n" + doc.read_text().split("\n\n", 1)[1] + "\nnotes after\n")
    write_section(doc, f"{BEGIN}\nsecond\n{END}\n")
    text = doc.read_text()
    assert "second" in text and "first" not in text
    assert text.index("notes before") < text.index(BEGIN) < text.index(END) < text.index("notes after")
    assert text.count(BEGIN) == 1

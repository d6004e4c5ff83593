"""benchmarks/RESULTS.md is written by the benchmarks themselves: each owns one section between
its markers, replaced in place on every run (appended the first time)."""

from __future__ import annotations

from pathlib import Path


def markers(name: str, script: str) -> tuple[str, str]:
    """The BEGIN and END markers of benchmark `name`'s section, written by `script`."""
    return (
        f"<!-- BEGIN {name}: written by benchmarks/{script}, do not edit by hand -->",
        f"<!-- END {name} -->",
    )


def write_section(path: Path, name: str, script: str, section: str) -> None:
    """Replace (or append) benchmark `name`'s section of `path` with `section`."""
    begin, end = markers(name, script)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)

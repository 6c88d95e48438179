"""Results tables that benchmarks write into the README, between markers."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any


def replace_section(readme: str | pathlib.Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``.

    Raises ``ValueError`` if the markers are missing, so a renamed section is noticed.
    """
    path = pathlib.Path(readme)
    text = path.read_text()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {start} ... {end} section to update")
    path.write_text(pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text))


def markdown_table(header: list[str], rows: list[list[str]], numeric: int = 1) -> list[str]:
    """Lines of a markdown table whose last ``numeric`` columns (numbers) are right-aligned."""
    align = ["---"] * (len(header) - numeric) + ["---:"] * numeric
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def write_json(json_path: str | pathlib.Path, data: Any) -> pathlib.Path:
    """Write a benchmark's results (creating the folder) and say where."""
    path = pathlib.Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
    return path

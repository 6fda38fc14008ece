"""REPRODUCTION.md quotes tables that `pf2lora report` makes from the committed compact results.

Every table in REPRODUCTION.md under a marker ``<!-- pf2lora report FOLDER -->`` must
appear, line for line, in the report that ``pf2lora report FOLDER`` writes, FOLDER
being a compact study folder committed under ``reproduction/`` (analysis/compact.py).
So a table in the document can only change with the results it comes from.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from analysis.report import write_report

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^<!-- pf2lora report (\S+) -->$")


def quoted_tables(text: str) -> list[tuple[str, str]]:
    """(folder, table) for every marker: the first Markdown table after it."""
    lines, found = text.splitlines(), []
    for i, line in enumerate(lines):
        match = MARK.match(line.strip())
        if not match:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            j += 1
        table = []
        while j < len(lines) and lines[j].startswith("|"):
            table.append(lines[j])
            j += 1
        found.append((match.group(1), "\n".join(table)))
    return found


QUOTED = quoted_tables((ROOT / "REPRODUCTION.md").read_text())


def test_the_document_quotes_committed_results() -> None:
    assert QUOTED, "REPRODUCTION.md quotes no generated table"
    for folder, table in QUOTED:
        assert (ROOT / folder / "runs.parquet").is_file(), folder
        assert table.count("\n") >= 2, f"empty table under the marker for {folder}"
        size = sum(f.stat().st_size for f in (ROOT / folder).rglob("*") if f.is_file())
        assert size < 500_000, f"{folder} holds {size} bytes: not compact"


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    for folder in sorted({folder for folder, _ in QUOTED}):
        copy = tmp_path_factory.mktemp("compact") / Path(folder).name
        shutil.copytree(ROOT / folder, copy, ignore=shutil.ignore_patterns("*.md", "*.png"))
        write_report(copy)
        out[folder] = (copy / "report.md").read_text()
    return out


@pytest.mark.parametrize(("folder", "table"), QUOTED, ids=[f for f, _ in QUOTED])
def test_quoted_table_is_what_the_report_prints(folder: str, table: str, reports) -> None:
    assert table in reports[folder]

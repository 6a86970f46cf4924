"""The project's text speaks of the product: what saelib does and what it measured, never how it was
made (no work periods, issue numbers, lending of machines or times of work), and the README stays
short enough for a newcomer."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIARY = re.compile(r"\bsessions? [0-9]|the session that|\bissue[- ][0-9]+|\bissue's\b|been lent|[0-9]{1,2}:[0-9]{2}(-[0-9:]+)? UTC",
                   re.IGNORECASE)
README_CHARS = 12_500


def project_texts():
    yield from (ROOT / "README.md", ROOT / "CHANGELOG.md")
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted((ROOT / "saelib").rglob("*.py"))
    yield from sorted((ROOT / "notebooks").glob("*.ipynb"))


def text_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        return "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"])
    return path.read_text()


@pytest.mark.parametrize("path", [p for p in project_texts() if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_text_does_not_narrate_how_the_project_was_made(path):
    found = [line.strip() for line in text_of(path).splitlines() if DIARY.search(line)]
    assert found == []


def test_the_diary_pattern_catches_what_it_must():
    for line in ("as measured in session 9", "issue 4's budget", "the issue-4 reference run", "no GPU has been lent",
                 "the run at 06:00-06:09 UTC", "the issue's goals"):
        assert DIARY.search(line), line
    for line in ("one session of training", "an issue tracker", "lent to", "UTC timestamps"):
        assert not DIARY.search(line), line


def test_the_readme_is_short_and_gives_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= README_CHARS, len(text)
    assert "make demo" in text and "make test" in text

"""Claims in the README and the docs quote the recorded five-seed demo study: every difference
with its interval ("+22.31 [+17.24, +25.68]") they state is a row the study's script wrote to
docs/generated/demo_study.md, so a claim cannot outlive the numbers it cites."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "docs" / "generated" / "demo_study.md"
QUOTE = re.compile(r"[+-][0-9]+\.[0-9]{2} \[[+-][0-9]+\.[0-9]{2}, [+-][0-9]+\.[0-9]{2}\]")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_quoted_interval_is_a_row_of_the_recorded_study(page: Path):
    recorded = STUDY.read_text()
    for quote in QUOTE.findall(page.read_text()):
        assert quote in recorded, f"{page.name} quotes {quote}, which {STUDY.name} does not hold"


def test_the_readme_cites_the_study():
    quotes = QUOTE.findall((REPO / "README.md").read_text())
    assert len(quotes) >= 3
    assert "docs/generated/demo_study.md" in (REPO / "README.md").read_text()

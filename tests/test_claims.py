"""Claims in the README and the docs quote recorded measurements: every difference with its
interval ("+22.31 [+17.24, +25.68]") they state is a row a measuring script wrote under
docs/generated/ (the five-seed demo study, the sampler comparison), so a claim cannot outlive
the numbers it cites."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "docs" / "generated"
STUDY = GENERATED / "demo_study.md"
QUOTE = re.compile(r"[+-][0-9]+\.[0-9]{2} \[[+-][0-9]+\.[0-9]{2}, [+-][0-9]+\.[0-9]{2}\]")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_quoted_interval_is_a_recorded_row(page: Path):
    recorded = "\n".join(path.read_text() for path in GENERATED.glob("*.md"))
    for quote in QUOTE.findall(page.read_text()):
        assert quote in recorded, f"{page.name} quotes {quote}, which no file in generated/ holds"


def test_the_readme_cites_the_study():
    quotes = QUOTE.findall((REPO / "README.md").read_text())
    assert len(quotes) >= 3
    assert "docs/generated/demo_study.md" in (REPO / "README.md").read_text()

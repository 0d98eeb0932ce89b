"""The project's own documents: the algorithm notes the code cites are in the repository, every cited section
exists."""

from __future__ import annotations


def test_every_cited_section_of_the_algorithm_notes_exists():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    notes = (repo / "docs" / "algorithms.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", notes, flags=re.M))
    cited = {(str(path.relative_to(repo)), number)
             for path in [*(repo / "retrofit").rglob("*.py"), *(repo / "tests").glob("*.py")]
             for group in re.findall(r"docs/algorithms\.md ((?:§\d+(?:, )?)+)", path.read_text())
             for number in re.findall(r"§(\d+)", group)}
    assert cited and all(number in sections for _, number in cited), sorted(c for c in cited if c[1] not in sections)

"""The documentation stays true to what it describes: generated pages match their sources, the README keeps
the set-up commands CI reads from it, and every relative link leads somewhere."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
# the patterns .ci/run greps README.md with (grep -E); they mean the same in Python's re
SETUP_COMMANDS = {
    "main": r"^pip install .* && pip install -e \. && .*corda-surgery convert",
    "test": r'^pip install .* && pip install -e "\.\[test\]" && .*pytest',
}
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _make() -> ModuleType:
    """docs/make.py, loaded from its path (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("docs_make", DOCS / "make.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["cli", "architectures", "performance"])
def test_generated_page_is_current(page):
    expected = getattr(_make(), f"{page}_markdown")()
    actual = (DOCS / f"{page}.md").read_text() if (DOCS / f"{page}.md").exists() else ""
    assert actual == expected, f"docs/{page}.md differs from what docs/make.py generates: run python docs/make.py"


def test_distributed_page_quotes_the_measured_table():
    table = _make().results_table("distributed.json")
    assert table in (DOCS / "distributed.md").read_text(), (
        "docs/distributed.md's table differs from bench/results/distributed.json: copy it from docs/performance.md"
    )


def test_readme_is_a_short_front_door_with_the_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250, "README.md is the front door: keep it to 250 lines, move detail to docs/"
    bash_lines = {
        line for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S) for line in block.splitlines()
    }
    for name, pattern in SETUP_COMMANDS.items():
        found = re.search(pattern, text, re.M)
        assert found, f"the {name} set-up command that .ci/run greps for is missing from README.md"
        line = text[found.start() : text.index("\n", found.start())]
        assert line in bash_lines, f"the {name} set-up command must be a line of its own in a ```bash block"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_lead_to_existing_files_and_headings(page):
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_the_threat_model_names_tests_that_exist():
    text = (DOCS / "reliability.md").read_text()
    model = text[text.index("## Threat model") :]
    cited = set(re.findall(r"`(tests/\w+\.py)(?:::(\w+))?`", model))
    assert len(cited) >= 15
    for path, name in cited:
        source = (ROOT / path).read_text()
        assert not name or f"def {name}(" in source, f"docs/reliability.md cites {path}::{name}, which does not exist"

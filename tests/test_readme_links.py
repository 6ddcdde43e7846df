"""Every relative link and image in README.md, BENCHMARKS.md and docs/*.md points at a file of the repository."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML = re.compile(r"""<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")


def targets(page: Path):
    text = CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    for match in [*INLINE.finditer(text), *HTML.finditer(text)]:
        yield match.group(1)


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) and not target.startswith("#")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in targets(page):
        if not is_relative(target):
            continue
        path = (page.parent / unquote(target.split("#")[0])).resolve()
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files {broken}"


def test_readme_has_links_and_a_picture():
    found = list(targets(ROOT / "README.md"))
    assert any(t.endswith(".png") for t in found) and len(found) >= 5, found


def test_the_link_finder_sees_inline_and_html_links(tmp_path):
    page = tmp_path / "p.md"
    page.write_text('see [a](docs/x.md), ![b](img/y.png "t") and <img src="z.jpg">; `[not](code.md)`\n'
                    "```\n[nor](fenced.md)\n```\n")
    assert list(targets(page)) == ["docs/x.md", "img/y.png", "z.jpg"]

"""docs/architecture.md stays true to the import contracts that `make lint` enforces."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_PREFIX = "importlinter:contract:"


def _contracts() -> dict[str, configparser.SectionProxy]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    return {
        section.removeprefix(CONTRACT_PREFIX): config[section]
        for section in config.sections()
        if section.startswith(CONTRACT_PREFIX)
    }


def _contract_headings() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    contracts_part = text.split("\n## Import contracts\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^### (.+)$", contracts_part, flags=re.MULTILINE)


def test_the_import_linter_config_has_contracts() -> None:
    assert len(_contracts()) >= 5


def test_every_contract_is_described_in_the_architecture_doc() -> None:
    headings = _contract_headings()
    missing = [c["name"] for c in _contracts().values() if c["name"] not in headings]
    assert not missing, f"docs/architecture.md has no '### <name>' section for: {missing}"


def test_every_contract_the_doc_describes_is_enforced_or_marked_pending() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    enforced = {c["name"] for c in _contracts().values()}
    for heading in _contract_headings():
        if heading in enforced:
            continue
        section = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
        assert "Pending" in section, f"'{heading}' is neither in .importlinter nor marked pending"


def test_the_doc_names_every_package_the_acyclic_contract_covers() -> None:
    acyclic = [c for c in _contracts().values() if c["type"] == "acyclic_siblings"]
    assert acyclic, "no acyclic_siblings contract"
    text = (ROOT / "docs" / "architecture.md").read_text()
    for contract in acyclic:
        for ancestor in contract["ancestors"].split():
            package = ancestor.removeprefix("carrara.")
            assert f"`{package}`" in text, f"docs/architecture.md does not name `{package}`"


def test_code_comments_cite_documents_that_exist() -> None:
    cited = re.compile(r"\b(?:shared/)?([A-Za-z_/.-]+\.md)\b")
    for path in (ROOT / "platform" / "carrara").rglob("*.py"):
        for line in path.read_text().splitlines():
            for name in cited.findall(line):
                assert (ROOT / name).exists(), f"{path.relative_to(ROOT)} cites missing {name}"

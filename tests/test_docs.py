from pathlib import Path

from propensity.docs import render_sections, stale_sections

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_tables_match_the_code() -> None:
    assert stale_sections(README.read_text()) == []


def test_stale_section_is_detected_and_regenerated() -> None:
    text = "<!-- generated:event-schema -->\nold\n<!-- /generated:event-schema -->\n"
    assert "event-schema" in stale_sections(text)
    assert "event-schema" not in stale_sections(render_sections(text))


def test_readme_opens_with_exactly_two_commands() -> None:
    text = README.read_text()
    block = text.split("```", 2)[1]
    commands = [line for line in block.splitlines()[1:] if line.strip()]
    assert commands == ["make quickstart", "make test"]

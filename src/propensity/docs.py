"""Keep the README's reference tables generated from the code they describe.

``python -m propensity.docs README.md`` rewrites every block between
``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; the test suite
fails when the README and the code disagree.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["GENERATED_SECTIONS", "render_sections", "stale_sections"]


def _schema() -> str:
    from propensity.events.schema import schema_markdown

    return schema_markdown()


def _features() -> str:
    from propensity.features.definitions import feature_reference_markdown

    return feature_reference_markdown()


def _streaming() -> str:
    from propensity.features.definitions import streaming_reference_markdown

    return streaming_reference_markdown()


GENERATED_SECTIONS: dict[str, Callable[[], str]] = {
    "event-schema": _schema,
    "feature-reference": _features,
    "streaming-features": _streaming,
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated:{name} -->\n)(.*?)(<!-- /generated:{name} -->)", flags=re.DOTALL
    )


def render_sections(text: str) -> str:
    """Return ``text`` with every generated section replaced by fresh output."""
    for name, render in GENERATED_SECTIONS.items():
        body = render().rstrip("\n") + "\n"

        def _fill(match: re.Match[str], body: str = body) -> str:
            return match.group(1) + body + match.group(3)

        text = _pattern(name).sub(_fill, text)
    return text


def stale_sections(text: str) -> list[str]:
    """Names of generated sections that are missing or out of date in ``text``."""
    stale = []
    for name, render in GENERATED_SECTIONS.items():
        match = _pattern(name).search(text)
        if match is None or match.group(2) != render().rstrip("\n") + "\n":
            stale.append(name)
    return stale


if __name__ == "__main__":  # pragma: no cover
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(render_sections(readme.read_text()))

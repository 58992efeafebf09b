"""mkdocs hook: put each model's card (the module docstring of models/NAME.py) into the docs.

A line ``<!-- model-card: NAME -->`` in a page is replaced by the card of ``models/NAME.py`` as a
preformatted block, read with ``ast`` (nothing is imported), so the docs show the card exactly as
``help(ck.load_model(NAME))`` and the source file do. A missing model file or docstring fails the
build.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"^<!-- model-card: ([A-Za-z0-9_]+) -->$", re.MULTILINE)


def _card(models_dir: Path, name: str) -> str:
    path = models_dir / f"{name}.py"
    if not path.is_file():
        raise PluginError(f"model card: {path} not found")
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=True)
    if not doc:
        raise PluginError(f"model card: {path} has no module docstring")
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", doc)), default=0))
    return f"{fence}text\n{doc}\n{fence}"


def on_page_markdown(markdown, page, config, files):
    if "<!-- model-card:" not in markdown:
        return markdown
    models_dir = Path(config["config_file_path"]).parent / "models"
    return MARKER.sub(lambda m: _card(models_dir, m.group(1)), markdown)

"""mkdocs hook: show the few Sphinx roles in carkin's docstrings (``:class:`Claim```) as plain code.

The docstrings are prose rendered as Markdown (``docstring_style: null``), where a role would show
its ``:class:`` prefix in front of the code span; this drops the prefix from the rendered HTML.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(<code>)")


def on_page_content(html, page, config, files):
    return ROLE.sub(r"\1", html)

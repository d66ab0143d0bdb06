"""A griffe extension for the API reference: the docstrings' reST habits shown as Markdown.

The docstrings are written for ``help()`` and IDEs, with Sphinx roles (``:class:`~posthoc_cli.Recorder```)
and doctest examples (``>>> …``). Here a role becomes inline code of its target (the last part with ``~``),
and a run of doctest lines a Python code block, without the ``# doctest:`` directives.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj):`(~?)([^`]+)`")
DIRECTIVE = re.compile(r"\s*# doctest:.*$")


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target.lstrip('.')}`"


def markdown(text: str) -> str:
    out: list[str] = []
    in_doctest = False
    for line in ROLE.sub(_role, text).splitlines():
        stripped = line.lstrip()
        if stripped.startswith((">>> ", "... ")) or stripped in (">>>", "..."):
            if not in_doctest:
                out += ["```python"]
                in_doctest = True
            out.append(DIRECTIVE.sub("", stripped[4:]))
            continue
        if in_doctest:
            out.append("```")
            in_doctest = False
        out.append(line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


class ReSTToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)

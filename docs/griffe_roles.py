"""Griffe extension (mkdocs.yml): palm's docstrings are reStructuredText-flavoured; render their
Sphinx roles as cross-references and their literal-block markers as Markdown.

``:class:`~palm.core.errors.ConfigError``` becomes a link to that object's entry in the API
reference (``~``: shown by its last name); an unqualified ``:func:`validate``` is resolved in the
docstring's own scope (mkdocstrings' ``scoped_crossrefs``); a private name (``_x``, not in the
reference) or a builtin is shown as code. A target that no longer exists is an
unresolved cross-reference, which fails ``mkdocs build --strict``. ``text::`` before an indented
block becomes ``text:`` (the block itself is already Markdown's indented code).
"""

from __future__ import annotations

import builtins
import re

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|exc|obj|const):`(~?)([\w.]+?)(\(\))?`")
LITERAL = re.compile(r"(\S)::$|^\s*::$", re.MULTILINE)


def convert(text: str) -> str:
    def role(m):
        tilde, target, call = m.group(2), m.group(3), m.group(4) or ""
        shown = (target.rsplit(".", 1)[-1] if tilde else target) + call
        if target.rsplit(".", 1)[-1].startswith("_") or target in dir(builtins):
            return f"`{shown}`"   # private (not in the reference) or Python's own: named, not linked
        return f"[`{shown}`][{target}]"
    text = ROLE.sub(role, text)
    return LITERAL.sub(lambda m: f"{m.group(1)}:" if m.group(1) else "", text)


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj, loader, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)

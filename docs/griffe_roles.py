"""Griffe extension (mkdocs.yml): palm's docstrings are reStructuredText-flavoured; render their
Sphinx roles as cross-references and their literal-block markers as Markdown.

``:class:`~palm.core.errors.ConfigError``` becomes a link to that object's entry in the API
reference (``~``: shown by its last name); an unqualified ``:func:`validate``` is resolved in the
docstring's own scope (mkdocstrings' ``scoped_crossrefs``); a private name (``_x``, not in the
reference) or a builtin is shown as code. A target that no longer exists is an
unresolved cross-reference, which fails ``mkdocs build --strict``. ``text::`` before an indented
block becomes ``text:`` (the block itself is already Markdown's indented code); a simple table
(``====  ====``) becomes a Markdown table.
"""

from __future__ import annotations

import builtins
import re

try:
    import griffe
except ImportError:  # the docs extra is not installed: the converters still work (tests/test_docs.py)
    griffe = None

ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|exc|obj|const):`(~?)([\w.]+?)(\(\))?`")
LITERAL = re.compile(r"(\S)::$|^\s*::$", re.MULTILINE)


BORDER = re.compile(r"^=+(?: +=+)+ *$")


def simple_tables(text: str) -> str:
    """reST simple tables (``====  ====`` borders; a row's continuation lines leave the first column
    blank) as Markdown tables, the first column the header's ``|  |`` (the tables have no header)."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if not BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        starts = [m.start() for m in re.finditer(r"=+", lines[i])]
        rows, i = [], i + 1
        while i < len(lines) and not BORDER.match(lines[i]):
            line = lines[i]
            cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
            if rows and not cells[0]:
                rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
            elif line.strip():
                rows.append(cells)
            i += 1
        i += 1  # the closing border
        out += ["| " + " | ".join(" " for _ in starts) + " |", "|" + "---|" * len(starts)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def convert(text: str) -> str:
    def role(m):
        tilde, target, call = m.group(2), m.group(3), m.group(4) or ""
        shown = (target.rsplit(".", 1)[-1] if tilde else target) + call
        if target.rsplit(".", 1)[-1].startswith("_") or target in dir(builtins):
            return f"`{shown}`"  # private (not in the reference) or Python's own: named, not linked
        return f"[`{shown}`][{target}]"

    text = ROLE.sub(role, simple_tables(text))
    return LITERAL.sub(lambda m: f"{m.group(1)}:" if m.group(1) else "", text)


if griffe is not None:

    class SphinxRoles(griffe.Extension):
        def on_object(self, *, obj, loader, **kwargs) -> None:
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value)

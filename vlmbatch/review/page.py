"""Writing a self-contained page: Jinja2 templates from the package (autoescaping on), the stylesheet
and the one script inline, and a Content-Security-Policy that allows those two by their hashes, images
from data: URIs (and the page's own folder) and nothing else: no network, no other script."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import jinja2
from jinja2.utils import htmlsafe_json_dumps
from markupsafe import Markup

from vlmbatch.sinks.atomic import output_errors, write_atomically


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("vlmbatch.review", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def source_hash(text: str) -> str:
    """A CSP source expression allowing exactly the inline element whose content is `text`."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(style: str, script: str | None, files: bool) -> str:
    images = "data: 'self'" if files else "data:"
    return (f"default-src 'none'; style-src {source_hash(style)}; "
            f"script-src {source_hash(script) if script is not None else chr(39) + 'none' + chr(39)}; "
            f"img-src {images}; base-uri 'none'; form-action 'none'")


def json_chunks(items: Iterable[Any]) -> Iterator[Markup]:
    """A JSON array, item by item, safe inside <script type="application/json"> (`<`, `>`, `&` and `'`
    are escaped as Jinja's `tojson` escapes them), so a large one is never held whole."""
    yield Markup("[")
    for number, item in enumerate(items):
        yield Markup(("," if number else "") + htmlsafe_json_dumps(item, dumps=_compact))
    yield Markup("]")


def _compact(value: Any, **kwargs) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def write_page(path: Path, template: str, *, script: str | None = None, files: bool = False,
               **context: Any) -> None:
    """Render `template` into `path` (atomically), streaming: `context` may hold generators."""
    env = environment()
    # Read, not rendered: these are no templates, and the page carries exactly the text that is hashed.
    style = env.loader.get_source(env, "report.css")[0]
    code = env.loader.get_source(env, script)[0] if script else None
    page = env.get_template(template).generate(
        style=Markup(style), script=Markup(code) if code is not None else None,
        csp=content_security_policy(style, code, files), **context)

    def write(file) -> None:
        for chunk in page:
            file.write(chunk.encode("utf-8"))

    check_writable(path)
    write_atomically(path, write)


def check_writable(path: Path) -> None:
    """Refuse, before any work, a page that could not be written (no folder, a folder in its place)."""
    with output_errors(path):
        if not path.parent.is_dir():
            raise FileNotFoundError(2, "no such folder", str(path.parent))
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder", str(path))
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(13, "permission denied", str(path.parent))

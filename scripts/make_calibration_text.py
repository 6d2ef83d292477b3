"""Write sli's default calibration text, ``sli/data/calibration.txt``: docstrings of CPython's
standard library (PSF License 2.0; see ``sli/data/NOTICE``).

Deterministic for a given Python: a fixed list of modules, members in sorted order,
docstrings of at least 80 characters, each once. The pydoc topics (``pydoc_data``, the text
``sli validate`` and ``sli bench --quality`` score) and ``builtins`` (whose docstrings the
topics paraphrase) are never read.

    python scripts/make_calibration_text.py [--tokens-at-least 110000]
"""

from __future__ import annotations

import argparse
import warnings
import importlib
import inspect
import sys
from pathlib import Path

MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar cmd codecs collections collections.abc colorsys "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis email "
    "email.message enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext glob graphlib gzip "
    "hashlib heapq hmac html html.parser http.client http.cookies http.server imaplib importlib inspect io "
    "ipaddress itertools json logging logging.handlers lzma mailbox math mimetypes multiprocessing netrc "
    "numbers operator optparse os pathlib pickle pkgutil platform plistlib poplib pprint profile pstats queue "
    "quopri random re reprlib sched secrets selectors shelve shlex shutil signal smtplib socket socketserver "
    "sqlite3 ssl stat statistics string struct subprocess sysconfig tarfile tempfile textwrap threading "
    "timeit tokenize tomllib trace traceback types typing unittest unittest.mock urllib.parse urllib.request "
    "uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zipimport zoneinfo"
).split()
EXCLUDED = ("pydoc_data", "builtins", "pydoc")


def docstrings(per_module: int) -> list[str]:
    """Docstrings, at most ``per_module`` characters from each module (so every module has its share)."""
    seen: set[str] = set()
    out: list[str] = []
    used = {"n": 0}

    def add(title: str, doc: str | None) -> None:
        if doc and len(doc) >= 80 and doc not in seen and used["n"] < per_module:
            seen.add(doc)
            out.append(f"{title}\n\n{doc}")
            used["n"] += len(doc)

    for name in MODULES:
        assert not name.startswith(EXCLUDED), name
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        used["n"] = 0
        add(name, inspect.getdoc(mod))
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if getattr(obj, "__module__", name) in EXCLUDED or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            add(f"{name}.{attr}", inspect.getdoc(obj))
            if inspect.isclass(obj):
                for m in sorted(vars(obj)):
                    if not m.startswith("_"):
                        add(f"{name}.{attr}.{m}", inspect.getdoc(getattr(obj, m, None)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "sli" / "data" / "calibration.txt"))
    ap.add_argument("--chars", type=int, default=480_000, help="stop after this many characters")
    ap.add_argument("--per-module", type=int, default=5_000, help="characters taken from one module at most")
    a = ap.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)  # typing.io, typing.re
    text, n = [], 0
    for d in docstrings(a.per_module):
        text.append(d)
        n += len(d) + 2
        if n >= a.chars:
            break
    Path(a.out).write_text("\n\n".join(text) + "\n", encoding="utf-8")
    print(f"{a.out}: {n} characters, {len(text)} docstrings, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

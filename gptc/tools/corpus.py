"""The default training corpus shipped inside the package.

`gptc/data/corpus.txt.gz` holds 21 plays of Shakespeare (the tragedies and the
histories, about 3 MB of plain ASCII English text), so `gptc train` works with
no network and no data of the user's. Provenance, licence and checksums are in
`gptc/data/CORPUS.md`.

`gptc/data/` is a plain data folder, not a Python package: the file is found
next to this module (source checkout with PYTHONPATH=., or a normal install),
and through importlib.resources otherwise (e.g. a zipped install).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from gptc.common import PACKAGE_DIR

CORPUS_FILE = "corpus.txt.gz"


def default_corpus_path() -> Path:
    """Path of the gzip-compressed default corpus inside the installed package."""
    path = PACKAGE_DIR / "data" / CORPUS_FILE
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"default corpus not found at {path}: reinstall gptc (the wheel ships gptc/data/{CORPUS_FILE})"
    )


def _read_compressed() -> bytes:
    try:
        return default_corpus_path().read_bytes()
    except FileNotFoundError:
        from importlib import resources

        try:
            res = resources.files(__package__ or "gptc") / "data" / CORPUS_FILE
            return res.read_bytes()
        except (FileNotFoundError, ModuleNotFoundError, TypeError, AttributeError):
            raise FileNotFoundError(
                f"default corpus gptc/data/{CORPUS_FILE} is missing: reinstall gptc"
            ) from None


def default_corpus_text() -> str:
    """The default training corpus as one str (UTF-8, '\\n' line endings)."""
    return gzip.decompress(_read_compressed()).decode("utf-8")

"""On-disk cache of compiled code objects, shared by hiprtc and NVRTC.

Key: sha256 over (format version, compiler name + version, arch, options, source),
each field length-prefixed so that no two different tuples hash the same bytes.
Location: ``$GPTC_CACHE_DIR/kernels``, default ``~/.cache/gptc/kernels``; one file per
entry, ``<key[:2]>/<key>.co``. Set ``GPTC_CACHE_DIR=off`` (or pass KernelCache(None))
to disable the cache.

Entry layout: MAGIC (8 bytes) | sha256(payload) (32 bytes) | len(payload) (8 bytes,
little endian) | payload. Entries are written with gptc.common.write_atomic, so
readers see either nothing or a whole entry, also when several processes compile
the same kernel at once. An entry whose magic, length or checksum is wrong
(truncated by a full disk, a crash of an older writer, bit rot) is deleted and
reported as a miss: the caller recompiles; a bad entry is never returned.
"""
from __future__ import annotations

import hashlib
import os
import struct
import warnings
from pathlib import Path
from typing import Sequence

from gptc.common import write_atomic

FORMAT_VERSION = 1
MAGIC = b"GPTCCO1\n"
_HEADER = struct.Struct("<8s32sQ")
DEFAULT = object()  # KernelCache(root=DEFAULT): the directory default_cache_dir() names


def cache_root() -> Path | None:
    """gptc's cache directory: $GPTC_CACHE_DIR, default ~/.cache/gptc; None when
    GPTC_CACHE_DIR=off. Kernels, tokenized corpora and bundles live below it."""
    env = os.environ.get("GPTC_CACHE_DIR")
    if env is not None and env.strip().lower() in ("off", "0", "none", "disabled"):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptc"


def default_cache_dir() -> Path | None:
    """The kernel cache directory (cache_root()/kernels); None when caching is off."""
    root = cache_root()
    return None if root is None else root / "kernels"


def cache_key(source: str, arch: str, compiler: str, options: Sequence[str]) -> str:
    """sha256 hex digest identifying one compilation."""
    h = hashlib.sha256()
    for field in (f"gptc-cache-v{FORMAT_VERSION}", compiler, arch, *options, "\0source\0", source):
        data = field.encode("utf-8")
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


class KernelCache:
    """A directory of code objects keyed by cache_key(). Thread- and process-safe."""

    def __init__(self, root: str | os.PathLike | None | object = DEFAULT):
        """root: a directory; DEFAULT: default_cache_dir(); None: caching off."""
        if root is DEFAULT:
            root = default_cache_dir()
        self.root = Path(root).expanduser() if root is not None else None  # type: ignore[arg-type]
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self._warned: set[str] = set()

    def _warn(self, kind: str, message: str) -> None:
        """One warning per kind of trouble: an unusable cache would otherwise warn per kernel."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"gptc kernel cache: {message}", RuntimeWarning, stacklevel=3)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.co"

    def get(self, key: str) -> bytes | None:
        """The payload stored under key, or None (missing, disabled, or corrupt: then deleted)."""
        if self.root is None:
            return None
        p = self.path(key)
        try:
            blob = p.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as e:  # unreadable: treat as a miss, let put() try to replace it
            self._warn("read", f"cannot read {p}: {e} (kernels compile without the cache)")
            self.misses += 1
            return None
        payload = _unpack(blob)
        if payload is None:
            self.corrupt += 1
            self.misses += 1
            self._warn("corrupt", f"corrupt entry {p} deleted; recompiling")
            try:
                p.unlink()
            except OSError:
                pass
            return None
        self.hits += 1
        return payload

    def put(self, key: str, payload: bytes) -> None:
        """Store payload atomically. Failures to write only warn: the cache is an optimisation."""
        if self.root is None:
            return
        p = self.path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(p, _HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload)) + payload)
        except OSError as e:
            self._warn("write", f"cannot write {p}: {e} (compiled kernels are not kept)")


def _unpack(blob: bytes) -> bytes | None:
    if len(blob) < _HEADER.size:
        return None
    magic, digest, length = _HEADER.unpack_from(blob)
    payload = blob[_HEADER.size:]
    if magic != MAGIC or length != len(payload) or hashlib.sha256(payload).digest() != digest:
        return None
    return payload


_default_cache: KernelCache | None = None


def default_cache() -> KernelCache:
    """The process-wide cache at default_cache_dir(), re-read if GPTC_CACHE_DIR changes."""
    global _default_cache
    root = default_cache_dir()
    if _default_cache is None or _default_cache.root != root:
        _default_cache = KernelCache(root)
    return _default_cache

"""The test suite itself: it keeps out of the user's ~/.cache/gptc, and the ROCm bridge
that hiprtc needs is still found there."""
from __future__ import annotations

import os
from pathlib import Path

from gptc.runtime.cache import cache_root

USER_CACHE = Path.home() / ".cache" / "gptc"


def test_the_suite_writes_no_cache_of_the_user(private_cache_dir):
    # (a developer's own GPTC_CACHE_DIR is kept; subprocesses inherit the variable)
    assert cache_root() == private_cache_dir != USER_CACHE
    assert os.environ["GPTC_CACHE_DIR"] == str(private_cache_dir)


def test_the_rocm_bridge_is_not_moved_by_the_private_cache():
    from gptc.runtime import hip
    expected = Path(os.environ.get("GPTC_ROCM_BRIDGE", "~/.cache/gptc/rocm-bridge")).expanduser()
    assert hip.BRIDGE_DIR == expected

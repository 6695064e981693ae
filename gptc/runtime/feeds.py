"""Checks on the values fed to a step, shared by the GPU executor and the NumPy reference."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from gptc.spec import GptcError


class InputError(GptcError):
    """A value fed to a step cannot be run, e.g. a token id outside the vocabulary."""


def check_bounds(feeds: Mapping[str, np.ndarray], bounds: Mapping[str, int]) -> None:
    """Refuse ids outside [0, bound) for each bounded input: on a GPU they would read and
    write out of bounds, and NumPy would read a wrong row or raise an IndexError."""
    for name, bound in bounds.items():
        ids = np.asarray(feeds[name])
        outside = (ids < 0) | (ids >= bound)
        if outside.any():
            at = tuple(int(i) for i in np.argwhere(outside)[0])
            raise InputError(f"{name}: id {ids[at]} at {list(at)} is outside [0, {bound})")

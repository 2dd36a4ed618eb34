"""Errors as users see them in ComfyUI."""
from __future__ import annotations

import functools


def user_errors(execute):
    """A node's execute whose ValueError subclasses (MismatchError, LayerError, OutputError, ...) reach ComfyUI
    as ValueError with the same message: ComfyUI shows an exception's type with its module, and a custom node's
    modules are named by its folder's path (`/.../ComfyUI-LiteFFN.calibration.fingerprint.MismatchError`)."""
    @functools.wraps(execute)
    def run(cls, *args, **kwargs):
        try:
            return execute(cls, *args, **kwargs)
        except ValueError as e:
            if type(e) is ValueError:
                raise
            raise ValueError(str(e)) from e
    return run

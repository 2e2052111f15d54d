"""Module modes: run a block in eval mode and put every submodule's own flag back after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Eval mode inside the block (if ``enabled``); afterwards each submodule's ``training`` flag
    is restored as it was, so models with mixed modes (e.g. frozen BatchNorm) stay as they were."""
    if not enabled:
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag

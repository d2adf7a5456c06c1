"""Building something before the student exists without moving the random generators the student is built with.

llm-foundry builds a YAML's algorithms and data loaders before its model, and a Python caller seeds before calling
:func:`~composer_kd.distill`; a teacher initialised from the global generator there would change the student's
initial weights. :func:`preserved_rng` gives every generator back as it was found.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ['preserved_rng']


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block, then put every random generator back in the state it had before: torch's CPU generator,
    the current CUDA device's when CUDA is available, Python's ``random`` and NumPy's global generator.

    Only the current CUDA device's generator is saved (reading another device's would create a context on it, on
    every rank); a teacher built on another device draws from that device's generator.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.rng import preserved_rng

            torch.manual_seed(0)
            expected = torch.rand(1)
            torch.manual_seed(0)
            with preserved_rng():
                torch.nn.Linear(4, 4)  # its weights are drawn from the global generator
            assert torch.equal(torch.rand(1), expected)
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

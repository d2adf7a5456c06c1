"""How the multi-process workers end: every rank waits for the others, then closes the process group itself.

A gloo process group left for the interpreter's exit to tear down has aborted a rank now and then ("terminate called
without an active exception") after its work was done, failing a launch whose results were all written.
"""

from __future__ import annotations

import torch.distributed


def leave_process_group() -> None:
    """Wait for every rank, then close the process group (nothing outside a launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

"""The processes of one `accelerate launch` or `torchrun`: who leads and who follows.

Only the main process talks to MLflow: it decides what runs, and logs it. Each piece of work
that all processes share (training an adapter data-parallel, generating a share of the images)
is a call the main process sends to the others (`run_shared`); they wait for calls in
`follow_main_process` and run them alongside it. A single process (no launcher) just runs them.
"""

import os
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

T = TypeVar("T")


def is_launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@cache
def process_state() -> PartialState:
    # Without `cpu`, accelerate treats CPU processes of a launcher as one process each.
    return PartialState(cpu=not torch.cuda.is_available())


def is_follower() -> bool:
    return is_launched() and not process_state().is_main_process


def run_shared(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`work(*args, **kwargs)` here and, in a launch, in every other process too. `work` must
    be a module-level function and its arguments picklable."""
    if is_launched() and process_state().is_main_process:
        broadcast_object_list([(work, args, kwargs)])
    return work(*args, **kwargs)


def follow_main_process() -> None:
    """Runs the main process's shared calls until it releases this process."""
    while True:
        call = [None]
        broadcast_object_list(call)
        if call[0] is None:
            _leave_group()
            return
        work, args, kwargs = call[0]
        work(*args, **kwargs)


def release_followers() -> None:
    """Tells the other processes that no more work is coming (the main process, when its
    command has finished; on a failure it exits instead and the launcher stops the others)."""
    if is_launched() and process_state().is_main_process:
        broadcast_object_list([None])
        _leave_group()


def _leave_group() -> None:
    # Left to the interpreter's exit, the process group's threads can abort the process
    # ("terminate called without an active exception") after its work is done. The barrier
    # first: no process tears its connections down while another still reads the last call.
    state = process_state()
    state.wait_for_everyone()
    state.destroy_process_group()

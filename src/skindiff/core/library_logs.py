"""Library log messages that are harmless in skindiff's use, dropped around the call of
skindiff's that makes them, and only there.

A message is named by the logger a library logs it with and the start of its text
(`LibraryMessage`); `without_messages` drops those records during a block. Every other record
of the same logger, and the same message from any other call, still shows: a warning a user
can act on is never hidden. The libraries log these through `logging` (transformers' and
diffusers' loggers, MLflow's), not `warnings`.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class LibraryMessage:
    logger: str  # the logger's name, e.g. "diffusers.loaders.lora_base"
    start: str  # the message's text starts with this


class _Drop(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


@contextmanager
def without_messages(*messages: LibraryMessage) -> Iterator[None]:
    """Drops the records of `messages` during the block. A logger's filters see the records it
    logs itself (not its children's), so each message's own logger gets one."""
    starts: dict[str, list[str]] = {}
    for message in messages:
        starts.setdefault(message.logger, []).append(message.start)
    filters = {name: _Drop(tuple(texts)) for name, texts in starts.items()}
    for name, drop in filters.items():
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    finally:
        for name, drop in filters.items():
            logging.getLogger(name).removeFilter(drop)

"""A worker's functions and scattered values, kept by digest and decoded on first use.

Each arrives once per worker (the broker tracks which it sent where), so a
value is kept until the broker says its last owner is gone.
"""
from __future__ import annotations

import threading
from typing import Any

from . import serialize
from .errors import TransferError

_MISSING = object()


class ObjectStore:
    """Functions and scattered values by digest, decoded on first use."""

    def __init__(self) -> None:
        self._raw: dict[bytes, list] = {}
        self._decoded: dict[bytes, Any] = {}
        self._altered: dict[bytes, str] = {}  # digest -> why it was not kept
        self._lock = threading.Lock()
        #: build plain data only (a --registered-only worker; see shoal.tasks.safe_loads)
        self.safe = False

    def add(self, digest: bytes, frames: list) -> None:
        self._raw[digest] = frames

    def has(self, digest: bytes) -> bool:
        return digest in self._raw or digest in self._decoded

    def refuse(self, digest: bytes, why: str) -> None:
        """Remember that ``digest`` arrived altered: tasks that use it fail saying so."""
        self._altered[digest] = why

    def forget(self, digests) -> None:
        for d in digests:
            self._raw.pop(d, None)
            self._decoded.pop(d, None)
            self._altered.pop(d, None)

    def get(self, digest: bytes) -> Any:
        value = self._decoded.get(digest, _MISSING)
        if value is _MISSING:
            with self._lock:
                value = self._decoded.get(digest, _MISSING)
                if value is _MISSING:
                    frames = self._raw.get(digest)
                    if frames is None:
                        if digest in self._altered:
                            raise TransferError(self._altered[digest])
                        raise LookupError(f"object {digest.hex()} was never sent to this worker")
                    value = serialize.loads(frames, safe=self.safe)
                    self._decoded[digest] = value
        return value

"""Idempotency stores: where the receiver remembers which events were handled.

``MemoryStore`` (the default) serves one process; ``SQLiteStore`` the worker processes of one
machine; ``RedisStore`` many machines. All follow the contract in :mod:`.base`.
"""

from __future__ import annotations

from .base import Claim, ClaimState, Store
from .memory import MemoryStore

__all__ = ["Claim", "ClaimState", "MemoryStore", "Store"]

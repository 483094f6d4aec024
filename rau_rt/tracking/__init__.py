"""Streaming SAM2 tracking: the bounded memory bank (and, next, the Tracker over a bundle)."""

from rau_rt.tracking.memory import MemoryBank, MemoryConfig, MemoryFeeds

__all__ = ["MemoryBank", "MemoryConfig", "MemoryFeeds"]

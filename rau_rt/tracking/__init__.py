"""Streaming SAM2 tracking: the bounded memory bank and the Tracker over a bundle's graphs."""

from rau_rt.tracking.memory import MemoryBank, MemoryConfig, MemoryFeeds
from rau_rt.tracking.tracker import STAGES, Tracker, TrackerConfig, TrackStep

__all__ = ["STAGES", "MemoryBank", "MemoryConfig", "MemoryFeeds", "TrackStep", "Tracker",
           "TrackerConfig"]

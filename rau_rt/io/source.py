"""`Source`, the base of every frame source (`rau_rt.io.sources` opens them; the DICOM source
lives in `rau_rt.io.dicom`). Its own module, so that both build on it without importing each
other."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from rau_rt.types import Frame


class Source(ABC):
    """An iterable of `Frame`s; a context manager that releases the file or device."""

    def __init__(self, uri: str, fps: float | None, frame_count: int | None) -> None:
        self.uri = uri
        self.fps = fps  # nominal frame rate, None when the source does not say
        self.frame_count = frame_count  # None for live or unknown-length sources

    @abstractmethod
    def __iter__(self) -> Iterator[Frame]:
        """Frames in order; a live source runs until closed."""

    def close(self) -> None:  # noqa: B027 (sources without resources need nothing)
        """Release the file, device or connection (idempotent)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, fps={self.fps}, frames={self.frame_count})"

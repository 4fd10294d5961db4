"""Update streams in flight, and those a broken link cut, kept so that the silo can resume them.

One stream per silo at a time (each buffers up to a model's size). A stream is known by its key
(session, phase, payload digest, units, sizes): a resume must match all of them and say how many
chunks it already sent, so that nothing from another attempt, phase or payload is ever mixed in.
What a closed phase left unfinished is dropped (:meth:`UploadStreams.forget_interrupted`). Not
thread-safe on its own: the coordinator calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fcmoe.errors import ProtocolError
from protos import codec
from protos.codec import TensorSpec


@dataclass
class UpdateStream:
    """One silo's update being received; kept when its link breaks, so it can resume where it stopped."""

    key: tuple  # (session, phase, payload digest, units, sizes): a resume must match all of them
    assembler: codec.TensorAssembler
    deadline: float = 0.0


class UploadStreams:
    def __init__(self) -> None:
        self._open: set[str] = set()  # silos with a stream in flight
        self._interrupted: dict[str, UpdateStream] = {}  # cut streams of the open phase

    def is_open(self, silo: str) -> bool:
        return silo in self._open

    def admit(self, silo: str, key: tuple, specs: Mapping[str, TensorSpec], resume_chunks: int,
              deadline: float) -> tuple[UpdateStream, bool]:
        """A fresh stream, or (``resume_chunks`` > 0) the interrupted one of this key holding exactly that
        many chunks; returns it and whether it resumes. The caller must call :meth:`close` at its end."""
        if silo in self._open:  # e.g. its link broke and this end has not noticed yet: retry shortly
            raise ProtocolError(f"silo {silo!r} still has an update stream open", "UNAVAILABLE")
        kept = self._interrupted.pop(silo, None)
        if resume_chunks:
            held = kept.assembler.chunks_received if kept is not None and kept.key == key else 0
            if held != resume_chunks:
                raise ProtocolError(f"cannot resume at chunk {resume_chunks}: {held} chunks of this "
                                    "payload are held; send it from the start")
            assert kept is not None
            stream, resumed = kept, True
        else:
            stream, resumed = UpdateStream(key, codec.TensorAssembler(specs)), False
        self._open.add(silo)
        stream.deadline = deadline
        return stream, resumed

    def close(self, silo: str) -> None:
        self._open.discard(silo)

    def keep(self, silo: str, stream: UpdateStream) -> None:
        """The link broke mid-stream: keep what arrived (the caller checked its phase is still open)."""
        self._interrupted[silo] = stream

    def progress(self, silo: str, key: tuple) -> tuple[int, int]:
        """(chunks, bytes) an interrupted stream of this key holds; (0, 0): start over."""
        kept = self._interrupted.get(silo)
        if kept is None or kept.key != key:
            return 0, 0
        return kept.assembler.chunks_received, kept.assembler.bytes_received

    def forget_interrupted(self) -> None:
        self._interrupted = {}

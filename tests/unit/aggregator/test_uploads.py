"""aggregator/uploads.py: one stream per silo, and a cut stream resumed only with its own key and count."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.uploads import UploadStreams
from fcmoe.errors import ProtocolError
from protos import codec
from protos.codec import TensorSpec

SPECS = {"u": TensorSpec("float32", (64,))}
PAYLOAD = {"u": np.arange(64, dtype=np.float32)}
KEY = (3, "uploading", b"digest", ("u",), (64,))


def test_one_stream_per_silo_and_a_cut_one_resumes_where_it_stopped():
    streams = UploadStreams()
    stream, resumed = streams.admit("a", KEY, SPECS, 0, deadline=10.0)
    assert not resumed and streams.is_open("a") and stream.deadline == 10.0
    with pytest.raises(ProtocolError, match="still has an update stream open") as caught:
        streams.admit("a", KEY, SPECS, 0, deadline=10.0)
    assert caught.value.status == "UNAVAILABLE"
    streams.admit("b", KEY, SPECS, 0, deadline=10.0)  # another silo is not held up
    chunks = list(codec.encode(PAYLOAD, chunk_bytes=64))
    for chunk in chunks[:2]:
        stream.assembler.add(chunk)
    streams.keep("a", stream)
    streams.close("a")
    assert streams.progress("a", KEY) == (2, 128) and streams.progress("a", (4, *KEY[1:])) == (0, 0)
    again, resumed = streams.admit("a", KEY, SPECS, 2, deadline=20.0)
    assert resumed and again is stream and again.deadline == 20.0
    for chunk in chunks[2:]:
        again.assembler.add(chunk)
    np.testing.assert_array_equal(again.assembler.finish()["u"], PAYLOAD["u"])


@pytest.mark.parametrize("key, chunks", [((4, *KEY[1:]), 2), (KEY, 1), (KEY, 3)])
def test_a_resume_of_another_key_or_count_is_refused_and_the_kept_part_dropped(key, chunks):
    streams = UploadStreams()
    stream, _ = streams.admit("a", KEY, SPECS, 0, deadline=1.0)
    for chunk in list(codec.encode(PAYLOAD, chunk_bytes=64))[:2]:
        stream.assembler.add(chunk)
    streams.keep("a", stream)
    streams.close("a")
    with pytest.raises(ProtocolError, match=f"cannot resume at chunk {chunks}: "):
        streams.admit("a", key, SPECS, chunks, deadline=1.0)
    assert streams.progress("a", KEY) == (0, 0) and not streams.is_open("a")


def test_a_closed_phase_forgets_what_it_left_unfinished():
    streams = UploadStreams()
    stream, _ = streams.admit("a", KEY, SPECS, 0, deadline=1.0)
    stream.assembler.add(next(codec.encode(PAYLOAD, chunk_bytes=64)))
    streams.keep("a", stream)
    streams.close("a")
    streams.forget_interrupted()
    assert streams.progress("a", KEY) == (0, 0)
    with pytest.raises(ProtocolError, match="0 chunks of this payload are held"):
        streams.admit("a", KEY, SPECS, 1, deadline=1.0)

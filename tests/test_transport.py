"""The transport's bundling of small frames (shoal.transport): pure functions, then
a real pair of ZeroMQ sockets."""
from __future__ import annotations

import struct

import pytest
import zmq

from shoal import protocol
from shoal.protocol import SIGNATURE_SIZE, Kind
from shoal.transport import (BUNDLE_MAX, MalformedBundle, MessageTooLarge, bundle, recv_frames,
                             send_frames, unbundle)

pytestmark = pytest.mark.timeout(20)

KEY = b"k" * 32
BIG = bytes(range(256)) * (BUNDLE_MAX // 256 + 1)  # travels as a frame of its own


def results(frames: list) -> list:
    """A signed RESULTS message carrying ``frames``, one per unit."""
    entries = [[i, "ok", 1, {}] for i in range(len(frames))]
    return protocol.encode(KEY, Kind.RESULTS, {"r": entries}, frames)


def test_a_batch_of_small_frames_travels_as_signature_and_one_bundle():
    message = results([b"a", b"", b"ccc"])
    wire = bundle(message)
    assert len(wire) == 2
    assert wire[0][:SIGNATURE_SIZE] == message[0]
    assert wire[1] == b"".join(message[1:])
    assert unbundle(wire) == message
    msg = protocol.decode(KEY, unbundle(wire))
    assert msg.frames == [b"a", b"", b"ccc"]


def test_large_frames_keep_their_place_and_travel_apart():
    message = results([BIG, b"x", BIG + b"2", b"y", b"z"])
    wire = bundle(message)
    assert len(wire) == 4  # signature and layout, the bundle, the two large frames
    assert wire[2] is message[2] and wire[3] is message[4]
    assert unbundle(wire) == message


def test_a_message_of_few_small_frames_goes_as_it_is():
    message = results([b"only one"])  # the header and one frame
    assert bundle(message) is message
    assert unbundle(message) is message
    lone_small = results([BIG, BIG, b"x"])  # two small frames, the header included
    assert bundle(lone_small) is lone_small


def test_routing_frames_stay_in_front_untouched():
    message = [b"route", *results([b"a", b"b", b"c"])]
    wire = bundle(message, envelope=1)
    assert wire[0] == b"route" and len(wire) == 3
    assert unbundle(wire, envelope=1) == message


@pytest.mark.parametrize("layout, separate, why", [
    (struct.pack("<2I", 1, 1) + b"\x00", [], "whole number"),
    (struct.pack("<2I", 1, 5), [], "covers 6 of its 3"),
    (struct.pack("<2I", 1, 1), [], "covers 2 of its 3"),
    (struct.pack("<2I", 3, 0xFFFFFFFF), [], "more separate frames"),
    (struct.pack("<1I", 3), [b"extra"], "0 of its 1 separate"),
])
def test_a_layout_that_does_not_add_up_is_refused(layout, separate, why):
    with pytest.raises(MalformedBundle, match=why):
        unbundle([b"s" * SIGNATURE_SIZE + layout, b"abc", *separate])


def test_a_tampered_layout_yields_frames_whose_signature_fails():
    wire = bundle(results([b"aa", b"bb", b"cc"]))
    count = (len(wire[0]) - SIGNATURE_SIZE) // 4
    lengths = list(struct.unpack_from(f"<{count}I", wire[0], SIGNATURE_SIZE))
    lengths[-1] -= 1  # one byte moved from the last frame into the one before
    lengths[-2] += 1
    forged = [wire[0][:SIGNATURE_SIZE] + struct.pack(f"<{count}I", *lengths), wire[1]]
    with pytest.raises(protocol.ProtocolError, match="bad signature"):
        protocol.decode(KEY, unbundle(forged))


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    a.bind("inproc://bundles")
    b.connect("inproc://bundles")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def test_over_a_socket_the_receiver_gets_the_frames_that_were_sent(pair):
    a, b = pair
    message = results([b"one", BIG, b"", b"three"])
    send_frames(a, message)
    assert b.poll(5000)
    raw = b.recv_multipart(copy=False)
    assert len(raw) == 3  # what travelled: signature and layout, bundle, the large frame
    send_frames(a, message)
    assert b.poll(5000)
    got = recv_frames(b)
    assert [bytes(f) for f in got] == message
    assert bytes(protocol.decode(KEY, got).frames[1]) == BIG


def test_a_bundle_counts_its_frames_against_the_receivers_limit(pair):
    a, b = pair
    send_frames(a, results([b"x"] * 50))  # 52 frames, 2 on the wire
    assert b.poll(5000)
    with pytest.raises(MessageTooLarge, match="52 frames"):
        recv_frames(b, max_frames=20, max_bytes=1 << 20)

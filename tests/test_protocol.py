"""Unit tests of the signed wire protocol (shoal.protocol): pure functions, no sockets."""
from __future__ import annotations

import msgpack
import pytest

from shoal import protocol
from shoal.protocol import (BIG_FRAME, PROTOCOL_VERSION, SIGNATURE_SIZE, Kind, ProtocolError,
                            VersionMismatch, decode, encode)

pytestmark = pytest.mark.timeout(10)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def sample(frames=(b"payload", b"buffer")) -> list:
    return encode(KEY, Kind.SUBMIT, {"u": [[1, [b"d" * 16], 1, {}]]}, frames)


def flip(data, index: int) -> bytes:
    raw = bytearray(bytes(data))
    raw[index] ^= 0x01
    return bytes(raw)


# ----------------------------------------------------------------- round trip
def test_encode_decode_round_trip_keeps_kind_fields_and_frames():
    frames = [b"payload", b"", b"x" * 100]
    msg = decode(KEY, encode(KEY, Kind.RESULTS, {"r": [[7, "ok", 3, {"t": 0.5}]]}, frames))
    assert msg.kind == Kind.RESULTS
    assert msg.header["r"] == [[7, "ok", 3, {"t": 0.5}]]
    assert msg.header["v"] == PROTOCOL_VERSION
    assert [bytes(f) for f in msg.frames] == frames


def test_round_trip_of_message_without_frames():
    msg = decode(KEY, encode(KEY, Kind.STATUS))
    assert msg.kind == Kind.STATUS and msg.frames == []


def test_round_trip_of_big_frame_carries_its_digest_in_the_signed_header():
    big = bytes(range(256)) * (BIG_FRAME // 256 + 1)
    wire = encode(KEY, Kind.SUBMIT, {}, [b"small", big])
    header = msgpack.unpackb(wire[1], strict_map_key=False)
    assert set(header["bd"]) == {1}
    msg = decode(KEY, wire)
    assert bytes(msg.frames[1]) == big


def test_signature_is_hmac_sha256_sized():
    assert len(sample()[0]) == SIGNATURE_SIZE == 32


def test_every_message_kind_round_trips():
    for kind in Kind.ALL:
        assert decode(KEY, encode(KEY, kind)).kind == kind


def test_frame_digests_reindexes_a_slice_of_big_frames():
    big = b"z" * BIG_FRAME
    msg = decode(KEY, encode(KEY, Kind.SUBMIT, {}, [b"a", big, b"b", big]))
    assert protocol.frame_digests(msg.header, 1, 3) == {0: protocol.frame_digest(big)}
    assert protocol.frame_digests(msg.header, 2, 3) == {}


# ----------------------------------------------------------------- rejection
def test_decode_rejects_message_signed_with_another_key():
    with pytest.raises(ProtocolError, match="signature"):
        decode(KEY, encode(OTHER_KEY, Kind.SUBMIT, {}, [b"payload"]))


@pytest.mark.parametrize("index", [0, 5, -1])
def test_decode_rejects_a_flipped_header_byte(index):
    wire = sample()
    wire[1] = flip(wire[1], index)
    with pytest.raises(ProtocolError):
        decode(KEY, wire)


@pytest.mark.parametrize("frame", [2, 3])
def test_decode_rejects_a_flipped_payload_byte(frame):
    wire = sample()
    wire[frame] = flip(wire[frame], 0)
    with pytest.raises(ProtocolError, match="signature"):
        decode(KEY, wire)


def test_decode_rejects_a_flipped_signature_byte():
    wire = sample()
    wire[0] = flip(wire[0], 31)
    with pytest.raises(ProtocolError, match="signature"):
        decode(KEY, wire)


def test_decode_rejects_a_message_missing_its_last_frame():
    with pytest.raises(ProtocolError):
        decode(KEY, sample()[:-1])


def test_decode_rejects_a_message_of_one_frame():
    with pytest.raises(ProtocolError, match="truncated"):
        decode(KEY, sample()[:1])


def test_decode_rejects_an_empty_message():
    with pytest.raises(ProtocolError, match="truncated"):
        decode(KEY, [])


def test_decode_rejects_an_extra_frame_appended():
    with pytest.raises(ProtocolError):
        decode(KEY, sample() + [b"extra"])


def test_decode_rejects_an_extra_big_frame_appended():
    with pytest.raises(ProtocolError):
        decode(KEY, sample() + [b"e" * BIG_FRAME])


@pytest.mark.parametrize("garbage", [
    [b"garbage"], [b"\x00" * 32, b"\xc1\xc1"], [b"a" * 32, b"b" * 100, b"c"],
    [b"", b""], [b"\xff" * 32, b"\x81\xa1v\x01"],
])
def test_decode_rejects_garbage_bytes(garbage):
    with pytest.raises(ProtocolError):
        decode(KEY, garbage)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_decode_rejects_a_signature_of_the_wrong_length(length):
    wire = sample()
    wire[0] = (bytes(wire[0]) * 3)[:length]
    with pytest.raises(ProtocolError, match="signature"):
        decode(KEY, wire)


def test_decode_rejects_a_tampered_big_frame_when_verifying_buffers():
    big = b"\x00" * (BIG_FRAME * 2)
    wire = encode(KEY, Kind.RESULTS, {"r": []}, [b"head", big])
    wire[3] = flip(wire[3], len(big) // 2)
    with pytest.raises(ProtocolError, match="digest"):
        decode(KEY, wire, verify_buffers=True)


def test_an_altered_big_frame_names_the_frame_and_keeps_only_the_intact_ones():
    # The header is authentic, so a receiver can answer what it names (fail those
    # tasks) without ever touching the altered bytes.
    big = b"\x00" * BIG_FRAME
    wire = encode(KEY, Kind.TASKS, {"u": [[7, [b"f" * 16], 2, {}]]}, [b"head", big, big])
    wire[3] = flip(wire[3], 100)
    with pytest.raises(protocol.FrameAltered, match="altered in transit") as info:
        decode(KEY, wire)
    assert info.value.altered == [1]
    assert info.value.message.header["u"] == [[7, [b"f" * 16], 2, {}]]
    assert info.value.message.frames[0] == b"head" and info.value.message.frames[2] == big
    assert info.value.message.frames[1] is None


def test_an_altered_big_frame_sent_again_is_refused_as_a_replay():
    guard = protocol.ReplayGuard()
    big = b"\x00" * BIG_FRAME
    wire = encode(KEY, Kind.RESULTS, {"r": []}, [big])
    wire[2] = flip(wire[2], 5)
    with pytest.raises(protocol.FrameAltered):
        decode(KEY, wire, guard=guard)
    with pytest.raises(protocol.Replayed):
        decode(KEY, wire, guard=guard)


@pytest.mark.parametrize("frames", [[b"ab", b"cd"], [b"", b"abcd"], [b"abc", b"", b"d"]],
                         ids=["two", "empty-first", "three"])
def test_moving_bytes_between_frames_breaks_the_signature(frames):
    wire = encode(KEY, Kind.STATUS, {}, frames)
    joined = b"".join(frames)
    for cut in range(len(joined) + 1):
        moved = [joined[:cut], joined[cut:]] + [b""] * (len(frames) - 2)
        if moved == frames:
            continue
        with pytest.raises(ProtocolError, match="bad signature"):
            decode(KEY, [wire[0], wire[1], *moved])


def test_bytes_moved_between_the_header_and_the_first_frame_break_the_signature():
    wire = encode(KEY, Kind.STATUS, {}, [b"body"])
    with pytest.raises(ProtocolError, match="bad signature"):
        decode(KEY, [wire[0], bytes(wire[1]) + b"b", b"ody"])


def test_a_peer_of_protocol_version_1_is_told_both_versions():
    # Version 1 signed the frames' bytes without their lengths: its messages fail the
    # signature check, yet are recognised, so the peer is told what is wrong.
    import hashlib
    import hmac
    raw = msgpack.packb({"v": 1, "k": Kind.CLIENT_HELLO, "nf": 1, "sid": b"s" * 8, "seq": 1})
    mac = hmac.new(KEY, raw, hashlib.sha256)
    mac.update(b"frame")
    with pytest.raises(VersionMismatch, match=f"version 1, this process speaks {PROTOCOL_VERSION}"):
        decode(KEY, [mac.digest(), raw, b"frame"])


def test_decode_without_buffer_verification_leaves_big_frames_to_the_receiver():
    # The broker routes big buffers unhashed; the digest stays in the header and the
    # final receiver (verify_buffers=True) rejects the tampered frame.
    big = b"\x00" * BIG_FRAME
    wire = encode(KEY, Kind.RESULTS, {"r": []}, [big])
    wire[2] = flip(wire[2], 10)
    routed = decode(KEY, wire, verify_buffers=False)
    forwarded = encode(KEY, Kind.RESULTS, {"r": []}, routed.frames,
                       protocol.frame_digests(routed.header, 0, 1))
    with pytest.raises(ProtocolError, match="digest"):
        decode(KEY, forwarded, verify_buffers=True)


def test_decode_rejects_a_big_frame_replaced_by_a_small_one():
    wire = encode(KEY, Kind.RESULTS, {"r": []}, [b"\x00" * BIG_FRAME])
    wire[2] = b"short"
    with pytest.raises(ProtocolError):
        decode(KEY, wire)


def test_decode_raises_version_mismatch_for_another_protocol_version(monkeypatch):
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    wire = encode(KEY, Kind.CLIENT_HELLO)
    monkeypatch.undo()
    with pytest.raises(VersionMismatch, match="version") as info:
        decode(KEY, wire)
    assert isinstance(info.value, ProtocolError)
    assert str(PROTOCOL_VERSION + 1) in str(info.value)


def test_decode_rejects_an_unknown_kind():
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode(KEY, encode(KEY, "nonsense"))


def test_decode_rejects_a_header_that_is_not_a_map():
    raw = msgpack.packb([1, 2, 3])
    with pytest.raises(ProtocolError, match="not a map"):
        decode(KEY, [protocol._sign(KEY, raw, []), raw])


def test_decode_rejects_a_signed_header_with_a_lying_frame_count():
    raw = msgpack.packb({"v": PROTOCOL_VERSION, "k": Kind.STATUS, "nf": 2})
    wire = [protocol._sign(KEY, raw, [b"only"]), raw, b"only"]
    with pytest.raises(ProtocolError, match="frame count"):
        decode(KEY, wire)


# A peer holding the key can still send a header of the wrong shape (a bug in that
# peer); decode() promises ProtocolError for every bad message, so the broker's
# `except ProtocolError` keeps serving.
def signed(header: dict, frames=()) -> list:
    """A correctly signed message with exactly this header (encode() would fix it up)."""
    raw = msgpack.packb(header, use_bin_type=True)
    return [protocol._sign(KEY, raw, frames), raw, *frames]


@pytest.mark.parametrize("kind", [["sub"], {"k": 1}], ids=["list", "map"])
def test_decode_raises_protocol_error_for_a_signed_unhashable_kind(kind):
    with pytest.raises(ProtocolError):
        decode(KEY, signed({"v": PROTOCOL_VERSION, "k": kind, "nf": 0}))


@pytest.mark.parametrize("bd", [5, "xyz"], ids=["int", "str"])
def test_decode_raises_protocol_error_for_a_signed_malformed_digest_map(bd):
    header = {"v": PROTOCOL_VERSION, "k": Kind.STATUS, "nf": 1, "bd": bd}
    with pytest.raises(ProtocolError):
        decode(KEY, signed(header, [b"small frame"]))


def test_decode_raises_protocol_error_for_a_signed_digest_list_with_a_big_frame():
    header = {"v": PROTOCOL_VERSION, "k": Kind.RESULTS, "nf": 1, "bd": [b"d" * 32]}
    with pytest.raises(ProtocolError):
        decode(KEY, signed(header, [b"\x00" * BIG_FRAME]), verify_buffers=False)


def test_decode_raises_protocol_error_for_a_big_frame_digest_of_the_wrong_type():
    header = {"v": PROTOCOL_VERSION, "k": Kind.RESULTS, "nf": 1, "bd": {0: 12345}}
    with pytest.raises(ProtocolError):
        decode(KEY, signed(header, [b"\x00" * BIG_FRAME]), verify_buffers=True)

"""TensorBoard event files of scalars, written without a TensorBoard library.

An event file is a TFRecord file of serialized ``tensorflow.Event`` protocol buffers: each record
is its length (uint64, little-endian), the masked CRC-32C of the length, the data, and the masked
CRC-32C of the data. The first event names the file version; every later one here carries a
wall time, a step and a ``Summary`` of ``(tag, simple_value)`` pairs. Those few protobuf fields
are encoded by hand, so that writing metrics imports neither TensorFlow nor tensorboardX (whose
package imports PyTorch wherever PyTorch is installed: seconds of start-up and hundreds of MB in
every training process).
"""

from __future__ import annotations

import os
import socket
import struct
import time

FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli) of `data`, rotated right by 15 bits plus a constant."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, `data`, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 fields: negative numbers as their two's complement
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings and messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, *, step: int = 0, file_version: str = "", summary: bytes = b"") -> bytes:
    """A serialized ``Event`` (proto3: fields at their default value are left out, as protobuf does)."""
    out = struct.pack("<Bd", 1 << 3 | 1, wall_time) if wall_time else b""
    out += _varint(2 << 3) + _varint(step) if step else b""
    out += _field(3, file_version.encode()) if file_version else b""
    return out + (_field(5, summary) if summary else b"")


def scalar_event(wall_time: float, step: int, scalars: dict[str, float]) -> bytes:
    """A serialized ``Event`` with a ``Summary`` of one ``simple_value`` per tag."""
    values = (_field(1, _field(1, tag.encode()) + struct.pack("<Bf", 2 << 3 | 5, value)) for tag, value in scalars.items())
    return _event(wall_time, step=step, summary=b"".join(values))


class EventFile:
    """An event file ``<prefix>.out.tfevents.<seconds>.<host><suffix>`` that is on disk after each write.

    **Arguments:**

    - `prefix`: path and name prefix, e.g. ``workdir/tb/events``.
    - `suffix`: appended to the name (a writer's own suffix keeps a quick restart from reusing a name).
    """

    def __init__(self, prefix: str | os.PathLike, *, suffix: str = ""):
        now = time.time()
        self.path = f"{prefix}.out.tfevents.{int(now):010d}.{socket.gethostname()}{suffix}"
        self._file = open(self.path, "wb")
        self._write(_event(now, file_version=FILE_VERSION))

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord(event))
        self._file.flush()

    def write_scalars(self, step: int, scalars: dict[str, float], *, wall_time: float | None = None) -> None:
        """Appends one event with `scalars` (tag -> value) at `step`."""
        self._write(scalar_event(time.time() if wall_time is None else wall_time, step, scalars))

    def close(self) -> None:
        self._file.close()

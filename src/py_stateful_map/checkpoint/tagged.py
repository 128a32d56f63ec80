"""Values as bytes that run no code when read: the checkpoint's own small tagged format.

A pickle names the functions that rebuild it, and loading it calls them: a checkpoint file
someone else could write must not be loaded that way. The common results are stored here
instead, as a type tag and a length-prefixed payload (little-endian, lengths ``u32``)::

    N | T | F               None, True, False
    i int64                 an int that fits 64 bits; I u32 n, n bytes: any other int
    d float64               a float, bit for bit (nan, inf, -0.0)
    s u32 n, n bytes        a str (UTF-8; lone surrogates kept); b u32 n, n bytes: bytes
    l | t u32 n, n values   a list | a tuple
    m u32 n, n key+value    a dict (its order kept)
    a array                 a numpy array; g array: a numpy scalar (a 0-d array)
    x u8 flags, u8 n, name, array
                            a CPU torch tensor: its dtype's name, its elements as an array
                            (a dtype numpy lacks, bfloat16: integers of the same width)
    array := u8 n, dtype (``"<f4"``, ``">i8"``, ``"<M8[ns]"``), u8 ndim, ndim u64 dims,
             the elements' raw bytes in C order

A list of one type is packed, and read back in C-level passes rather than item by item (how
a row of a thousand ``int`` results stays as fast to read as a pickle)::

    q | D u32 n, n int64 | float64        ints | floats
    S | B u32 n, u32 m, m bytes           strs (UTF-8) | bytes, joined by NUL (none holds one)
    n | ? u32 n (, n bytes)               Nones | bools
    A array | G array | X u8 n, name, array
                                          arrays of one shape and dtype as one array (of
                                          shape (n, ...)); numpy scalars; CPU tensors
    R u32 n, u32 k, k lists               n tuples of k fields, by column
    M u32 n, list of keys, one list per key
                                          n dicts with the same keys in the same order
    U u32 n, u8 k, n bytes, k lists       items of k types: each item's type, then the list
                                          of each type's items (each packed as above)

Only exact types are stored (a ``bool`` is not an ``int`` here, a subclass of ``dict`` or
``ndarray`` is not one): anything else raises :class:`Unsupported`, and the caller pickles
it. Reading checks every length against the bytes there are; a numpy dtype is parsed only
after it matched a plain numeric, bool, date or fixed-width string pattern, never an object
or structured one. numpy and torch are imported only when a value of theirs is met.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections import deque
from collections.abc import Callable
from itertools import accumulate, compress, repeat
from operator import countOf, itemgetter, setitem
from typing import Any

from .tagged_arrays import ARRAY_READERS, Out, Read, Unsupported, end, packer_for, take, writer_for

__all__ = ["Unsupported", "decode", "encode"]


_TAG_COUNT = struct.Struct("<cI")
_TAG_I64 = struct.Struct("<cq")
_TAG_F64 = struct.Struct("<cd")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_RECORDS = struct.Struct("<cII")
_INT = ord("i")
_BIG_ENDIAN = sys.byteorder == "big"
#: Lists this long or longer of 2 to 255 types are stored as a union (``U``).
_UNION_MIN = 8
_UNION_MAX = 255
#: Packed Nones (``n``) take no bytes each: a list of more is stored item by item.
_MAX_NONES = 1 << 24


def encode(value: Any, prefix: bytes = b"") -> bytes:
    """``prefix`` and ``value`` in this format; :class:`Unsupported` if a part has no tag."""
    out: Out = [prefix]
    _write(value, out)
    return b"".join(out)


def decode(data: bytes, start: int = 0) -> Any:
    """The value stored in ``data[start:]``; ``ValueError`` (or another error) if damaged."""
    if type(data) is not bytes:
        data = bytes(data)
    if data[start] == _INT and len(data) == start + 9:  # the commonest value alone: no detour
        return _I64.unpack_from(data, start + 1)[0]
    value, end = _read(data, start)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes left after the value")
    return value


# -- writing --------------------------------------------------------------------------------


def _write(value: Any, out: Out) -> None:
    writer = _WRITERS.get(type(value)) or writer_for(value)
    writer(value, out)


def _write_none(value: None, out: Out) -> None:
    out.append(b"N")


def _write_bool(value: bool, out: Out) -> None:
    out.append(b"T" if value else b"F")


def _write_int(value: int, out: Out) -> None:
    try:
        out.append(_TAG_I64.pack(b"i", value))
    except struct.error:  # outside 64 bits
        data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
        out += (_TAG_COUNT.pack(b"I", len(data)), data)


def _write_float(value: float, out: Out) -> None:
    out.append(_TAG_F64.pack(b"d", value))


def _write_str(value: str, out: Out) -> None:
    data = value.encode("utf-8", "surrogatepass")
    out += (_TAG_COUNT.pack(b"s", len(data)), data)


def _write_bytes(value: bytes, out: Out) -> None:
    out += (_TAG_COUNT.pack(b"b", len(value)), value)


def _write_list(value: list[Any], out: Out) -> None:
    if len(value) > 1:
        first = type(value[0])
        if countOf(map(type, value), first) == len(value):
            packer = _PACKERS.get(first) or packer_for(first)
            if packer is not None and packer(value, out):
                return
        elif len(value) >= _UNION_MIN:
            types = list(map(type, value))
            kinds = list(dict.fromkeys(types))  # in order of first appearance
            if len(kinds) <= _UNION_MAX:
                _write_union(value, types, kinds, out)
                return
    out.append(_TAG_COUNT.pack(b"l", len(value)))
    _write_items(value, out)


def _write_union(value: list[Any], types: list[type], kinds: list[type], out: Out) -> None:
    """A list of several types: which type each item has, then a list of each type's items
    (packed like any list of one type); read back in C-level passes, not item by item."""
    number = {kind: index for index, kind in enumerate(kinds)}
    selectors = bytes(map(number.__getitem__, types))
    out += (_TAG_COUNT.pack(b"U", len(value)), bytes((len(kinds),)), selectors)
    for index in range(len(kinds)):
        only = bytearray(256)
        only[index] = 1
        mask = selectors.translate(only)  # 1 where the item has this type, else 0
        _write_list(list(compress(value, mask)), out)


def _write_items(values: Any, out: Out) -> None:
    writers = _WRITERS
    for item in values:
        (writers.get(type(item)) or writer_for(item))(item, out)


def _write_tuple(value: tuple[Any, ...], out: Out) -> None:
    out.append(_TAG_COUNT.pack(b"t", len(value)))
    _write_items(value, out)


def _write_dict(value: dict[Any, Any], out: Out) -> None:
    out.append(_TAG_COUNT.pack(b"m", len(value)))
    writers = _WRITERS
    for key, item in value.items():
        (writers.get(type(key)) or writer_for(key))(key, out)
        (writers.get(type(item)) or writer_for(item))(item, out)


_WRITERS: dict[type, Callable[[Any, Out], None]] = {
    type(None): _write_none,
    bool: _write_bool,
    int: _write_int,
    float: _write_float,
    str: _write_str,
    bytes: _write_bytes,
    list: _write_list,
    tuple: _write_tuple,
    dict: _write_dict,
}


def _little(packed: array[Any]) -> array[Any]:
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed


def _pack_ints(values: list[int], out: Out) -> bool:
    count = len(values)
    try:  # struct packs a list twice as fast as array() does (formats cached by struct)
        packed = struct.pack(f"<{count}q", *values)
    except struct.error:  # one of them needs more than 64 bits
        return False
    out += (_TAG_COUNT.pack(b"q", count), packed)
    return True


def _pack_floats(values: list[float], out: Out) -> bool:
    count = len(values)
    out += (_TAG_COUNT.pack(b"D", count), struct.pack(f"<{count}d", *values))
    return True


def _pack_strs(values: list[str], out: Out) -> bool:
    joined = "\0".join(values)
    if joined.count("\0") == len(values) - 1:  # none holds a NUL: split on it when read
        text = joined.encode("utf-8", "surrogatepass")
        out += (_TAG_COUNT.pack(b"S", len(values)), _U32.pack(len(text)), text)
        return True
    text = "".join(values).encode("utf-8", "surrogatepass")
    lengths = _little(array("I", map(len, values)))
    out += (_TAG_COUNT.pack(b"L", len(values)), lengths, _U32.pack(len(text)), text)
    return True


def _pack_bytes(values: list[bytes], out: Out) -> bool:
    joined = b"\0".join(values)
    if joined.count(0) == len(values) - 1:
        out += (_TAG_COUNT.pack(b"B", len(values)), _U32.pack(len(joined)), joined)
        return True
    data = b"".join(values)
    lengths = _little(array("I", map(len, values)))
    out += (_TAG_COUNT.pack(b"K", len(values)), lengths, _U32.pack(len(data)), data)
    return True


def _pack_nones(values: list[None], out: Out) -> bool:
    if len(values) > _MAX_NONES:
        return False
    out.append(_TAG_COUNT.pack(b"n", len(values)))
    return True


def _pack_bools(values: list[bool], out: Out) -> bool:
    out += (_TAG_COUNT.pack(b"?", len(values)), bytes(values))
    return True


def _pack_tuples(values: list[tuple[Any, ...]], out: Out) -> bool:
    widths = set(map(len, values))
    width = widths.pop()
    if widths or width == 0:
        return False
    out.append(_RECORDS.pack(b"R", len(values), width))
    for column in zip(*values, strict=True):
        _write_list(list(column), out)
    return True


def _pack_dicts(values: list[dict[Any, Any]], out: Out) -> bool:
    shapes = set(map(tuple, values))  # the keys of each, in order
    keys = shapes.pop()
    if shapes or not keys:
        return False
    out.append(_TAG_COUNT.pack(b"M", len(values)))
    _write_list(list(keys), out)
    for key in keys:
        _write_list(list(map(itemgetter(key), values)), out)
    return True


_PACKERS: dict[type, Callable[[Any, Out], bool]] = {
    int: _pack_ints,
    float: _pack_floats,
    str: _pack_strs,
    bytes: _pack_bytes,
    type(None): _pack_nones,
    bool: _pack_bools,
    tuple: _pack_tuples,
    dict: _pack_dicts,
}


# -- reading --------------------------------------------------------------------------------


def _read(data: bytes, pos: int) -> Read:
    return _READERS[data[pos]](data, pos + 1)


def _unknown(data: bytes, pos: int) -> Read:
    raise ValueError(f"unknown tag {data[pos - 1 : pos]!r} at byte {pos - 1}")


def _count(data: bytes, pos: int) -> Read:
    return _U32.unpack_from(data, pos)[0], pos + 4


def _read_packed(data: bytes, pos: int, code: str, size: int) -> Read:
    count, pos = _count(data, pos)
    packed = array(code)
    after = end(data, pos, count * size)
    packed.frombytes(memoryview(data)[pos:after])
    return _little(packed), after


def _read_list(data: bytes, pos: int) -> Read:
    count, pos = _count(data, pos)
    items: list[Any] = []
    append, readers = items.append, _READERS
    for _ in range(count):
        item, pos = readers[data[pos]](data, pos + 1)
        append(item)
    return items, pos


def _read_tuple(data: bytes, pos: int) -> Read:
    items, pos = _read_list(data, pos)
    return tuple(items), pos


def _read_dict(data: bytes, pos: int) -> Read:
    count, pos = _count(data, pos)
    result = {}
    readers = _READERS
    for _ in range(count):
        key, pos = readers[data[pos]](data, pos + 1)
        result[key], pos = readers[data[pos]](data, pos + 1)
    return result, pos


def _read_big_int(data: bytes, pos: int) -> Read:
    size, pos = _count(data, pos)
    return int.from_bytes(take(data, pos, size), "little", signed=True), pos + size


def _read_str(data: bytes, pos: int) -> Read:
    end = pos + 4 + _U32.unpack_from(data, pos)[0]
    if end > len(data):
        raise ValueError(f"truncated: a str past the end, at byte {pos}")
    return str(data[pos + 4 : end], "utf-8", "surrogatepass"), end


def _read_bytes(data: bytes, pos: int) -> Read:
    size, pos = _count(data, pos)
    return take(data, pos, size), pos + size


def _read_ints(data: bytes, pos: int) -> Read:
    packed, pos = _read_packed(data, pos, "q", 8)
    return packed.tolist(), pos


def _read_floats(data: bytes, pos: int) -> Read:
    packed, pos = _read_packed(data, pos, "d", 8)
    return packed.tolist(), pos


def _read_split(data: bytes, pos: int) -> tuple[bytes, int, int]:
    """(the NUL-joined data of packed strs or bytes, their count, the position after)."""
    count, pos = _count(data, pos)
    size, pos = _count(data, pos)
    return take(data, pos, size), count, pos + size


def _read_strs(data: bytes, pos: int) -> Read:
    chunk, count, pos = _read_split(data, pos)
    values = str(chunk, "utf-8", "surrogatepass").split("\0")
    if len(values) != count:
        raise ValueError("packed strings: not as many as said")
    return values, pos


def _read_bytes_list(data: bytes, pos: int) -> Read:
    chunk, count, pos = _read_split(data, pos)
    values = chunk.split(b"\0")
    if len(values) != count:
        raise ValueError("packed bytes: not as many as said")
    return values, pos


def _read_measured(data: bytes, pos: int) -> tuple[list[int], bytes, int]:
    """Where each packed str or bytes starts in their data (then one past the last), the
    data, and the position after it (the form for values that hold a NUL)."""
    lengths, pos = _read_packed(data, pos, "I", 4)
    size, pos = _count(data, pos)
    return list(accumulate(lengths, initial=0)), take(data, pos, size), pos + size


def _read_measured_strs(data: bytes, pos: int) -> Read:
    offsets, chunk, pos = _read_measured(data, pos)
    text = str(chunk, "utf-8", "surrogatepass")
    if offsets[-1] != len(text):  # lengths in characters
        raise ValueError("packed strings: the lengths do not add up")
    return list(map(text.__getitem__, map(slice, offsets[:-1], offsets[1:]))), pos


def _read_measured_bytes(data: bytes, pos: int) -> Read:
    offsets, chunk, pos = _read_measured(data, pos)
    if offsets[-1] != len(chunk):
        raise ValueError("packed bytes: the lengths do not add up")
    return list(map(chunk.__getitem__, map(slice, offsets[:-1], offsets[1:]))), pos


def _read_union(data: bytes, pos: int) -> Read:
    count, pos = _count(data, pos)
    kinds = data[pos]
    selectors = take(data, pos + 1, count)
    pos += 1 + count
    parts = []
    for index in range(kinds):
        part, pos = _read(data, pos)
        if type(part) is not list or len(part) != selectors.count(index):
            raise ValueError("mixed list: a part of the wrong length")
        parts.append(iter(part))
    if len(selectors) != sum(map(selectors.count, range(kinds))):
        raise ValueError("mixed list: an item of no part")
    return list(map(next, map(parts.__getitem__, selectors))), pos


def _read_nones(data: bytes, pos: int) -> Read:
    count, pos = _count(data, pos)
    if count > _MAX_NONES:  # 5 bytes must not ask for gigabytes
        raise ValueError(f"{count:,} Nones, more than this format packs")
    return [None] * count, pos


def _read_bools(data: bytes, pos: int) -> Read:
    count, pos = _count(data, pos)
    return list(map(bool, take(data, pos, count))), pos + count


def _columns(data: bytes, pos: int, count: int, width: int) -> Read:
    columns = []
    for _ in range(width):
        column, pos = _read(data, pos)
        if type(column) is not list or len(column) != count:
            raise ValueError("records: a column of the wrong length")
        columns.append(column)
    return columns, pos


def _read_tuples(data: bytes, pos: int) -> Read:
    count, pos = _count(data, pos)
    width, pos = _count(data, pos)
    if width == 0:
        raise ValueError("records: no fields")
    columns, pos = _columns(data, pos, count, width)
    return list(zip(*columns, strict=True)), pos


def _read_dicts(data: bytes, pos: int) -> Read:
    count, pos = _count(data, pos)
    keys, pos = _read(data, pos)
    if type(keys) is not list or not keys:
        raise ValueError("records: no keys")
    columns, pos = _columns(data, pos, count, len(keys))
    values = list(map(dict.copy, repeat(dict.fromkeys(keys), count)))  # keys in their order
    for key, column in zip(keys, columns, strict=True):  # then filled column by column, in C
        deque(map(setitem, values, repeat(key), column), maxlen=0)
    return values, pos


def _constant(value: Any) -> Callable[[bytes, int], Read]:
    return lambda data, pos: (value, pos)


_BY_TAG: dict[int, Callable[[bytes, int], Read]] = {
    ord(tag): reader
    for tag, reader in {
        "N": _constant(None),
        "T": _constant(True),
        "F": _constant(False),
        "i": lambda data, pos: (_I64.unpack_from(data, pos)[0], pos + 8),
        "I": _read_big_int,
        "d": lambda data, pos: (_F64.unpack_from(data, pos)[0], pos + 8),
        "s": _read_str,
        "b": _read_bytes,
        "l": _read_list,
        "t": _read_tuple,
        "m": _read_dict,
        "q": _read_ints,
        "D": _read_floats,
        "S": _read_strs,
        "L": _read_measured_strs,
        "B": _read_bytes_list,
        "K": _read_measured_bytes,
        "U": _read_union,
        "n": _read_nones,
        "?": _read_bools,
        "R": _read_tuples,
        "M": _read_dicts,
    }.items()
}
_BY_TAG.update(ARRAY_READERS)
#: The reader of each tag byte (a list: indexed faster than a dict is looked up).
_READERS = [_BY_TAG.get(byte, _unknown) for byte in range(256)]

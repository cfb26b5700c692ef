"""The plain-data codec shared by the sandbox (trusted side) and its server (inside the sandbox).

Standard library only: the server runs with ``python -I -S`` and imports this
file from its scratch directory. Only exact builtin types cross (no subclasses,
so no object with a custom ``__eq__``); decoding builds new builtin objects. The
standard library's dict types (``Counter``, ``defaultdict``, ``OrderedDict``) are
sent as their items and arrive as plain dicts, which compare as the originals do
with a dict (MBPP's tests compare a returned Counter with a dict literal).
"""
import collections

_DICTS = (dict, collections.Counter, collections.defaultdict, collections.OrderedDict)


class CodecError(ValueError):
    pass


def encode(x, depth: int = 0):
    """Plain data → JSON-able tagged form; exact builtin types only (no subclasses)."""
    if depth > 100:
        raise CodecError("nested too deeply")
    t = type(x)
    if x is None:
        return ["n"]
    if t is bool:
        return ["b", x]
    if t is int:
        return ["i", str(x)]
    if t is float:
        return ["f", repr(x)]
    if t is complex:
        return ["c", [repr(x.real), repr(x.imag)]]
    if t is str:
        return ["s", x]
    if t is bytes:
        return ["y", x.hex()]
    if t in (list, tuple, set, frozenset):
        return [{list: "l", tuple: "t", set: "S", frozenset: "F"}[t], [encode(v, depth + 1) for v in x]]
    if t in _DICTS:  # exact types: a program's own dict subclass is refused below
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]]
    raise CodecError(f"not plain data: {t.__name__}")


def decode(x):
    """Tagged form → new builtin objects (never anything else)."""
    if not isinstance(x, list) or not x or not isinstance(x[0], str):
        raise CodecError("malformed value")
    tag = x[0]
    if tag == "n":
        return None
    v = x[1]
    if tag == "b" and type(v) is bool:
        return v
    if tag == "i" and type(v) is str:
        return int(v)
    if tag == "f" and type(v) is str:
        return float(v)
    if tag == "c" and type(v) is list and len(v) == 2 and all(type(p) is str for p in v):
        return complex(float(v[0]), float(v[1]))
    if tag == "s" and type(v) is str:
        return v
    if tag == "y" and type(v) is str:
        return bytes.fromhex(v)
    if tag in "ltSF" and type(v) is list:
        items = [decode(i) for i in v]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and type(v) is list:
        return {decode(k): decode(val) for k, val in v}
    raise CodecError(f"malformed value tagged {tag!r}")

"""Runs inside the sandbox (python -I -S): loads the untrusted program and answers calls
of its entry point with plain data. It holds no verdict: the tests run outside.

argv: program path, entry point name, request fd, response fd. Messages are
8-byte big-endian length + JSON, values in rlbench.tasks.sandbox's tagged form.
"""
import builtins
import json
import os
import struct
import sys


def encode(x, depth=0):
    if depth > 100:
        raise ValueError("nested too deeply")
    t = type(x)
    if x is None:
        return ["n"]
    if t is bool:
        return ["b", x]
    if t is int:
        return ["i", str(x)]
    if t is float:
        return ["f", repr(x)]
    if t is str:
        return ["s", x]
    if t is bytes:
        return ["y", x.hex()]
    if t in (list, tuple, set, frozenset):
        return [{list: "l", tuple: "t", set: "S", frozenset: "F"}[t], [encode(v, depth + 1) for v in x]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]]
    raise TypeError("the entry point returned a %s, not plain data" % t.__name__)


def decode(x):
    tag = x[0]
    if tag == "n":
        return None
    v = x[1]
    if tag in ("b", "s"):
        return v
    if tag == "i":
        return int(v)
    if tag == "f":
        return float(v)
    if tag == "y":
        return bytes.fromhex(v)
    if tag in ("l", "t", "S", "F"):
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](decode(i) for i in v)
    if tag == "d":
        return {decode(k): decode(val) for k, val in v}
    raise ValueError(tag)


def main():
    path, entry, rfd, wfd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    write = os.write

    def send(obj):
        data = json.dumps(obj).encode()
        data = struct.pack(">Q", len(data)) + data
        while data:
            data = data[write(wfd, data):]

    def read_exact(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(rfd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    with open(path) as f:
        source = f.read()
    ns = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(source, "program.py", "exec"), ns)
        fn = ns.get(entry)
        if not callable(fn):
            raise NameError("the program defines no function %r" % entry)
    except BaseException as e:  # SystemExit included: exiting is not passing
        send(["load_error", "%s: %s" % (type(e).__name__, str(e)[:300])])
        return
    send(["ready"])
    while True:
        head = read_exact(8)
        if head is None:
            return
        body = read_exact(struct.unpack(">Q", head)[0])
        if body is None:
            return
        args, kwargs = json.loads(body)
        try:
            out = ["ok", encode(fn(*decode(args), **decode(kwargs)))]
        except BaseException as e:
            out = ["err", "%s: %s" % (type(e).__name__, str(e)[:300])]
        send(out)


main()

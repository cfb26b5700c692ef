"""Runs inside the sandbox (python -I -S): loads the untrusted program and answers calls
of its entry point with plain data. It holds no verdict: the tests run outside.

argv: program path, entry point name, request fd, response fd. Messages are
8-byte big-endian length + JSON, values in the tagged form of _sandbox_codec.py.
"""
import builtins
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sandbox_codec import decode, encode  # noqa: E402 - the same codec as the trusted side


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

"""Point runners for the sweep tests: module-level (so a spawned worker or a
Ray worker imports them by name), each runner(argv) -> (exit_code, report)
like hv.cli.sweep.run_point.  Options arrive as --name=value."""
import hashlib
import os
import signal
import time


def _opts(argv):
    out = {}
    for a in argv[2:]:
        name, _, value = a[2:].partition("=")
        out[name] = value if _ else True
    return out


def echo(argv):
    """Reads the input and reports what it saw: its path, the SHA-256 of its
    bytes, and a number made from the bytes and the options (so a row shows
    that it ran on this input with these options)."""
    path = argv[1]
    with open(path, "rb") as f:
        data = f.read()
    opts = _opts(argv)
    mult = int(opts.get("mult", 1))
    mode = opts.get("mode", "ok")
    if mode == "boom":
        raise RuntimeError("boom\nsecond line")
    if mode == "bad":
        return 2, {"exit_reason": "bad_input", "exit_code": 2, "error": f"{path}: bad input"}
    if mode == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if "sleep" in opts:
        time.sleep(float(opts["sleep"]))
    return 0, {"path": path, "dir": os.path.dirname(path), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
               "npf": len(data) * mult + (7 if opts.get("flag") else 0),
               "elapsed_s": 0.001 * mult, "pid": os.getpid()}

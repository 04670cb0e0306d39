"""Where the time of a run on a GPU backend goes, from its log: seconds until the next log
line after each CubeCL kernel compilation (by kernel), after the driver's step lines, and
elsewhere. Make the log with a `cubecl.toml` in the working directory that sends CubeCL's
compilation log to the `log` crate,

    [compilation.logger]
    level = "basic"
    log = "info"

and `RUST_LOG=adaround=debug,cubecl_common=info,cubecl_runtime=info,cubecl=info` (the
examples' logger stamps each line with milliseconds). Then:

    python3 crates/adaround-examples/benches/compile_log.py LOG [LOG ...]

Not part of CI.
"""
import collections
import datetime
import re
import sys

LINE = re.compile(r"\[(\S+)Z (\w+)\s*\] (.*)")


def summary(path):
    stamped = []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                stamped.append((datetime.datetime.fromisoformat(m.group(1)), m.group(3)))
    seconds, count = collections.Counter(), collections.Counter()
    for (t, msg), (t_next, _) in zip(stamped, stamped[1:]):
        if "[Compiling kernel]" in msg:
            key = "compile " + msg.split("::")[-1]
        elif "steps in" in msg or re.search(r": step \d+/", msg):
            key = "AdaRound steps"
        else:
            key = "other"
        seconds[key] += (t_next - t).total_seconds()
        count[key] += 1
    span = (stamped[-1][0] - stamped[0][0]).total_seconds() if stamped else 0.0
    print(f"{path}: {span:.1f} s from the first log line to the last")
    print("| what | lines | seconds |")
    print("|---|---|---|")
    for key, s in seconds.most_common(8):
        print(f"| {key} | {count[key]} | {s:.2f} |")
    print()


if __name__ == "__main__":
    for p in sys.argv[1:]:
        summary(p)

"""What `compress` costs in CPU per response, by coding, level and response size.

    .venv/bin/python bench/compress_cost.py            # about 20 s, one core
    .venv/bin/python bench/compress_cost.py --budget 0.05   # quicker, rougher

It runs the middleware's own codings (middleware/compress_codecs.py) the way the
middleware does: a body of up to 64 KiB that arrived whole is compressed at once; a
larger one is streamed in 64 KiB pieces, each flushed. The body is JSON made from a fixed
seed (records of ids, names, timestamps, amounts and text: harness/bodies.py), API
traffic, which compresses about as well as HTML. Each figure is the least CPU time
(time.process_time, garbage collector off) of three runs of enough repeats to take
`--budget` seconds, divided by the repeats: the time of the compressor alone, in one
process, on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from middleware.compress_codecs import WHOLE_BYTES, Coding

from harness.bodies import json_body

SIZES = (1024, 16 * 1024, 256 * 1024, 1024 * 1024)
LEVELS = {"gzip": (1, 6, 9), "br": (1, 4, 6, 11), "zstd": (1, 3, 9, 19)}


def compress_once(coding: Coding, body: bytes) -> int:
    """Compress `body` as the middleware would; the compressed size."""
    if len(body) <= WHOLE_BYTES:
        return len(coding.whole(body))
    stream = coding.stream()
    size = 0
    for start in range(0, len(body), WHOLE_BYTES):
        size += len(stream.piece(body[start : start + WHOLE_BYTES]))
    return size + len(stream.end())


def cost(coding: Coding, body: bytes, budget: float) -> float:
    """Least CPU seconds per response over three runs of about `budget` seconds."""
    started = time.process_time()
    repeats = 0
    while time.process_time() - started < budget / 10 or repeats == 0:
        compress_once(coding, body)
        repeats += 1
    per_call = max((time.process_time() - started) / repeats, 1e-7)
    repeats = max(1, int(budget / per_call))
    best = float("inf")
    gc.disable()
    try:
        for _ in range(3):
            started = time.process_time()
            for _ in range(repeats):
                compress_once(coding, body)
            best = min(best, (time.process_time() - started) / repeats)
    finally:
        gc.enable()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.1, help="seconds per run (3 runs)")
    args = parser.parse_args()
    bodies = {size: json_body(size) for size in SIZES}
    sizes = " | ".join(f"{size // 1024} KiB" for size in SIZES)
    print(f"| coding | level | {sizes} |")
    print("|---|---|" + "---|" * len(SIZES))
    for name, levels in LEVELS.items():
        for level in levels:
            coding = Coding(name, level)
            cells = []
            for size, body in bodies.items():
                seconds = cost(coding, body, args.budget)
                ratio = size / compress_once(coding, body)
                cells.append(f"{seconds * 1e6:,.0f} us, {ratio:.1f}x")
            print(f"| {name} | {level} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

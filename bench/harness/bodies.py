"""Bodies the benchmarks send: JSON API data made from a fixed seed.

Records of ids, names, timestamps, amounts and text: API traffic, which compresses about
as well as HTML (bench/compress_cost.py, about 5x with gzip at level 6 for 16 KiB). The
origin serves 16 KiB of it as /16k.json (harness/nginx.py), the same bytes
compress_cost.py measures at that size.
"""

import json
import random

WORDS = [
    "order",
    "shipped",
    "pending",
    "refund",
    "customer",
    "invoice",
    "warehouse",
    "parcel",
    "express",
]


def json_body(size: int) -> bytes:
    """`size` bytes of a JSON array of records (cut: only the bytes matter)."""
    rng = random.Random(size)
    records = []
    length = 0
    while length < size:
        record = {
            "id": rng.randrange(10**9),
            "customer": f"cust-{rng.randrange(10**5):05d}",
            "status": rng.choice(WORDS),
            "created": f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T"
            f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z",
            "amount": round(rng.uniform(1, 5000), 2),
            "note": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12))),
        }
        text = json.dumps(record)
        records.append(text)
        length += len(text) + 2
    return ("[" + ", ".join(records) + "]").encode()[:size]

#!/usr/bin/env python3
"""How long a browser takes to find a host: QM (multicast) questions against
zeroconf's default question type.

Starts an Advertiser in this process (a name unique to this run, on
--interface, 127.0.0.1 by default), waits for it to settle, then for each of
--rounds rounds times "new HostBrowser started -> our host resolved", once
with question_type "QM" and once with "default". Rounds are --gap seconds
apart, since mDNS answers one record at most once a second and a closer
round would be timing the rate limit. Prints each round, the median of each
kind and the ratio default/QM.

    python bench/discovery.py [--rounds 7] [--interface 127.0.0.1]

Stdlib and chatroom (with zeroconf) only. Numbers are for people, not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chatroom

KINDS = ("QM", "default")


async def time_to_find(name: str, interface: str, question_type: str,
                       timeout: float) -> float | None:
    """Seconds from starting a HostBrowser to our host resolved, or None."""
    found = asyncio.Event()

    def on_change(hosts: list[chatroom.HostInfo]) -> None:
        if any(h.name == name for h in hosts):
            found.set()

    browser = chatroom.HostBrowser(interface, on_change=on_change,
                                   question_type=question_type)
    start = time.perf_counter()
    try:
        await browser.start()
        await asyncio.wait_for(found.wait(), timeout)
        return time.perf_counter() - start
    except TimeoutError:
        return None
    finally:
        await browser.close()


def show(seconds: float | None) -> str:
    return "timeout" if seconds is None else f"{seconds * 1000:8.1f} ms"


async def main(args: argparse.Namespace) -> int:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    advertiser = chatroom.Advertiser(name, 47300, args.interface)   # advertised, never dialled
    results: dict[str, list[float | None]] = {kind: [] for kind in KINDS}
    print(f"advertising {name!r} on {args.interface}; {args.rounds} rounds, "
          f"{args.gap:g} s apart", flush=True)
    try:
        await advertiser.start()
        await asyncio.sleep(args.settle)
        for number in range(1, args.rounds + 1):
            line = [f"round {number:2d}:"]
            for kind in KINDS:
                seconds = await time_to_find(name, args.interface, kind, args.timeout)
                results[kind].append(seconds)
                line.append(f"{kind:>7} {show(seconds)}")
                await asyncio.sleep(args.gap)
            print("  ".join(line), flush=True)
    finally:
        await advertiser.close()

    medians = {}
    for kind in KINDS:
        times = [t for t in results[kind] if t is not None]
        missed = len(results[kind]) - len(times)
        medians[kind] = statistics.median(times) if times else None
        print(f"median {kind:>7}: {show(medians[kind])}"
              + (f"  ({missed} timed out)" if missed else ""))
    if medians["QM"] and medians["default"]:
        print(f"ratio default/QM: {medians['default'] / medians['QM']:.1f}x")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--interface", default="127.0.0.1",
                        help="address for mDNS (default 127.0.0.1)")
    parser.add_argument("--gap", type=float, default=1.2,
                        help="seconds between measurements (default 1.2)")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds to wait after registering (default 1.5)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="give up on one measurement after this (default 10)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))

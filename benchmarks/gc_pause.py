"""What one garbage collection costs in a training process, with and without `gc.freeze`.

Python's collector walks every tracked object of the generations it collects. A process that has
imported torch and Lightning and built a model tracks hundreds of thousands of long-lived objects,
so a full collection (which Python also starts on its own, whenever the long-lived objects have
grown by a quarter) is a pause of its own size, on one rank, at a moment no rank chose.
`lightning_dsv3.callbacks.GarbageCollection` freezes what is alive when the fit starts and then
collects between steps; this measures what that buys: the median time of each generation's
collection, first as Python sees the process, then after `gc.collect(); gc.freeze()`, with the same
young garbage (`--young` small lists in reference cycles) made before each collection.

    python -m benchmarks.gc_pause                      # the mini preset's module, CPU or GPU host
    python -m benchmarks.gc_pause --preset debug --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3.module import DeepSeekV3Module


def _young_cycles(n: int) -> None:
    """`n` two-element reference cycles, unreachable once this returns: garbage only a collection frees."""
    for _ in range(n):
        a: list = []
        b = [a]
        a.append(b)


def collection_ms(generation: int, young: int, repeats: int) -> float:
    """Median milliseconds of `gc.collect(generation)` after making `young` cycles each time."""
    times = []
    for _ in range(repeats):
        _young_cycles(young)
        start = time.perf_counter()
        gc.collect(generation)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument(
        "--young", type=int, default=10_000, help="cycles of garbage made before each collection"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    module = DeepSeekV3Module(preset=args.preset)
    module.configure_model()  # the model's modules and parameters, as a fit holds them
    gc.disable()
    rows = []
    for frozen in (False, True):
        if frozen:
            gc.collect()
            gc.freeze()
        tracked = len(gc.get_objects())
        times = [collection_ms(g, args.young, args.repeats) for g in (0, 1, 2)]
        rows.append(["after gc.freeze()" if frozen else "as Python sees it", f"{tracked:,}",
                     *[f"{t:.2f}" for t in times]])  # fmt: skip
    gc.unfreeze()
    gc.enable()
    body = (
        f"preset {args.preset}: torch, Lightning and a DeepSeekV3Module built in the process; "
        f"{args.young:,} young reference cycles made before each collection; median of {args.repeats} "
        "collections per cell (ms). Tracked: objects the collector would walk in a full collection.\n\n"
        + markdown_table(["process", "tracked objects", "gen 0 ms", "gen 1 ms", "full (gen 2) ms"], rows)
    )
    write_result(f"gc_pause-{args.preset}", body)


if __name__ == "__main__":
    main()

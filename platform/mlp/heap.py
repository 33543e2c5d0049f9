"""The garbage collector tuned for a long-running service: collect young objects less often, and never
walk what start-up created.

CPython's defaults (collect generation 0 every 700 net allocations) are made for short scripts. A
service allocates containers on every message or request (futures, tasks, AMQP properties, events),
so young collections ran often, and each older-generation pass walked the 90,000-115,000 objects the
imports alone had made (FastAPI, pydantic, FastStream, OpenTelemetry, gRPC), none of which ever become
garbage.

:func:`settle_after_start` is called once, by each service's lifecycle, when start-up is over
(``mlp.http.serve``, ``mlp.consumer.run_consumer``): it collects once, moves every surviving object
into the permanent generation (``gc.freeze``), and raises the young-generation threshold. Cycles are
still collected; reference counting frees everything else, as before.
"""

from __future__ import annotations

import gc

# Net allocations between young collections (CPython's default is 700); the older generations keep
# their default ratios (10, 10). 50,000 saved a little more CPU but let the collector's RSS climb
# 72 -> 90 MiB over 90 s at 100 req/s; at 10,000 it levels off near 78 MiB (docs/benchmarks.md, round 7).
YOUNG_THRESHOLD = 10_000


def settle_after_start() -> None:
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)

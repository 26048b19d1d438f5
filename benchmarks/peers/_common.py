"""What the peer benchmarks share: thread setup, the float32 matmul probe, the JSON line."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import resource
import sys
import time
import warnings


def log(*parts: object) -> None:
    """Progress for people: stderr only, so stdout stays one JSON line."""
    print(*parts, file=sys.stderr, flush=True)


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or the pool already started
        pass


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 ``n x n @ n x n`` throughput of this process, ``2 n^3`` flops a product."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(n, n, generator=gen)
    b = torch.rand(n, n, generator=gen)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def emit(record: dict, *, threads: int, libraries: dict[str, str]) -> None:
    """Complete ``record`` with the fields every peer reports and print it as one JSON line.

    ``libraries`` maps a key of ``versions`` to its distribution name (``{"avalanche":
    "avalanche-lib"}``).
    """
    import torch

    rss = peak_rss_mb()  # before the probe's three 16 MB matrices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peak = matmul_peak_gflops()
    out = dict(record)
    out.setdefault("xla_gflop", None)
    out["peak_rss_mb"] = round(rss, 1)
    out["matmul_peak_gflops"] = round(peak, 2)
    out["backend"] = "cpu"
    out["threads"] = threads
    versions = {"torch": torch.__version__}
    versions.update({key: version_of(dist) for key, dist in libraries.items()})
    versions["python"] = platform.python_version()
    out["versions"] = versions
    print(json.dumps(out), flush=True)

"""Executors: how a plan's read units become committed batches.

    source.read.read_unit -> execute.parse.parse -> postgres.writer.BatchWriter.write
       Chunk                  ParsedBatch             BatchResult (streamed back to the driver)

Both executors run those same three functions, so batch ids and ledger rows never depend on the
executor (a run or a resume may switch freely):

- :mod:`loadkit.execute.inprocess`: threads of the driver (never imports Ray);
- :mod:`loadkit.execute.ray`: Ray (a pool of loader actors, each reading, parsing and writing
  whole read units); imported only when chosen, so an in-process run never pays for importing Ray.

``env.executor=auto`` chooses with :func:`choose_executor`, a pure function of the input size and
the machine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Protocol, Sequence

from loadkit.execute.channel import SizeChannel

if TYPE_CHECKING:  # the executors import the stages (transform, the writer) only when one is made:
    # a Ray worker imports this package on its way to execute.ray, and must not import
    # loadkit.transform before execute.ray has kept pyarrow from importing pandas there
    from loadkit.plan import LoadPlan
    from loadkit.postgres.writer import WriterSettings
    from loadkit.records import BatchResult
    from loadkit.source.read import ReadUnit

__all__ = ["Executor", "choose_executor", "make_executor", "store_bytes"]


class Executor(Protocol):
    """Runs read -> parse -> write for a plan's units and streams each batch's result back."""

    name: str  # ray | inprocess (recorded in the run's metrics and MLflow tags)
    # True if each read unit's last record (``unit_end``, an eof or error record) comes after every batch of
    # that unit: the driver may then publish a table whose units all ended while others still stream
    unit_ends: bool

    def start(self) -> None:
        """Acquire what the executor needs before any data moves (Ray: start or join a cluster)."""
        ...

    def size_channel(self, rows: int) -> SizeChannel:
        """The batch-size board between the driver and this executor's read tasks."""
        ...

    def run(self, plan: LoadPlan, units: Sequence[ReadUnit], settings: WriterSettings,
            board: Any) -> Iterator[BatchResult]:
        """Yield one BatchResult per batch (and per eof/error record) as writers finish them.

        ``board`` is ``size_channel(...).board``. Raises the writer's classified LoadkitError if a
        batch fails for good; closing the iterator early stops the stages."""
        ...


def choose_executor(requested: str, address: Optional[str], input_bytes: int, cpus: int,
                    inprocess_max_bytes: int, inprocess_max_cpus: int) -> str:
    """``ray`` or ``inprocess`` for ``env.executor=requested`` (``auto``, ``ray`` or ``inprocess``).

    ``auto``: Ray on a cluster (``address`` set); otherwise in-process where Ray's start-up
    and its processes would cost more than they give: a small input (``input_bytes`` to read at
    most ``inprocess_max_bytes``) or a small machine (``cpus`` at most ``inprocess_max_cpus``).

    Where the defaults (2 GiB, 4 cores) come from: benchmarks/executor_bench.py, the same generated
    month (its two largest tables) at 0.45M and 1.8M rows (3.6M for the loader actors),
    ``env.num_cpus`` pinned to 2 with taskset, per-process CPU of driver, Ray workers and daemons and
    PostgreSQL backends (README, "Benchmark results", has the figures). Fitting CPU = fixed + rows x marginal
    per executor (issue #16, fused loader actors under Ray Data; load 1-2):

    - in-process: ~0.8-1.0 CPU-s fixed, 2.3-2.6 µs/row (+1.25 µs/row PostgreSQL);
    - Ray: ~8.4 CPU-s fixed (Ray's seven daemons ~2.4, Ray Data's three actors ~2.1, two loader
      processes' imports, the driver's Ray and Ray Data imports and start), 3.6 µs/row
      (+1.25 PostgreSQL); wall start-up ~7.5 s. (Before the fused loaders: ~16-18 CPU-s fixed,
      4.6-5.0 µs/row; the loaders as plain Ray actors: ~4.8 CPU-s fixed, 3.3-3.4 µs/row.)

    On 2 cores Ray lost at every size, in CPU and in wall. More cores could not be measured here;
    the figures predict: in-process gets about two cores' worth (one read thread feeding the parse
    threads and writers, much of it under the GIL), i.e. ~2 µs/row of wall for 3.6 µs/row of CPU,
    while Ray spreads its 4.8 µs/row over all ``cpus``. Ray's ~7.5 s start-up pays back after
    7.5 s / (2.0 - 4.8/cpus) µs rows: never on 2 cores, ~19M rows (~3 GB at ~160 bytes a row)
    on 3, ~9M (~1.5 GB) on 4, ~5M (~0.9 GB) on 8. The defaults (in-process up to 4 cores whatever
    the size, on bigger machines up to 2 GiB of input) predate these figures, which would put the
    machine limit at 3 cores; they stay until a machine with more cores measures it. A cluster is
    Ray regardless: its point is cores that this process does not have."""
    if requested != "auto":
        return requested
    if address is not None:
        return "ray"
    small_input = input_bytes <= inprocess_max_bytes
    small_machine = cpus <= inprocess_max_cpus
    return "inprocess" if small_input or small_machine else "ray"


_MIN_STORE_BYTES = 128 * 1024 * 1024  # Ray's own floor is 75 MB
# The loader actors (execute.ray) read, parse and write in one process: no batch goes through the
# object store (only one-row result blocks), so the store stays nearly empty (raylet PSS 24-25 MB
# at 128 MB, measured). A cap still matters where something uses it.
_MAX_STORE_BYTES = 256 * 1024 * 1024


def store_bytes(configured: Optional[int], input_bytes: Optional[int]) -> Optional[int]:
    """Object store size (bytes) of a local Ray for ``input_bytes`` of input: the input size within
    [_MIN_STORE_BYTES, _MAX_STORE_BYTES] (the in-flight work, not the file, sets the ceiling, so
    memory stays flat as inputs grow), and never above ``configured`` (``env.object_store_memory``;
    None = no cap of the user's). ``input_bytes`` None: ``configured`` as it is."""
    if input_bytes is None:
        return configured
    want = min(max(_MIN_STORE_BYTES, input_bytes), _MAX_STORE_BYTES)
    return want if configured is None else min(configured, want)


def make_executor(name: str, address: Optional[str] = None, num_cpus: Optional[int] = None,
                  object_store_memory: Optional[int] = None, runtime_env: Optional[Dict[str, Any]] = None,
                  progress_bars: bool = False, input_bytes: Optional[int] = None,
                  worker_logs: bool = True) -> Executor:
    """The executor called ``name``; the Ray arguments are those of ``ray.init`` (see ``env``), the
    object store of a local Ray sized by :func:`store_bytes` for ``input_bytes``; ``worker_logs``
    (``env.worker_logs``): a local Ray streams its workers' output to the driver."""
    if name == "inprocess":
        from loadkit.execute.inprocess import InProcessExecutor

        return InProcessExecutor()
    from loadkit.execute.ray import RayExecutor  # only now: importing Ray costs seconds

    store = object_store_memory if address else store_bytes(object_store_memory, input_bytes)
    return RayExecutor(address, num_cpus, store, runtime_env, progress_bars, worker_logs)

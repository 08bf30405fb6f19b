"""loadkit.execute: the executor choice as a pure function, the in-process path free of Ray, and its
parse threads (result order, thread count, the same batches as one thread)."""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Tuple

import psycopg2
import pytest

from loadkit.examples.cnpj.sample import generate_month
from loadkit.execute import choose_executor, make_executor
from loadkit.execute.inprocess import InProcessExecutor, _Failed, _in_file_order, _Item, parse_threads
from loadkit.records import BatchResult
from loadkit.runner import run_job
from tests.conftest import ROOT, compose, query
from tests.helpers import zip_members_into_one

GB = 1 << 30


@pytest.mark.parametrize("requested,address,nbytes,cpus,expected", [
    ("ray", None, 0, 1, "ray"),  # an explicit choice wins, however small
    ("inprocess", "auto", 100 * GB, 64, "inprocess"),
    ("auto", "auto", 0, 1, "ray"),  # a cluster run is always Ray
    ("auto", None, 1 * GB, 8, "inprocess"),  # a small input
    ("auto", None, 100 * GB, 2, "inprocess"),  # a small machine
    ("auto", None, 100 * GB, 8, "ray"),
    ("auto", None, 2 * GB, 3, "ray"),  # just past both limits
])
def test_auto_rule(requested: str, address: object, nbytes: int, cpus: int, expected: str) -> None:
    assert choose_executor(requested, address, nbytes, cpus, inprocess_max_bytes=2 * GB - 1,
                           inprocess_max_cpus=2) == expected


@pytest.mark.parametrize("nbytes,cpus,expected", [
    (1 * GB, 64, "inprocess"),  # Ray's ~15 s start-up is not paid back below 2 GiB (choose_executor)
    (3 * GB, 8, "ray"),
    (100 * GB, 4, "inprocess"),  # on 4 cores Ray's CPU per row is never paid back
    (3 * GB, 5, "ray"),
])
def test_auto_rule_with_the_configured_defaults(nbytes: int, cpus: int, expected: str) -> None:
    from loadkit.config import EnvConfig

    env = EnvConfig()
    assert choose_executor("auto", None, nbytes, cpus, env.inprocess_max_bytes, env.inprocess_max_cpus) == expected


def test_an_inprocess_run_never_imports_ray() -> None:
    """The runner, the executor package and the in-process executor load without Ray (seconds of import)."""
    code = ("import sys, loadkit.runner, loadkit.execute; from loadkit.execute import make_executor; "
            "e = make_executor('inprocess'); e.start(); e.size_channel(10).publish(5); "
            "print(e.name, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["inprocess", "False"]


@pytest.mark.parametrize("worker_logs", [False, True])
def test_a_local_ray_starts_without_autoscaler_monitor_or_dashboard_head(worker_logs: bool) -> None:
    """A local Ray is one fixed node: no autoscaler monitor, no dashboard head (issue #16, ~140 MB PSS), the
    dashboard agent's stand-in (ray_agent_stub.py: this install's agent loads no module, ~1.1 CPU-s and 77 MB)
    and its log monitor only with env.worker_logs; a task runs. Catches a Ray whose Node or agent command
    no longer takes the switches."""
    code = ("import sys, psutil, ray; from loadkit.execute.ray import ensure_ray; "
            f"ensure_ray(None, 1, 128 * 2**20, None, False, worker_logs={worker_logs}); "
            "cmds = [next((a for a in c[1:] if a.endswith('.py')), c[0]) for c in "  # the program or its script
            "(p.cmdline() for p in psutil.Process().children(recursive=True)) if c]; "
            "print(*sorted({s for c in cmds for s in ('gcs_server', 'raylet', 'log_monitor.py', "
            "'dashboard/dashboard.py', 'dashboard/agent.py', 'ray_agent_stub.py', '/monitor.py') if s in c})); "
            "print(ray.get(ray.remote(lambda: 42).remote())); ray.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [" ".join(["gcs_server", *(["log_monitor.py"] if worker_logs else []),
                                                 "ray_agent_stub.py", "raylet"]), "42"]


def test_the_agent_stub_writes_no_service_ports_and_lives_as_long_as_the_raylet(tmp_path: Path) -> None:
    """ray_agent_stub writes -1 for each named port, as Ray's minimal agent does (the raylet waits for those
    files), and exits once the raylet is gone (the raylet fate-shares with its agent: an early exit would
    stop Ray) or at SIGTERM (the raylet's stop), with 0."""
    stub = ROOT / "loadkit" / "execute" / "ray_agent_stub.py"
    for stop in ("raylet exits", "SIGTERM"):
        raylet = subprocess.Popen(["sleep", "60"])
        agent = subprocess.Popen([sys.executable, "-u", str(stub), "--ports=metrics_agent_port,listen_port",
                                  "/ray/dashboard/agent.py", "--node-id=n1", f"--session-dir={tmp_path}", "--head"],
                                 env={**os.environ, "RAY_RAYLET_PID": str(raylet.pid)})
        try:
            deadline = time.monotonic() + 30
            while len(list(tmp_path.glob("*_n1"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert {p.name: p.read_text() for p in tmp_path.glob("*_n1")} == {"metrics_agent_port_n1": "-1",
                                                                              "listen_port_n1": "-1"}
            time.sleep(1.5)
            assert agent.poll() is None, "the agent left while its raylet lives"
            if stop == "SIGTERM":
                agent.terminate()
            else:
                raylet.kill()
                raylet.wait()
            assert agent.wait(timeout=10) == 0
        finally:
            for p in (agent, raylet):
                p.kill()
                p.wait()


@pytest.mark.slow
def test_a_local_ray_runs_ray_data_without_its_helper_actors_and_a_joined_one_keeps_them() -> None:
    """Ray Data's stats actor, actor location tracker and autoscaling coordinator are named actors, each a
    worker process of its own (~310 MB PSS, issue #16); on the local Ray loadkit started they are answered in the driver
    (execute.ray._serve_ray_data_here) and an actor-pool dataset still runs. A Ray this process joined
    (here: started by plain ray.init after a shutdown) keeps Ray Data's own. Catches a Ray Data that
    looks them up elsewhere."""
    code = """if True:
        import ray, ray.data
        from loadkit.execute.ray import ensure_ray

        class Double:
            def __call__(self, batch):
                return {"x": batch["x"] * 2}

        def run():
            ds = ray.data.from_items([{"x": i} for i in range(20)], override_num_blocks=4)
            rows = ds.map_batches(Double, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5).take_all()
            helpers = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
            print(sorted(r["x"] for r in rows) == [2 * i for i in range(20)], len(helpers), *helpers)

        ensure_ray(None, 1, 128 * 2**20, None, False, worker_logs=False)
        run()
        ray.shutdown()
        ray.init(num_cpus=1, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False)
        run()
        ray.shutdown()
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["True 0",
                                       "True 3 ActorLocationTracker AutoscalingCoordinator datasets_stats_actor"]


@pytest.mark.parametrize("requests", [
    [("a", [], 180)],  # a lone dataset: the whole node
    [("a", [{"CPU": 1.0}], 180)],
    [("a", [{"CPU": 1.0}, {"CPU": 1.0}], 180), ("b", [], 180)],  # bundles first, then the leftover split
    [("a", [{"CPU": 0.5}], 180), ("b", [{"CPU": 1.0}, {"CPU": 1.0}], 180), ("c", [], 180)],  # b's second misses
    [("a", [], 180), ("b", [], 5)],  # b's request expires at t=10: a gets everything back
    [("a", [{"CPU": 1.0}], 180), ("b", [{"CPU": 1.0}], 180), ("a", None, 0)],  # a cancels (None)
])
def test_the_local_coordinator_reserves_what_ray_datas_coordinator_actor_reserves(requests: list) -> None:
    """execute.ray._NodeShare (Ray Data's autoscaling coordinator answered in the driver of a local Ray)
    against Ray Data's own coordinator class, run here as a plain object on the same one node and clock."""
    from ray.data._internal.cluster_autoscaler.base_autoscaling_coordinator import STANDARD_RESOURCE_TYPES
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor

    from loadkit.execute.ray import _NodeShare

    node = {"NodeID": "n1", "Alive": True, "Labels": {},
            "Resources": {"CPU": 2.0, "memory": 8e9, "object_store_memory": 2.5e8, "node:127.0.0.1": 1.0}}
    clock = [0.0]
    theirs = _AutoscalingCoordinatorActor(get_current_time=lambda: clock[0], get_cluster_nodes=lambda: [node],
                                          send_resources_request=lambda *a, **kw: None)
    ours = _NodeShare("n1", dict(node["Resources"]), clock=lambda: clock[0])
    for requester, bundles, expire in requests:
        clock[0] += 1
        if bundles is None:
            theirs.cancel_request(requester)
            ours.cancel_request.remote(requester)
            continue
        for coordinator in (theirs.request_resources, ours.request_resources.remote):
            coordinator(requester_id=requester, resources=bundles, expire_after_s=expire,
                        request_remaining=STANDARD_RESOURCE_TYPES)
    clock[0] = 10.0
    theirs._tick()  # the actor purges expired requests on its 20 s tick; ours on every question
    for requester in "abc":
        assert ours.reserved(requester) == theirs.get_reserved_resources(requester), requester


def test_local_size_channel_is_what_read_tasks_poll() -> None:
    executor = make_executor("inprocess")
    assert isinstance(executor, InProcessExecutor)
    channel = executor.size_channel(100)
    assert channel.board.poll(3, 0.5) == 100
    channel.publish(250)
    assert channel.board.poll(2, 0.25) == 250 and channel.counters() == (5, 0.75)


@pytest.mark.slow
def test_ray_size_channel_sums_what_remote_read_tasks_report(ray_session: None) -> None:
    """The Ray board (no actor: Ray's key-value store) as a read task in another process sees it."""
    import ray

    from loadkit.execute.ray import RaySizeChannel

    channel = RaySizeChannel(100)

    @ray.remote(num_cpus=0)
    def read_task(board: Any, polls: int) -> list:
        return [board.poll(1, 0.5) for _ in range(polls)]

    assert ray.get([read_task.remote(channel.board, 2), read_task.remote(channel.board, 3)]) == [[100] * 2, [100] * 3]
    assert channel.counters() == (5, 2.5)  # each task's running totals, summed
    channel.publish(250)
    assert ray.get(read_task.remote(channel.board, 1)) == [250]
    channel.close()
    assert channel.counters() == (0, 0.0)  # its keys are gone from the store


@pytest.mark.parametrize("writers, parse_concurrency, units, cpus, expected", [
    (2, 0, 3, 2, 2),  # this machine: one loader per core, at least pool.writers
    (2, 0, 40, 16, 16),  # a cluster: one per CPU
    (4, 0, 40, 2, 4),  # pool.writers is the floor
    (2, 0, 1, 16, 1),  # never more loaders than units (each loads one unit at a time)
    (2, 3, 40, 16, 3),  # pool.parse_concurrency sets it
    (2, 0, 0, 2, 1),  # at least one
])
def test_loader_count(writers: int, parse_concurrency: int, units: int, cpus: int, expected: int) -> None:
    from types import SimpleNamespace

    from loadkit.execute.ray import loader_count

    plan = SimpleNamespace(writers=writers, parse_concurrency=parse_concurrency)
    assert loader_count(plan, units, cpus) == expected  # type: ignore[arg-type]


# ------------------------------------------------------------------ a retried Ray loader call replays its outputs


def _as_results(chunks: Any, period: str) -> List[BatchResult]:
    """What a loader call yields for these chunks when every data chunk commits (parse and write left out:
    the order and identity of the outputs is what a retry must repeat)."""
    from loadkit.plan import batch_id
    from loadkit.records import carry

    return [carry(c, BatchResult, status="committed" if c.kind == "data" else c.kind,
                  batch_id=batch_id(c.table_name, period, c.file_sha, c.member, c.start) if c.kind == "data" else 0,
                  rows_in=c.end - c.start, rows_loaded=c.end - c.start)
            for c in chunks]


def _ledger_rows(results: List[BatchResult], run_id: str) -> list:
    """The ledger's rows (``Ledger.file_batches``) for these committed results, committed in this order."""
    from loadkit.postgres.ledger import LedgerBatch

    return [LedgerBatch(r.batch_id, run_id, r.member, r.start, r.end, r.first_line, r.rows_in, r.rows_loaded, 0, 0,
                        0, "writer-1", 1, 1000.0 + i) for i, r in enumerate(results)]


def _shape(results: List[BatchResult]) -> List[tuple]:
    return [(r.kind, r.member, r.start, r.end, r.batch_id, r.rows_in, r.chunks) for r in results]


@pytest.fixture(scope="module")
def two_member_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A month whose estabelecimentos are one zip of two members (the generator writes one member a zip)."""
    root = tmp_path_factory.mktemp("members")
    month = generate_month(root, 2024, 5, rows=4000, shards=2, seed=7)
    zip_members_into_one([root / p for p in month.files["estabelecimentos"]])
    return root


def _estabelecimentos_units(layout: str, two_member_zip: Path, tmp_path: Path) -> Tuple[Any, List[Any]]:
    """(plan, read units) of the one estabelecimentos file: "two members" = one zip of two members (batch
    size 40), "split file" = a plain csv split in two spans (pool.read_splits=2, batch size 200)."""
    from loadkit.plan import build_plan
    from loadkit.source.read import ReadUnit, split_units

    if layout == "two members":
        cfg = compose(["+job=monthly", "year=2024", "month=5", f"data_root={two_member_zip}", "batch.size=40"])
    else:
        raw = generate_month(tmp_path, 2024, 5, rows=3000, shards=1, seed=11, compress=False)
        cfg = compose(["+job=monthly", "year=2024", "month=5", f"data_root={raw.root}", "batch.size=200",
                       "batch.read_block_bytes=65536", "pool.read_splits=2",
                       'job.tables.estabelecimentos.source.paths=["{year:04d}-{month:02d}/*ESTABELE"]',
                       "job.tables.estabelecimentos.source.format=csv",
                       "job.tables.estabelecimentos.source.member=null",
                       *[f"job.tables.{t}.enabled=false" for t in ("empresas", "socios", "simples", "cnaes", "motivos",
                                                                   "municipios", "naturezas", "paises",
                                                                   "qualificacoes")]])
    plan = build_plan(cfg)
    table = plan.table("estabelecimentos")
    assert len(table.files) == 1
    units = split_units([ReadUnit(table, table.files[0], (), plan.batch.size)], plan.read_splits,
                        plan.batch.read_block_bytes)
    return plan, units


@pytest.mark.parametrize("layout", ["two members", "split file"])
def test_a_retried_unit_load_begins_with_the_dead_attempts_outputs(layout: str, two_member_zip: Path,
                                                                   tmp_path: Path) -> None:
    """Ray re-runs a retried loader call from its start and drops, by position, the outputs the dead attempt
    already delivered. Whatever number of batches the dead attempt committed (0 to all), the retry --
    which skips those ranges in the file -- re-reports them where the dead attempt reported them: its
    outputs equal a complete first attempt's, member eofs (and their chunk counts) included. A split
    file's other span, loaded by another loader of the same run, is never replayed into this one."""
    from dataclasses import replace

    from loadkit.execute.ray import _ranges, _replayed, _with_replay
    from loadkit.source.read import read_unit

    plan, units = _estabelecimentos_units(layout, two_member_zip, tmp_path)
    other: List[BatchResult] = []  # the file's other span, committed meanwhile by another loader of this run
    if layout == "split file":
        assert len(units) == 2
        other = [r for r in _as_results(read_unit(units[0]), plan.period) if r.kind == "data"]
    unit = units[-1]
    first = _as_results(read_unit(unit), plan.period)
    data = [r for r in first if r.kind == "data"]
    assert len(data) >= 6 and len({r.member for r in data}) == (2 if layout == "two members" else 1)
    for dead in range(len(data) + 1):  # the dead attempt committed its first `dead` batches
        ledger = _ledger_rows(other + data[:dead], plan.run_id)
        retry = _with_replay(iter(_as_results(read_unit(replace(unit, committed=_ranges(ledger))), plan.period)),
                             _replayed(unit, ledger, plan.run_id))
        assert _shape(list(retry)) == _shape(first), f"the dead attempt committed {dead} batch(es)"


@pytest.mark.parametrize("layout", ["two members", "split file"])
def test_whatever_a_dead_attempt_delivered_and_whatever_size_its_retry_reads_every_batch_arrives_once(
        layout: str, two_member_zip: Path, tmp_path: Path) -> None:
    """The driver receives the dead attempt's delivered outputs, then the retry's past that many (Ray's
    by-position drop). For every number of batches the dead attempt committed, every number of outputs it
    had delivered (from just before its last commit's yield -- killed between commit and yield -- to just
    before its next commit, eofs included), and a retry reading at another batch size (the board moved),
    every batch committed in the unit arrives exactly once and every member's eof once."""
    from dataclasses import replace

    from loadkit.execute.ray import _ranges, _replayed, _with_replay
    from loadkit.source.read import read_unit

    plan, units = _estabelecimentos_units(layout, two_member_zip, tmp_path)
    assert len(units) == (1 if layout == "two members" else 2)
    checked = 0
    for unit in units:
        other = [r for u in units if u is not unit for r in _as_results(read_unit(u), plan.period)
                 if r.kind == "data"]
        first = _as_results(read_unit(unit), plan.period)
        at = [i for i, r in enumerate(first) if r.kind == "data"]
        members = sorted(r.member for r in first if r.kind == "eof")
        for rows in (7, 97, 1000):  # the retry's batch size
            for dead in range(len(at) + 1):
                mine = [first[i] for i in at[:dead]]
                ledger = _ledger_rows(other + mine, plan.run_id)
                retry = list(_with_replay(iter(_as_results(
                    read_unit(replace(unit, committed=_ranges(ledger), batch_rows=rows)), plan.period)),
                    _replayed(unit, ledger, plan.run_id)))
                known = {b.batch_id for b in ledger}
                want = sorted([r.batch_id for r in mine] + [r.batch_id for r in retry if r.kind == "data"
                                                              and r.batch_id not in known])
                for delivered in range(at[dead - 1] if dead else 0, (at[dead] if dead < len(at) else len(first)) + 1):
                    got = first[:delivered] + retry[delivered:]
                    assert sorted(r.batch_id for r in got if r.kind == "data") == want, (rows, dead, delivered)
                    assert sorted(r.member for r in got if r.kind == "eof") == members, (rows, dead, delivered)
                    checked += 1
    assert checked > 50


def test_a_batch_another_run_committed_after_planning_is_replayed_skipped(two_member_zip: Path) -> None:
    """A killed run's orphaned loader commits the batch in hand after this run planned (README: at most one
    per loader): the dead attempt of this run's loader reported that batch ``skipped`` where it reached it,
    and the retry's read skips it (the ledger has it). Whatever the dead attempt delivered (before or past
    that batch, between a commit and its yield), what the driver receives -- the delivered prefix, then the
    retry's outputs past it, by position -- holds every batch this run committed exactly once. Before: the
    retry left the other run's batch out, fell one output short and Ray's by-position drop lost one of this
    run's batches (the accounting check stopped the run with LedgerMismatch, exit 1)."""
    from dataclasses import replace

    from loadkit.execute.ray import _ranges, _replayed, _with_replay
    from loadkit.plan import build_plan
    from loadkit.source.read import ReadUnit, read_unit

    plan = build_plan(compose(["+job=monthly", "year=2024", "month=5", f"data_root={two_member_zip}",
                               "batch.size=40"]))
    table = plan.table("estabelecimentos")
    unit = ReadUnit(table, table.files[0], (), plan.batch.size)
    clean = _as_results(read_unit(unit), plan.period)
    at = [i for i, r in enumerate(clean) if r.kind == "data"]  # output positions of the batches
    checked = 0
    for x in (at[1], at[len(at) // 2], at[-1]):  # the orphan's batch: early, in the second member, last
        orphan = _ledger_rows([clean[x]], "the killed run")
        for dead in range(len(at) + 1):  # the dead attempt reached its first `dead` batches
            reached_x = dead > at.index(x)
            first = [replace(r, status="skipped") if i == x and reached_x else r for i, r in enumerate(clean)]
            mine = [first[i] for i in at[:dead] if i != x]
            ledger = orphan + _ledger_rows(mine, plan.run_id)
            retry = list(_with_replay(iter(_as_results(read_unit(replace(unit, committed=_ranges(ledger))),
                                                       plan.period)), _replayed(unit, ledger, plan.run_id)))
            news = [r.batch_id for r in retry[len(mine):] if r.kind == "data" and r.status == "committed"
                    and r.batch_id not in {b.batch_id for b in ledger}]
            want = sorted([r.batch_id for r in mine] + news)
            assert len(want) == len(at) - 1  # every batch but the orphan's, this run's
            lo = at[dead - 1] + 1 if dead else 0  # delivered: everything before the next commit, and maybe
            hi = at[dead] if dead < len(at) else len(first)  # not the last committed one (killed before its yield)
            for delivered in range(max(0, lo - 1) if dead else 0, hi + 1):
                got = first[:delivered] + retry[delivered:]
                assert sorted(r.batch_id for r in got if r.kind == "data" and r.status == "committed") == want, \
                    (x, dead, delivered)
                assert sorted(r.member for r in got if r.kind == "eof") == sorted({r.member for r in clean
                                                                                    if r.kind == "eof"})
                checked += 1
    assert checked > 3 * len(at)


def test_ranges_planned_before_the_run_are_skipped_not_replayed(two_member_zip: Path) -> None:
    """Batches the unit was planned with (an earlier run's, or this run's before a re-read round) are
    skipped by the read and never re-reported: only what this call's earlier attempts committed is."""
    from dataclasses import replace

    from loadkit.execute.ray import _ranges, _replayed, _with_replay
    from loadkit.plan import build_plan
    from loadkit.source.read import ReadUnit, read_unit

    plan = build_plan(compose(["+job=monthly", "year=2024", "month=5", f"data_root={two_member_zip}",
                               "batch.size=40"]))
    table = plan.table("estabelecimentos")
    whole = ReadUnit(table, table.files[0], (), plan.batch.size)
    data = [r for r in _as_results(read_unit(whole), plan.period) if r.kind == "data"]
    planned = _ledger_rows(data[2:5], "an earlier run") + _ledger_rows(data[-3:], plan.run_id)  # some per member
    unit = replace(whole, committed=_ranges(planned))
    first = _as_results(read_unit(unit), plan.period)  # the first attempt skips the planned ranges
    assert not any(r.batch_id in {b.batch_id for b in planned} for r in first)
    dead = [r for r in first if r.kind == "data"][:4]
    ledger = planned + _ledger_rows(dead, plan.run_id)
    assert sum(len(v) for v in _replayed(unit, ledger, plan.run_id).values()) == 4
    retry = _with_replay(iter(_as_results(read_unit(replace(unit, committed=_ranges(ledger))), plan.period)),
                         _replayed(unit, ledger, plan.run_id))
    assert _shape(list(retry)) == _shape(first)


def test_the_driver_drops_a_result_it_already_has() -> None:
    """A retry delivered whole (a fresh call) repeats results: each batch, and each unit's eof, counts once."""
    from loadkit.execute.ray import Once

    def result(kind: Any, member: str = "m", batch_id: int = 0) -> BatchResult:
        return BatchResult(kind=kind, table_name="t", file_sha="s", member=member, batch_id=batch_id,
                           status="committed" if kind == "data" else kind)

    once = Once()
    stream = [(0, result("data", batch_id=1)), (0, result("data", batch_id=2)),  # the dead attempt
              (0, result("data", batch_id=1)), (0, result("data", batch_id=2)), (0, result("data", batch_id=3)),
              (0, result("eof")), (1, result("eof")),  # another unit (a span of the same file) has its own eof
              (0, result("eof"))]
    kept = [(u, r.kind, r.batch_id) for u, r in stream if once.first(u, r)]
    assert kept == [(0, "data", 1), (0, "data", 2), (0, "data", 3), (0, "eof", 0), (1, "eof", 0)]
    assert once.dropped == 3


def _item(unit: int, kind: Any, issued: int, start: int = 0) -> _Item:
    """A result as a writer thread hands it back (see inprocess._Item)."""
    record = BatchResult(kind=kind, table_name="t", file_sha=f"sha{unit}", member="m", start=start,
                         status="committed" if kind == "data" else kind)
    return _Item(unit, kind != "data", issued, record)


def test_eof_and_error_records_come_after_their_units_batches() -> None:
    """Parse threads and writers finish out of order; a member's eof (and a file's error) is held
    until every batch its read unit issued before it has been yielded (RunMetrics' ``ended``)."""
    results: "queue.Queue[object]" = queue.Queue()
    arrivals = [
        _item(0, "eof", 3),  # unit 0's eof overtakes its 3 batches
        _item(0, "data", 2, start=200), _item(1, "data", 1, start=0),
        _item(1, "error", 1),  # unit 1 failed after its one batch: released at once
        _item(0, "data", 1, start=0),
        _item(2, "eof", 0),  # an empty member: nothing to wait for
        _item(0, "data", 3, start=400),
    ]
    for item in arrivals:
        results.put(item)
    results.put(None)
    results.put(None)  # two writers ended
    got = [(r.file_sha, r.kind, r.start) for r in _in_file_order(results, writers=2)]
    assert got == [("sha0", "data", 200), ("sha1", "data", 0), ("sha1", "error", 0), ("sha0", "data", 0),
                   ("sha2", "eof", 0), ("sha0", "data", 400), ("sha0", "eof", 0)]


def test_a_writer_failure_reaches_the_caller() -> None:
    results: "queue.Queue[object]" = queue.Queue()
    results.put(_item(0, "data", 1))
    results.put(_Failed(RuntimeError("copy failed")))
    stream = _in_file_order(results, writers=1)
    assert next(stream).kind == "data"
    with pytest.raises(RuntimeError, match="copy failed"):
        next(stream)


@pytest.mark.parametrize("parsers,writers", [(1, 2), (3, 2), (2, 4)])
def test_inprocess_memory_is_bounded_by_its_queues_not_the_input(monkeypatch: pytest.MonkeyPatch, parsers: int,
                                                                   writers: int) -> None:
    """Chunks read but not yet written never exceed what the bounded queues and threads can hold
    (1 + 2 x parse threads + 2 x writers; 1 + 2 x writers when the read thread parses), however
    many chunks the input has: the in-process executor's memory is flat in the input size."""
    import threading
    import time
    from types import SimpleNamespace

    import loadkit.execute.inprocess as inprocess

    chunks = 300
    lock = threading.Lock()
    state = {"read": 0, "written": 0, "most": 0}

    def read_unit(unit: Any, board: Any) -> Any:
        for i in range(chunks):
            with lock:
                state["read"] += 1
                state["most"] = max(state["most"], state["read"] - state["written"])
            yield SimpleNamespace(kind="data", index=i)
        yield SimpleNamespace(kind="eof", index=chunks)

    class SlowWriter:
        def __init__(self, settings: Any) -> None:
            pass

        def write(self, batch: Any) -> Any:
            time.sleep(0.001)  # the server is the slow side: the read thread must wait, not read ahead
            with lock:
                state["written"] += batch.kind == "data"
            return batch

        def close(self) -> None:
            pass

    monkeypatch.setattr(inprocess, "read_unit", read_unit)
    monkeypatch.setattr(inprocess, "parse", lambda chunk, tables, period: chunk)
    monkeypatch.setattr(inprocess, "BatchWriter", SlowWriter)
    plan = SimpleNamespace(tables=(), parse_threads=parsers, writers=writers, period="2024-05", run_id="r",
                           env=SimpleNamespace(num_cpus=None))
    unit = SimpleNamespace(table=SimpleNamespace(name="t"), file=SimpleNamespace(size=1))
    out = list(InProcessExecutor().run(plan, [unit], SimpleNamespace(dsn=""), board=None))  # type: ignore[arg-type,list-item]
    assert [r.kind for r in out].count("data") == chunks and out[-1].kind == "eof"
    bound = 1 + 2 * writers + (2 * parsers if parsers > 1 else 0)
    assert 1 <= state["most"] <= bound < chunks


@pytest.mark.parametrize("configured,cpus,expected", [(3, 64, 3), (0, 1, 1), (0, 2, 1), (0, 4, 2), (0, 64, 4)])
def test_parse_threads_default_to_one_per_two_cores_up_to_four(configured: int, cpus: int, expected: int) -> None:
    assert parse_threads(configured, cpus) == expected


def test_parse_threads_load_the_same_batches_as_one(pg_dsn: str, schemas: tuple, job_overrides,
                                                     tmp_path: Path) -> None:
    """Three parse threads and small batches: every batch id, byte range and count in the ledger is
    the one-thread run's (ids come from byte ranges, never from the order batches finish in)."""
    month = generate_month(tmp_path / "data", 2024, 5, rows=3000, shards=2, seed=11)
    target, led = schemas
    columns = "batch_id, table_name, file_sha, member, start_offset, end_offset, first_line, rows_in, rows_loaded"
    ledgers = []
    try:
        for threads, (schema, ledger_schema) in ((1, (target, led)), (3, (f"{target}_p", f"{led}_p"))):
            overrides = job_overrides(month.root, "env.executor=inprocess", "tracking.enabled=false", "batch.size=25",
                                      f"pool.parse_threads={threads}", f"job.schema={schema}",
                                      f"sink.ledger_schema={ledger_schema}")
            result = run_job(compose(overrides))
            assert result.status == "succeeded", result.error
            assert {t: m.rows_read for t, m in result.metrics.tables.items()} == month.rows
            ledgers.append(sorted(query(pg_dsn, f'SELECT {columns} FROM "{ledger_schema}".batch')))
    finally:
        conn = psycopg2.connect(pg_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            for schema in (f"{target}_p", f"{led}_p", f"{target}_p__lk_stage"):
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.close()
    assert len(ledgers[0]) >= 20  # several 64 KB chunks per large file: room for reordering
    assert ledgers[0] == ledgers[1]


def test_a_summary_the_ledger_contradicts_stops_the_run_before_publishing(
        pg_dsn: str, schemas: tuple, job_overrides, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One committed batch's result never reaches the driver (injected between executor and driver): the run's
    counts are short of its ledger rows, so it fails as a bug (exit 1) naming both figures, publishes nothing,
    and a rerun publishes exactly what the ledger holds, reading nothing again."""
    from loadkit.errors import Category, LedgerMismatch, classify
    from loadkit.runner import exit_code
    from tests.test_faults import DROP_REFERENCE, assert_exactly_once

    month = generate_month(tmp_path / "data", 2024, 5, rows=600, shards=2, seed=3)
    target, led = schemas
    overrides = job_overrides(month.root, "env.executor=inprocess", "tracking.enabled=false", "batch.size=50",
                              *DROP_REFERENCE)
    deliver = InProcessExecutor.run
    lost: List[BatchResult] = []

    def losing_one(self: InProcessExecutor, *args: Any, **kwargs: Any) -> Any:
        for result in deliver(self, *args, **kwargs):
            if not lost and result.kind == "data" and result.table_name == "estabelecimentos":
                lost.append(result)
                continue
            yield result

    monkeypatch.setattr(InProcessExecutor, "run", losing_one)
    first = run_job(compose(overrides))
    monkeypatch.undo()
    assert lost and lost[0].status == "committed"
    assert first.status == "failed" and isinstance(first.error, LedgerMismatch), first.error
    assert classify(first.error) is Category.BUG and exit_code(first) == 1
    counted, in_ledger = month.rows["estabelecimentos"] - lost[0].rows_in, month.rows["estabelecimentos"]
    assert f"estabelecimentos: counted {first.metrics.tables['estabelecimentos'].batches} batches, {counted} read" \
        in str(first.error) and f"{in_ledger} read" in str(first.error), first.error
    assert query(pg_dsn, f'SELECT count(*) FROM "{led}".file')[0][0] == 0  # nothing settled, nothing published
    run_row = query(pg_dsn, f'SELECT status, error_category FROM "{led}".run WHERE run_id = %s', (first.run_id,))
    assert run_row == [("failed", "bug")]
    # The mismatch is found when estabelecimentos' files are all read (runner.EarlyPublish checks a table
    # before publishing it): the stream stops there, so the rerun reads what the first run had not committed.
    committed = query(pg_dsn, f'SELECT coalesce(sum(rows_in), 0) FROM "{led}".batch WHERE run_id = %s',
                      (first.run_id,))[0][0]
    rows = sum(month.rows[t] for t in first.metrics.tables)  # the tables the job kept
    assert 0 < committed <= rows
    again = run_job(compose(overrides))
    assert again.status == "succeeded", again.error
    assert sum(t.rows_read for t in again.metrics.tables.values()) == rows - committed
    assert_exactly_once(pg_dsn, schemas, month)

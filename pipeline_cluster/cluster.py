"""The cluster objects users hold: `Cluster` (root + log actors over any nodes) and `LocalCluster` (this machine).

Both offer `run(pipeline, inputs)`, a streaming iterator that reads inputs lazily, and the older project's
step-by-step interface (`setup`, `boot`, `feed`, `wait_input`, `wait_empty`, `sleep`, `wakeup`, `status`, `reset`,
`close`).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, overload
from collections.abc import Callable, Iterable, Sequence, Sized

import pykka
from tqdm import tqdm

from pipeline_cluster.actors.base import ask
from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.actors.log import LogActor
from pipeline_cluster.actors.node import NodeActor
from pipeline_cluster.actors.root import RootActor
from pipeline_cluster.alerts import Alerts
from pipeline_cluster.config import load_toml, stage_overrides
from pipeline_cluster.dashboard import Dashboard
from pipeline_cluster.durable import DurableRun
from pipeline_cluster.errors import ClusterError
from pipeline_cluster.journal import Journal, check_run_id
from pipeline_cluster.logs.records import Record
from pipeline_cluster.logs.route import LogClient, attach_local, detach_local, make_record
from pipeline_cluster.messages import (AddNode, Begin, Boot, DeadLetter, DrainNode, Feed, Kill, LogTo, NodeLoad, Pause,
                                       RemoveNode, Resize, Setup, Shutdown, Stats, Unfinished)
from pipeline_cluster.model import Pipeline, as_pipeline
from pipeline_cluster.placement import Placement, make_placement, start_thread
from pipeline_cluster.run import FEED_CHUNK, Feeder, Results, RunPhase, RunState, RunSummary
from pipeline_cluster.rundir import DeadLetterStore, RunDir, WriteTrouble, new_run_id, runs_root
from pipeline_cluster.sinks import Sink
from pipeline_cluster.stats import RecentRates, StageStats
from pipeline_cluster.transport.auth import resolve_authkey
from pipeline_cluster.transport.links import LocalLink, NodeLink, RemoteLink
from pipeline_cluster.verdict import verdict

STATS_REFRESH_SECONDS = 2.0
TRACEBACK_SHOWN = 4000  # characters of a dead letter's traceback (its end) and message shown live
LOG_BACKLOG = 10_000  # log records that may wait for the LogActor; more are dropped and counted
DRAIN_POLL_SECONDS = 0.05  # how often remove_node looks whether the node has finished what it holds

_open_clusters: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _close_forgotten_clusters() -> None:
    for cluster in list(_open_clusters):
        cluster.close(drain=False)


class Cluster:
    """A root (RootActor, LogActor) driving a set of nodes; subclasses decide where the nodes are.

    `placement=True` opts in to running the framework's threads on one CPU beside a waiting caller (see
    `pipeline_cluster.placement`); by default no thread or process has its CPUs or scheduling changed.
    `log_server=(host, port)` also sends the cluster's log to a log server (`pipeline-cluster log`).
    `dashboard=True` (or "host:port"; port 0 picks a free one) serves a live page of the run's figures, their
    JSON and Prometheus `/metrics`, on 127.0.0.1 by default (`cluster.dashboard_url`).
    """

    def __init__(self, *, credit: int | None = None, run_dir: str | None = None, log_file: str | None = None,
                 log_stderr: bool = False, start_timeout: float = 60.0, log_level: int = logging.INFO,
                 config: str | os.PathLike | dict | None = None, placement: bool = False,
                 log_server: tuple[str, int] | None = None, dashboard: bool | str = False) -> None:
        if credit is not None and (isinstance(credit, bool) or not isinstance(credit, int) or credit < 1):
            raise ValueError(f"credit must be a positive int (or None: adapt to item size), got {credit!r}")
        self.stage_config = {} if config is None else stage_overrides(load_toml(config))
        self.placement: Placement = make_placement(placement)
        self._run_dir_option = run_dir
        self._runs = 0  # runs started (each gets a run directory of its own)
        self.rundir = RunDir(run_dir)
        self.start_timeout = start_timeout
        self.log_level = log_level
        self._log_file_option = log_file
        self._trouble = WriteTrouble()
        self._recent = RecentRates()
        self._log_room = threading.Semaphore(LOG_BACKLOG)
        self._log_dropped = 0
        forward = LogClient(log_server) if log_server is not None else None  # the older project's log server
        self.log_ref = LogActor.start(log_file or str(self.rundir.log_file), log_stderr, placement=self.placement,
                                      forward=forward, trouble=self._trouble, room=self._log_room)
        attach_local(self.log_sink, node="root")
        self._dead: DeadLetterStore | DurableRun = DeadLetterStore(self.rundir.dead_letter_file, self._trouble)
        self._durable: DurableRun | None = None  # the running run's journal side, when it has one
        self._dead_alerts = Alerts(self._warn, "item(s) dead-lettered")
        self.root = RootActor.start(credit, self._on_dead_letters, self.placement, self._warn)
        self.links: list[NodeLink] = []
        self.pipeline: Pipeline | None = None
        self._keyed = False  # the pipeline's nodes report each output's input (ordered or keyed runs)
        self.state = RunState(self.placement)
        self.outputs: list = []
        self._phase = RunPhase.IDLE
        self._paused = False
        self._handler_mode = False  # outputs go to a handler thread (boot) rather than a Results iterator (run)
        self._threads: list[threading.Thread] = []
        self._last_stats: dict[str, dict[str, Any]] = {}
        self._last_root: dict[str, float | None] = {}  # the last run's root load, for verdicts after it ended
        self._run_clock = (0.0, 0.0)  # (monotonic, process CPU) when the run's workers were up
        self._feeder: Feeder | None = None
        self._last_error: BaseException | None = None  # what ended the last run, if it failed
        self._run_lock = threading.RLock()  # one thread at a time ends a run
        self._stop = threading.Event()
        self._dashboard = Dashboard(self._figures, dashboard, self.resize) if dashboard else None
        if self._dashboard is not None:
            sys.stderr.write(f"pipeline_cluster dashboard: {self._dashboard.url}\n")
        _open_clusters.add(self)

    @property
    def dashboard_url(self) -> str | None:
        """The dashboard's address (with its token, when it needs one), or None without a dashboard."""
        return None if self._dashboard is None else self._dashboard.url

    def _figures(self) -> dict[str, Any]:
        return {**self.status(), "run_id": self.run_id}

    # -- wiring --------------------------------------------------------------------------------------------------

    def log_sink(self, record: Record) -> None:
        """Where every process's log records end: the LogActor. At most LOG_BACKLOG records wait for it; beyond
        that, records are dropped and counted (a stage that logs faster than the disk takes it cannot grow memory
        without bound), and the count is reported when the run ends."""
        if not self._log_room.acquire(blocking=False):
            self._log_dropped += 1
            return
        try:
            self.log_ref.tell(record)
        except pykka.ActorDeadError:  # the cluster is closed: the line still goes somewhere
            self._log_room.release()
            sys.stderr.write(record.format() + "\n")

    def _warn(self, text: str) -> None:
        """A warning for the person running the pipeline: in the log, and on stderr."""
        self.log_sink(make_record(text, logging.WARNING, "pipeline_cluster"))

    @property
    def run_id(self) -> str:
        """The current (or last) run's id: the name of its run directory."""
        return self.rundir.run_id

    def _report(self, message: Any) -> None:
        self.root.tell(message)

    def _add_link(self, link: NodeLink) -> None:
        self.links.append(link)
        ask(self.root, AddNode(link))

    def _join(self, link: NodeLink) -> None:
        """Add a node while a pipeline is set up or running: it gets the pipeline, starts its workers when a run is
        on, and only then takes work (the link delivers in order, so its workers are booted before items come)."""
        with self._run_lock:
            self._check_open()
            if self._phase in (RunPhase.SETUP, RunPhase.RUNNING):
                assert self.pipeline is not None
                link.ask(Setup(self.pipeline, self._keyed), timeout=60)
            if self._phase is RunPhase.RUNNING:
                link.tell(Boot())
            self._add_link(link)

    def add_node(self, address: tuple[str, int], *, authkey: bytes | str | None = None, heartbeat: float = 1.0,
                 dead_after: float = 10.0, connect_timeout: float = 30.0) -> str:
        """Connect one more node server (`pipeline-cluster node`), also while a pipeline runs: it gets the
        pipeline, starts its workers and takes the work not yet handed out. Returns its name."""
        self._check_open()
        link = RemoteLink(address, resolve_authkey(authkey), self.root, self.log_sink, connect_timeout,
                          heartbeat=heartbeat, dead_after=dead_after, placement=self.placement)
        try:
            self._join(link)
        except BaseException:
            link.close()
            raise
        self.log_sink(make_record(f"node {link.name} added", logging.INFO, "pipeline_cluster"))
        return link.name

    def remove_node(self, name: str, timeout: float | None = 60.0) -> None:
        """Take node `name` out, also while a pipeline runs: it is sent nothing more, finishes the root items it
        holds (their outputs arrive as usual), then its connection closes and its workers stop. Items it still
        holds after `timeout` seconds go to the other nodes. The last node cannot be removed."""
        self._check_open()
        link = next((link for link in self._live_links() if link.name == name), None)
        if link is None:
            names = [live.name for live in self._live_links()]
            raise ValueError(f"no node {name!r} in this cluster; its nodes: {names}")
        if len(self._live_links()) == 1:
            raise ClusterError(f"node {name} is the cluster's last: add another before removing it")
        ask(self.root, DrainNode(name))
        deadline = None if timeout is None else time.monotonic() + timeout
        while ask(self.root, NodeLoad()).get(name, (0, 0))[0] and (deadline is None or time.monotonic() < deadline):
            time.sleep(DRAIN_POLL_SECONDS)
        ask(self.root, RemoveNode(name))
        link.close()
        self.links.remove(link)
        self.log_sink(make_record(f"node {name} removed", logging.INFO, "pipeline_cluster"))

    @property
    def capacity(self) -> int:
        """Root items allowed between feed and consumption: every node's credit plus one credit of backlog."""
        return self.state.capacity

    # -- step-by-step interface (the older project's) ------------------------------------------------------------

    def setup(self, name: Any = None, version: Any = None, pipeline: Any = None, *, keyed: bool = False) -> Pipeline:
        """Validate a pipeline (or taskchain) and send it to every node. `setup(pipeline)` works too. `keyed`: the
        nodes report each output's input (run() asks for it for ordered or keyed output)."""
        self._check_open()
        if pipeline is None and not isinstance(name, str) and name is not None:
            name, pipeline = None, name
        if pipeline is None:
            raise TypeError("setup() needs a pipeline: setup(name, version, taskchain) or setup(pipeline)")
        if self._phase is RunPhase.RUNNING:
            raise ClusterError("a pipeline is running: call reset() (or let run() finish) before setup()")
        self.pipeline = as_pipeline(pipeline, None if name is None else str(name), version)
        self._keyed = keyed
        if self.stage_config:
            self.pipeline.with_overrides(self.stage_config)
        for link in self._live_links():
            link.ask(Setup(self.pipeline, keyed), timeout=60)
        self._phase = RunPhase.SETUP
        return self.pipeline

    def boot(self, output_handler: Callable[[Any], Any] | None = None) -> None:
        """Start every stage's workers and the output stream; returns when all workers are up.

        Outputs go to `output_handler(output)` (in a delivery thread), or to the list `cluster.outputs`.
        """
        self._handler_mode = True
        self._start_run()
        handler = output_handler if output_handler is not None else self.outputs.append
        # it runs the user's handler: never placed (with placement on, it waits for outputs on the home CPU only)
        self._threads.append(start_thread(self._deliver, handler, self.state, name="pipeline-cluster-output"))

    def feed(self, *items: Any) -> None:
        """Give items to the cluster; blocks while the cluster already holds its capacity of unfinished items."""
        self._check_running()
        self._feed_chunks(items, 0)

    def _feed_chunks(self, items: Sequence[Any], stage: int, letters: Sequence[DeadLetter] = ()) -> None:
        """Feed items in chunks as room allows; `letters`: the dead letters they are, when fed again."""
        state = self.state
        for start in range(0, len(items), FEED_CHUNK):
            chunk = list(items[start:start + FEED_CHUNK])
            state.wait(lambda: state.room() > 0, what="room to feed")
            first_rid = state.fed_items(len(chunk))
            if letters and self._durable is not None:
                self._durable.refeeding(first_rid, list(letters[start:start + FEED_CHUNK]))
            self.root.tell(Feed(chunk, first_rid, stage))

    def wait_input(self, timeout: float | None = None) -> None:
        """Wait until every fed item has been handed to a node."""
        self._check_running()
        self.state.wait(lambda: self.state.at_root == 0, timeout, "the input queue to empty")

    def wait_empty(self, timeout: float | None = None) -> None:
        """Wait until every fed item is finished and its outputs reached the handler (or `cluster.outputs`)."""
        self._check_running()
        self.state.wait(self.state.all_consumed, timeout, "all items to finish")

    def resize(self, stage: str, workers: int) -> None:
        """Run `stage` on `workers` worker processes per node from now on, while the run goes on: new workers start at
        once; surplus ones stop once their batches are answered, so no item is lost or run twice."""
        self._check_running()
        assert self.pipeline is not None
        names = [s.name for s in self.pipeline.stages]
        if stage not in names:
            raise ValueError(f"no stage {stage!r} in pipeline {self.pipeline.name!r}; its stages: {names}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.pipeline.stages[names.index(stage)].workers = workers
        for link in self._live_links():
            link.ask(Resize(names.index(stage), workers), timeout=60)
        self.log_sink(make_record(f"stage {stage}: resized to {workers} worker(s) per node", logging.INFO,
                                  "pipeline_cluster"))

    def sleep(self) -> None:
        """Pause: workers finish what they run, nothing new starts."""
        self._check_running()
        self._paused = True
        ask(self.root, Pause(True))

    def wakeup(self) -> None:
        """Resume after sleep()."""
        self._check_running()
        self._paused = False
        ask(self.root, Pause(False))

    def nodes(self) -> list[dict[str, Any]]:
        """Per node: its state (ready, starting, lost, and why), the root items it holds unfinished, its credit, and
        seconds since it was last heard from (0 for the node in this process)."""
        load = ask(self.root, NodeLoad(), timeout=30) if self._phase is not RunPhase.CLOSED else {}
        now = time.monotonic()
        figures = []
        for link in self.links:
            in_flight, credit = load.get(link.name, (0, 0))
            state = ("lost" if not link.alive else
                     "ready" if link.name in self.state.ready_nodes else "starting")
            heard = getattr(link, "last_heard", now)
            figures.append({"node": link.name, "state": state, "in_flight": in_flight, "credit": credit,
                            "heartbeat_age_s": max(0.0, now - heard) if heard != float("inf") else 0.0,
                            "lost_reason": getattr(link, "lost_reason", None)})
        return figures

    def status(self) -> dict[str, Any]:
        """A snapshot: phase, nodes, counts of fed and unfinished items, failures, per-stage stats."""
        state = self.state
        running = self._phase is RunPhase.RUNNING
        return {
            "phase": "sleeping" if self._paused and running else self._phase.value,
            "pipeline": None if self.pipeline is None else self.pipeline.name,
            "version": None if self.pipeline is None else self.pipeline.version,
            "nodes": [link.name for link in self._live_links()],
            "ready_nodes": sorted(state.ready_nodes),
            "fed": state.fed,
            "waiting_at_root": state.at_root,
            "unfinished": state.fed - state.consumed,
            "failures": len(self._dead),
            **self._inputs_complete(),
            "error": None if state.error is None else str(state.error),
            "run_dir": str(self.rundir.path),
            "stages": self.stats() if self._phase is not RunPhase.CLOSED else self._last_stats,
            "verdict": self.verdict() if self._phase is not RunPhase.CLOSED else None,
            "root": self._root_load(),
            "node_figures": self.nodes() if self._phase is not RunPhase.CLOSED else [],
            "recent_failures": self._recent_failures(),
        }

    def _inputs_complete(self) -> dict[str, Any]:
        """A durable run's inputs complete (earlier attempts included) and their number once known; {} otherwise."""
        if not isinstance(self._dead, DurableRun):  # the current (or last) run's dead letters: its journal, if any
            return {}
        return {"inputs_complete": self._dead.complete, "inputs_total": self._dead.total}

    def _recent_failures(self) -> list[dict[str, Any]]:
        """The last few dead letters, newest first, as the dashboard shows them (the traceback's end)."""
        return [{"stage": letter.stage, "cause": letter.cause, "error_type": letter.error_type,
                 "message": letter.message[:TRACEBACK_SHOWN], "traceback": letter.traceback[-TRACEBACK_SHOWN:],
                 "attempts": letter.attempts, "node": letter.node} for letter in self._dead.recent()]

    def reset(self) -> dict[str, Any]:
        """Stop the pipeline at once (kill its workers) and forget it; returns what was unfinished.

        When nothing is unfinished, workers stop gracefully instead, so class stages' close() runs.
        """
        with self._run_lock:
            if self._phase in (RunPhase.IDLE, RunPhase.CLOSED):
                self.pipeline = None
                return {"unfinished": 0}
            unfinished = self._finish_run(graceful=None)
            self._phase = RunPhase.IDLE
            self.pipeline = None
            return {"unfinished": unfinished}

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Finish queued and in-flight items (unless `drain=False`), stop every worker and actor.

        A `run()` whose results nobody reads any more is stopped at once instead: its outputs have no taker.
        """
        if self._phase is RunPhase.CLOSED:
            return
        if self._dashboard is not None:
            self._dashboard.close()
        try:
            if drain and self._phase is RunPhase.RUNNING and self.state.error is None and self._handler_mode:
                self.wait_empty(timeout)
        finally:
            with self._run_lock:
                if self._phase is RunPhase.RUNNING:
                    self._finish_run(graceful=None if drain else False)
                self._phase = RunPhase.CLOSED
            for link in self.links:
                link.close()
            self.root.stop(block=True, timeout=30)
            detach_local(self.log_sink)
            self.log_ref.stop(block=True, timeout=30)
            self._trouble.summary()  # what the log lost while closing
            _open_clusters.discard(self)

    @classmethod
    def connect(cls, addresses: Iterable[tuple[str, int]], *, authkey: bytes | str | None = None,
                heartbeat: float = 1.0, dead_after: float = 10.0, connect_timeout: float = 30.0,
                **options: Any) -> Cluster:
        """A cluster over running node servers (`pipeline-cluster node`), one persistent connection each.

        A node that is still starting (it refuses connections) is tried again with backoff for up to
        `connect_timeout` seconds. A node silent for `dead_after` seconds (heartbeats every `heartbeat` s) counts
        as lost: its unfinished items go to the other nodes.
        """
        cluster = cls(**options)
        try:
            key = resolve_authkey(authkey)
            for address in addresses:
                cluster._add_link(RemoteLink(address, key, cluster.root, cluster.log_sink, connect_timeout,
                                             heartbeat=heartbeat, dead_after=dead_after, placement=cluster.placement))
        except BaseException:
            cluster.close(drain=False)
            raise
        if not cluster.links:
            cluster.close(drain=False)
            raise ValueError("Cluster.connect() needs at least one node address")
        return cluster

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(drain=exc_type is None)

    # -- the streaming interface ---------------------------------------------------------------------------------

    @overload
    def run(self, pipeline: Any, inputs: Iterable[Any], *, ordered: bool = False, keyed: bool = False,
            window: int | None = None, progress: bool = False, run_id: str | None = None,
            resume: bool | str = False, key: Callable[[Any], Any] | None = None, sink: None = None) -> Results: ...

    @overload
    def run(self, pipeline: Any, inputs: Iterable[Any], *, ordered: bool = False, keyed: bool = False,
            window: int | None = None, progress: bool = False, run_id: str | None = None,
            resume: bool | str = False, key: Callable[[Any], Any] | None = None, sink: Sink) -> RunSummary: ...

    def run(self, pipeline: Any, inputs: Iterable[Any], *, ordered: bool = False, keyed: bool = False,
            window: int | None = None, progress: bool = False, run_id: str | None = None,
            resume: bool | str = False, key: Callable[[Any], Any] | None = None,
            sink: Sink | None = None) -> Results | RunSummary:
        """Run `pipeline` over `inputs` (read lazily); returns an iterator of outputs.

        Outputs come in completion order; `ordered=True` gives them in input order (an input's own outputs in the
        order they reached the last stage), holding at most `window` inputs (default: the nodes' credit) between
        the oldest unfinished one and the newest fed, so one slow input holds the others back but never memory
        without bound. `keyed=True` gives each output as `(input_index, output)`, counting inputs from 0.
        `progress=True` shows a bar of the inputs completed on stderr (out of their number, when `inputs` has a
        length); log lines print above it.

        Durable runs: with `run_id` the run keeps a journal in its run directory, and `resume=True` goes on with
        that run after a crash, skipping the inputs it completed (`resume="force"` even when the pipeline's code or
        settings changed). Inputs are known by their position in `inputs` (which must then give the same items in
        the same order again, as a file does), or by `key(input)`. With `sink` (say `sinks.JsonLines(path)`) the
        outputs go there, committed with the journal so each is written exactly once, and `run` returns a
        RunSummary when the run ends.
        """
        self._check_open()
        if self._phase is RunPhase.RUNNING:
            raise ClusterError("a pipeline is already running on this cluster")
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
            raise TypeError(f"inputs must be an iterable of items, got {type(inputs).__name__}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive int (or None: the nodes' credit), got {window!r}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of an input, got {key!r}")
        self.setup(pipeline=pipeline, keyed=ordered or keyed)
        self._handler_mode = False
        durable = None
        if run_id is not None or resume or key is not None or sink is not None:
            durable = self._start_durable(run_id, resume, key, sink)
            inputs = durable.inputs(inputs)
        self._start_run(durable)
        state = self.state
        state.window = window

        def send(chunk: list, first_rid: int) -> None:
            if durable is not None:
                durable.fed(first_rid, len(chunk))
            self.root.tell(Feed(chunk, first_rid))

        feeder = Feeder(iter(inputs), state, send, self._stop, self.placement)
        self._feeder = feeder
        self._threads += feeder.start()
        bar = None
        if progress:
            total = len(inputs) if isinstance(inputs, Sized) else durable.total if durable is not None else None
            bar = tqdm(total=total, initial=0 if durable is None else durable.complete, unit="input",
                       desc=self.pipeline.name if self.pipeline else None)
        results = Results(state, lambda finished: self._end_results(state, finished), ordered, keyed, bar, durable)
        if sink is None:
            return results
        assert durable is not None
        results.drain(durable.wrote, sink.write)
        return RunSummary(self.run_id, durable.complete, durable.total, durable.outputs, len(durable))

    def _start_durable(self, run_id: str | None, resume: bool | str, key: Callable[[Any], Any] | None,
                       sink: Sink | None) -> DurableRun:
        """Open (or create) the run's journal; a bad run id, a run that exists, or a changed pipeline raise here,
        before any worker starts."""
        if run_id is None and resume:
            raise ValueError("resume needs the run_id of the run to go on with")
        run_id = new_run_id() if run_id is None else check_run_id(run_id)
        assert self.pipeline is not None
        journal = Journal.start(runs_root() / run_id, self.pipeline, resume, by_key=key is not None)
        try:
            durable = DurableRun(journal, key, sink, lambda: self.state.capacity, self._trouble)
        except BaseException:
            journal.close()
            raise
        if durable.finished_before:
            self._warn(f"run {run_id} finished before ({durable.complete} input(s) complete): nothing to do")
        return durable

    # -- internals -----------------------------------------------------------------------------------------------

    def _end_results(self, state: RunState, finished: bool) -> None:
        """A Results iterator ended (finished, or let go of early): stop its run if it still is the current one."""
        with self._run_lock:
            if self._phase is RunPhase.RUNNING and self.state is state:
                self._finish_run(graceful=finished)

    def _run_failed(self, error: BaseException) -> None:
        """A run's first fatal error (a stage out of restarts, the output handler raised, no node left). A run()
        ends when its Results iterator raises it; a booted run has none, so it is ended here, and the cluster
        can set up and boot again."""
        self._last_error = error
        if self._handler_mode:
            start_thread(self._end_failed_run, self.state, name="pipeline-cluster-end-run")

    def _end_failed_run(self, state: RunState) -> None:
        with self._run_lock:
            if self._phase is RunPhase.RUNNING and self.state is state:
                self._finish_run(graceful=False)

    def _start_run(self, durable: DurableRun | None = None) -> None:
        self._check_open()
        if self._phase is not RunPhase.SETUP:
            raise ClusterError("call setup() before boot()" if self._phase is RunPhase.IDLE else
                               "this pipeline was already booted: reset() first")
        assert self.pipeline is not None
        self.state = RunState(self.placement, on_fail=self._run_failed)
        self._last_error = None
        self.outputs = []
        self._next_run_dir(durable)
        self._stop.clear()
        self._paused = False
        self.state.first_rid = ask(self.root, Begin(self.state, [stage.name for stage in self.pipeline.stages]))
        self._phase = RunPhase.RUNNING
        for link in self._live_links():
            link.tell(Boot())
        try:
            self.state.wait(lambda: self.state.ready_nodes >= {link.name for link in self._live_links()},
                            self.start_timeout, "the workers to start")
        except BaseException:
            self._finish_run(graceful=False)
            raise
        self._run_clock = (time.monotonic(), time.process_time())
        self._feeder = None
        self._threads.append(self.placement.start_thread(self._refresh_stats, name="pipeline-cluster-stats"))

    def _deliver(self, handler: Callable[[Any], Any], state: RunState) -> None:
        """Hand outputs to the user's handler, one at a time, then count their root items as consumed."""
        while True:
            delivery = state.next_delivery()
            if delivery is None:
                if state.error is not None or self._stop.is_set():
                    return
                continue
            try:
                for output in delivery.outputs:
                    handler(output)
            except BaseException as exc:
                state.fail(exc)
                return
            state.consume(len(delivery.done), delivery.streamed)

    def _refresh_stats(self) -> None:
        """Rewrite stats.json every few seconds while the run lasts (a slow or failing refresh is retried)."""
        while not self._stop.wait(STATS_REFRESH_SECONDS):
            try:
                self._write_stats()
            except Exception as exc:  # a node that does not answer, say: said once a refresh, the thread goes on
                self._warn(f"stats.json not refreshed: {exc!r}")

    def _write_stats(self) -> None:
        stages = self.stats()
        root = self._root_load()
        outputs_waiting = self._phase is RunPhase.RUNNING and self.state.outputs_waiting()
        self.rundir.write_stats({"run_id": self.rundir.run_id, "time": time.time(),
                                 "running": self._phase is RunPhase.RUNNING,
                                 "pipeline": None if self.pipeline is None else self.pipeline.name,
                                 "failures": len(self._dead), **self._inputs_complete(), "stages": stages,
                                 "verdict": verdict(stages, outputs_waiting, root), "root": root,
                                 "node_figures": self.nodes(),
                                 "recent_failures": self._recent_failures()},
                                self._trouble)

    def _next_run_dir(self, durable: DurableRun | None) -> None:
        """Give a run after the first a run directory of its own (the first has the one made with the cluster):
        a new run id, or, under a `run_dir` the user chose, that path with `-2`, `-3`, ... added. A durable run
        uses its journal's directory, and its dead letters live in the journal."""
        self._runs += 1
        self._durable = durable
        first_dir_unused = self._runs == 1 and self._run_dir_option is None
        if durable is not None:
            self.rundir = RunDir(run_id=durable.journal.path.name)
            self._dead = durable
        elif self._runs == 1:
            return
        elif self._run_dir_option is None:
            self.rundir = RunDir()
        else:
            base = str(self._run_dir_option).rstrip("/")
            self.rundir = RunDir(f"{base}-{self._runs}", run_id=f"{os.path.basename(base)}-{self._runs}")
        if durable is None:
            self._dead = DeadLetterStore(self.rundir.dead_letter_file, self._trouble)
        if self._log_file_option is None:  # the first run's directory made with the cluster goes, unused
            self.log_ref.tell(LogTo(str(self.rundir.log_file), move=durable is not None and first_dir_unused))

    def _finish_run(self, graceful: bool | None) -> int:
        """Stop the running pipeline: gracefully, at once (False), or gracefully only if nothing is left (None)."""
        error_before = self.state.error
        try:
            self._last_stats = self.stats()
        except Exception:
            pass
        self._root_load()  # kept as the run's last figures
        self._stop.set()
        self.state.wake()
        unfinished = ask(self.root, Unfinished())
        if graceful is None:
            graceful = unfinished == 0
        if unfinished:  # anyone still waiting on this run (a Results iterator, wait_empty) gets an error, not a hang
            self.state.fail(ClusterError(f"the run was stopped with {unfinished} item(s) unfinished"))
        if graceful:
            for link in self._live_links():
                link.ask(Shutdown(5.0), timeout=60)
        else:
            ask(self.root, Kill(), timeout=120)
        self._phase = RunPhase.IDLE
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._threads.clear()
        if self._durable is not None:
            durable, self._durable = self._durable, None
            failed = error_before is not None or self.state.input_error is not None
            try:
                durable.finish("failed" if failed else "finished" if self.state.finished() else "stopped")
            except Exception as exc:  # the sink could not be closed, say: the run itself has ended
                self._warn(f"run {self.run_id}: closing its journal or sink failed: {exc!r}")
        self._write_stats()
        self._dead_alerts.flush()
        if self._log_dropped:
            dropped, self._log_dropped = self._log_dropped, 0
            self._warn(f"{dropped} log record(s) were dropped: they came faster than the log could be written")
        self._trouble.summary()
        return unfinished

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per stage: items in, out, dropped, failed, retried, restarts, workers, seconds per item, rates (since the
        start, and over about the last RECENT_SECONDS) and shares of time busy, held and starved."""
        if self._phase is not RunPhase.RUNNING:
            return self._last_stats
        per_node = [link.ask(Stats(), timeout=30) for link in self._live_links()]
        merged = self._merge_stats(per_node)
        if not merged:
            return self._last_stats
        self._recent.add(time.monotonic(), merged)
        return merged

    def verdict(self) -> str:
        """One line on what limits the run's throughput now (a stage, the input, the root, or the consumer) and
        what to do."""
        return verdict(self.stats(), self._phase is RunPhase.RUNNING and self.state.outputs_waiting(),
                       self._root_load())

    def _root_load(self) -> dict[str, float | None]:
        """Since the run's workers were up: the share of a CPU this process used, and the share of the time the
        feeder spent in the caller's iterable (None without a feeder: the step-by-step interface)."""
        if self._phase is not RunPhase.RUNNING:
            return self._last_root
        wall_start, cpu_start = self._run_clock
        wall = time.monotonic() - wall_start
        if wall <= 0:
            return {"cpu": None, "reading_input": None}
        feeder = self._feeder
        self._last_root = {"cpu": (time.process_time() - cpu_start) / wall,
                           "reading_input": None if feeder is None else min(1.0, feeder.input_seconds / wall)}
        return self._last_root

    def _merge_stats(self, per_node: list[list[StageStats]]) -> dict[str, dict[str, Any]]:
        per_node = [stages for stages in per_node if stages]
        if not per_node:
            return {}
        return {parts[0].stage: StageStats.combine(parts).public() for parts in zip(*per_node)}

    def failures(self) -> list[DeadLetter]:
        """Dead letters of the current (or last) run, read from its run directory's dead_letters.jsonl."""
        return self._dead.read()

    def refeed(self, letters: Iterable[DeadLetter] | None = None) -> int:
        """Feed dead letters again, each into the stage it failed in (after fixing the cause); returns how many.

        Without an argument every re-feedable dead letter of this run is re-fed; re-fed letters leave `failures()`.
        A letter of another pipeline, or one whose item could not be pickled (kept as its repr), is a ValueError.
        """
        self._check_running()
        assert self.pipeline is not None
        names = [stage.name for stage in self.pipeline.stages]
        chosen = ([letter for letter in self._dead.read() if letter.refeedable] if letters is None else list(letters))
        for letter in chosen:
            if not letter.refeedable:
                raise ValueError(f"dead letter of {letter.item!r:.100} cannot be re-fed: only its repr was kept")
            if letter.stage_index >= len(names) or names[letter.stage_index] != letter.stage:
                raise ValueError(f"dead letter from stage {letter.stage!r} does not belong to pipeline "
                                 f"{self.pipeline.name!r} (stages {names})")
        self._dead.forget(chosen)
        by_stage: dict[int, list[DeadLetter]] = {}
        for letter in chosen:
            by_stage.setdefault(letter.stage_index, []).append(letter)
        for stage, stage_letters in sorted(by_stage.items()):
            self._feed_chunks([letter.item for letter in stage_letters], stage, stage_letters)
        return len(chosen)

    def _on_dead_letters(self, letters: list[DeadLetter]) -> None:
        self._dead.add(letters)
        for letter in letters:
            error = f"{letter.error_type or letter.cause}: {letter.message}"
            self._dead_alerts.count(f"stage {letter.stage}", 1, f"{error:.300}")

    def _live_links(self) -> list[NodeLink]:
        return [link for link in self.links if link.alive]

    def _check_open(self) -> None:
        if self._phase is RunPhase.CLOSED:
            raise ClusterError("this cluster is closed")

    def _check_running(self) -> None:
        self._check_open()
        if self._phase is not RunPhase.RUNNING:
            ended = f"; the last run ended with {self._last_error!r}" if self._last_error is not None else ""
            raise ClusterError(f"no pipeline is running{ended}: call setup() and boot() (or run()) first")


class LocalCluster(Cluster):
    """The embedded default: one node in this process, its workers as child processes; no port is opened.

    `workers` is the default number of worker processes per stage: the CPUs this process may use (its affinity
    and cgroup quota) unless given.
    """

    def __init__(self, workers: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        ledger = TreeLedger("local", self._report)
        node = NodeActor.start(ledger, self.log_sink, workers, self.log_level, self.placement)
        self._add_link(LocalLink(node, ledger))

"""Every message that crosses a thread, process or network boundary, in one place.

Follow one item: `Feed` reaches the RootActor, which sends `Submit` to a node (straight into its ledger when the
node is in this process); the ledger `Push`es a `Chunk` to the first StageSupervisor, which hands a `RunBatch` to a
worker process; the worker answers with a `BatchResult`, which its WorkerActor passes on as `BatchDone`; the stage
pushes the outputs to the next stage, and the last stage's outputs reach the ledger, which reports `Completed` to the
root once an input's whole tree is done.

Actor messages are NamedTuples dispatched by type (see `actors.base.handles`). Between root and node only the kinds
in `ROOT_TO_NODE` and `NODE_TO_ROOT` are accepted; anything else is refused and logged.
"""
from __future__ import annotations

import base64
import json
import pickle
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import cloudpickle

if TYPE_CHECKING:
    import pykka

    from pipeline_cluster.run import RunState
    from pipeline_cluster.transport.links import NodeLink
    from pipeline_cluster.transport.wire import Packed


# -- records carried inside messages ----------------------------------------------------------------------------------

@dataclass
class DeadLetter:
    """One failed item: where it failed, how often, and why (exception, crash, timeout or node_lost)."""

    item: Any
    stage: str
    stage_index: int
    attempts: int
    cause: str
    error_type: str | None = None
    message: str = ""
    traceback: str = ""
    node: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    time: float = field(default_factory=time.time)
    rid: int | None = None
    refeedable: bool = True  # False when `item` is only a repr (the item itself could not be pickled)
    seq: int | None = None  # its place in the run's dead-letter file (or journal)
    input_id: Any = None  # in a durable run: the input it came from (its position, or its key= value)

    def to_json(self) -> str:
        """One JSON line for the run directory's dead-letter file. An item that is not JSON is shown as its repr,
        and kept pickled (`item_pickle`, base64) so it can be fed again."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: it deep-copies the item
        try:
            return json.dumps(data)
        except (TypeError, ValueError):
            data["item"] = repr(self.item)
        if self.refeedable:
            try:
                data["item_pickle"] = base64.b64encode(cloudpickle.dumps(self.item)).decode()
            except Exception:
                data["refeedable"] = False
        return json.dumps(data, default=repr)

    @classmethod
    def from_json(cls, line: str) -> DeadLetter:
        """A dead letter as written by `to_json`, its item unpickled when it was kept pickled."""
        data = json.loads(line)
        pickled = data.pop("item_pickle", None)
        if pickled is not None:
            try:
                data["item"] = cloudpickle.loads(base64.b64decode(pickled))
            except Exception:  # it cannot be loaded here (any more): its repr stays, and it cannot be fed again
                data["refeedable"] = False
        return cls(**data)


Path = tuple[int, ...]  # an item's place in its input's tree: the index among a generator's outputs, per generator


class Chunk(NamedTuple):
    """Items queued for a stage, as parallel lists: root item ids, the items, attempts so far (None: all 0), and
    their paths (kept only when outputs must come in order; None: all at the root of their tree)."""

    rids: list[int]
    items: list
    attempts: list[int] | None = None
    paths: list[Path] | None = None

    def split(self, n: int) -> tuple[Chunk, Chunk]:
        """The first `n` items, and the rest."""
        attempts, paths = self.attempts, self.paths
        return (Chunk(self.rids[:n], self.items[:n], attempts and attempts[:n], paths and paths[:n]),
                Chunk(self.rids[n:], self.items[n:], attempts and attempts[n:], paths and paths[n:]))

    def select(self, keep: list[int]) -> Chunk:
        """The items at the positions `keep`."""
        attempts, paths = self.attempts, self.paths
        return Chunk([self.rids[i] for i in keep], [self.items[i] for i in keep],
                     attempts and [attempts[i] for i in keep], paths and [paths[i] for i in keep])

    @staticmethod
    def join(parts: list[Chunk]) -> Chunk:
        """One chunk of all the parts' items, in order."""
        rids: list[int] = []
        items: list = []
        for part in parts:
            rids.extend(part.rids)
            items.extend(part.items)
        attempts = paths = None
        if any(part.attempts for part in parts):  # attempts stay None while every item is on its first try
            attempts = [n for part in parts for n in (part.attempts or [0] * len(part.rids))]
        if any(part.paths for part in parts):
            paths = [p for part in parts for p in (part.paths or [()] * len(part.rids))]
        return Chunk(rids, items, attempts, paths)


class Outputs(NamedTuple):
    """A last stage's outputs for the node's ledger: each output's root item, the outputs, and (ordered runs) each
    output's path in its root item's tree."""

    rids: list[int]
    items: list
    paths: list[Path] | None = None


class ItemError(NamedTuple):
    """One item of a batch raised: its position in the batch, the error, and whether `retry_on` covers it."""

    position: int
    error_type: str
    message: str
    traceback: str
    retryable: bool


class TreeChange(NamedTuple):
    """What a batch did to its root items' trees, when it was more than one output per input: the root item of each
    output, one root item per item born beyond an input's first output, one per input that ended with nothing, and
    the number of outputs of each input."""

    out_rids: list[int]
    born: list[int]
    died: list[int]
    counts: list[int]


class Timing(NamedTuple):
    """Seconds a batch took in the worker, items timed, and a sample of per-item seconds (for percentiles)."""

    seconds: float
    items: int
    samples: list[float]


class BatchResult(NamedTuple):
    """A worker's answer to a batch; `tree` is None when every item gave exactly one output."""

    outputs: list
    tree: TreeChange | None
    errors: list[ItemError]
    dropped: int
    timing: Timing


@dataclass
class Death:
    """Why and where a worker process ended: cause is "crash", "timeout" or "init_failed"."""

    cause: str
    index: int = -1  # item index in the running batch, -1 when it was idle
    exit_code: int | None = None
    signal: str | None = None
    pid: int | None = None
    message: str = ""
    traceback: str = ""


# -- to the RootActor -------------------------------------------------------------------------------------------------

class AddNode(NamedTuple):
    """A node joins the cluster."""

    link: NodeLink


class Begin(NamedTuple):
    """A run starts: its state object and the pipeline's stage names."""

    state: RunState
    stage_names: list[str]


class Feed(NamedTuple):
    """Root items from the caller, numbered from `first_rid` by the run that fed them; `stage` > 0 for dead letters
    fed again into the stage they failed in."""

    items: list
    first_rid: int
    stage: int = 0


class Unfinished(NamedTuple):
    """Ask: how many root items are fed but not finished."""


class NodeLoad(NamedTuple):
    """Ask: per node, the root items it holds unfinished and its credit."""


class NodeLost(NamedTuple):
    """A node's link broke or fell silent; its unfinished root items go elsewhere."""

    node: str
    reason: str


class DrainNode(NamedTuple):
    """The caller is taking this node out: send it nothing more, let it finish what it holds."""

    node: str


class RemoveNode(NamedTuple):
    """Take a drained node out of the cluster (anything it still holds goes elsewhere)."""

    node: str


# reports a node sends to the root (in-process, or over the network)

class Completed(NamedTuple):
    """Root items `done` on `node` are finished, with all their outputs and dead letters."""

    node: str
    done: list[int]
    outputs: list
    dead: list[DeadLetter]
    output_rids: list[int] | None = None  # each output's root item, when the run is keyed or ordered
    # set instead of `done`: outputs of root items still running, sent on as a generator streams them (each
    # output's root item)
    streamed: list[int] | None = None


class NodeReady(NamedTuple):
    """Every stage of `node` has its workers up."""

    node: str


class NodeFailed(NamedTuple):
    """The run cannot go on because of `error` on `node` (a stage out of restarts, an internal error)."""

    node: str
    error: BaseException


class SizeHint(NamedTuple):
    """Pickled bytes per input item as measured by `node`'s first stage (the root sizes credit by it)."""

    node: str
    bytes_per_item: float


# -- shared by the root, node and stage actors ------------------------------------------------------------------------

class Pause(NamedTuple):
    """Stop starting new work (True) or go on (False)."""

    paused: bool


class HoldStreams(NamedTuple):
    """Streamed outputs pile up for the caller: last stages hold their streaming generators back (True), or let
    them go on (False)."""

    held: bool


class Kill(NamedTuple):
    """Stop at once: kill every worker, forget unfinished items."""


class Shutdown(NamedTuple):
    """Stop gracefully: workers run their close() and exit within `grace` seconds."""

    grace: float


class Stats(NamedTuple):
    """Ask: the per-stage StageStats."""


# -- to a NodeActor (and root-to-node over the network) ---------------------------------------------------------------

class Hello(NamedTuple):
    """The first request on a node connection: the node's name and the heartbeat settings."""

    node: str
    heartbeat: float
    dead_after: float


class Setup(NamedTuple):
    """Build the stages of `pipeline` (over the network: the cloudpickled Pipeline, loaded where errors are
    answered). `keyed`: report each output's root item (for ordered or keyed output)."""

    pipeline: Any
    keyed: bool = False


class Boot(NamedTuple):
    """Start every stage's workers."""


class Submit(NamedTuple):
    """Root items for a remote node's ledger, entering at `stage`."""

    rids: list[int]
    items: list
    stage: int


class Resize(NamedTuple):
    """Run stage number `stage` on `workers` worker processes from now on (grown at once, shrunk as workers fall
    idle)."""

    stage: int
    workers: int


class Rebalance(NamedTuple):
    """Time for the node to look at its autoscaled stages' busy shares (of setup number `generation`)."""

    generation: int


class StageReady(NamedTuple):
    """Stage number `stage` has all its workers up."""

    stage: int


class StageFailure(NamedTuple):
    """A stage cannot go on (pc.StageFailed inside)."""

    error: BaseException


class NodeLog(NamedTuple):
    """A warning of the node's own, for the cluster log."""

    text: str


class DroppedFailure(NamedTuple):
    """An item failed for good in a stage whose failures are dropped: it is logged, not kept."""

    letter: DeadLetter


# -- to a StageSupervisor ---------------------------------------------------------------------------------------------

class Link(NamedTuple):
    """The stages before and after this one."""

    previous: pykka.ActorRef | None
    next: pykka.ActorRef | None


class DownstreamFull(NamedTuple):
    """Backpressure from the next stage: hold back (True) or go on (False)."""

    full: bool


class SpawnWorkers(NamedTuple):
    """Start the stage's worker processes."""


class Respawn(NamedTuple):
    """Start one worker in place of a dead one (after its backoff)."""


class Push(NamedTuple):
    """Items for this stage."""

    chunk: Chunk


class Flush(NamedTuple):
    """A batch stage's partial list has waited its `max_wait`: send it now."""


class WorkerReady(NamedTuple):
    """Worker `wid` has built the stage's task and waits for batches."""

    wid: int
    pid: int


class BatchDone(NamedTuple):
    """Worker `wid` answered its oldest batch in flight."""

    wid: int
    result: BatchResult


class PartDone(NamedTuple):
    """Worker `wid` streamed a part of a generator item's outputs (its oldest batch in flight is running)."""

    wid: int
    part: Part


class BatchUnreadable(NamedTuple):
    """Worker `wid` could not unpickle its oldest batch (or we its answer)."""

    wid: int
    error: str
    traceback: str


class WorkerDied(NamedTuple):
    """Worker `wid`'s process ended, and why."""

    wid: int
    death: Death


# -- to a WorkerActor -------------------------------------------------------------------------------------------------

class SendBatch(NamedTuple):
    """The supervisor's `number`th batch for a busy worker, sent once every batch before it is answered."""

    number: int
    packed: Packed


class Readable(NamedTuple):
    """The worker's socket has data (from the actor's own inbox)."""


class Tick(NamedTuple):
    """The running item's deadline may have passed (from the actor's own inbox)."""


class StopWorker(NamedTuple):
    """Ask the process to run close() and exit; kill it after `grace` seconds."""

    grace: float


# -- to the LogActor (besides log records) ---------------------------------------------------------------------------

class LogTo(NamedTuple):
    """Write the log to this file from now on (a new run's directory); `move` the lines written so far there too,
    and remove the old file's directory if that leaves it empty."""

    path: str
    move: bool = False


# -- root <-> node connection frames ----------------------------------------------------------------------------------

class Request(NamedTuple):
    """An ask over the network: the answer comes back as a Reply with the same id."""

    id: int
    body: Any


class Reply(NamedTuple):
    """The answer to Request `id`: the value, or (ok False) the exception to raise."""

    id: int
    ok: bool
    value: Any


class Ping(NamedTuple):
    """A heartbeat, both ways."""


ROOT_TO_NODE_REQUESTS = (Hello, Setup, Boot, Stats, Pause, Shutdown, Kill, Resize)
ROOT_TO_NODE = (Submit, Request, Ping, Boot, Pause, HoldStreams)  # Request bodies must be among ROOT_TO_NODE_REQUESTS
NODE_TO_ROOT = (Reply, Ping, Completed, NodeReady, NodeFailed, SizeHint)  # and logs.records.Record


# -- node <-> worker process frames -----------------------------------------------------------------------------------

class WorkerInit(NamedTuple):
    """What a new worker process needs to build its stage's task."""

    spec: bytes
    retry_on: bytes
    node: str
    stage: str
    log_level: int
    sys_path: list[str]
    timeout: float | None  # seconds per item: the worker cancels an async item past it


class Started(NamedTuple):
    """The worker built its task and waits for batches."""

    pid: int


class InitFailed(NamedTuple):
    """The worker could not build its task."""

    message: str
    traceback: str


class RunBatch(NamedTuple):
    """Items for the worker to run."""

    rids: list[int]
    items: list


class Part(NamedTuple):
    """Outputs of the item at `position` of the running batch, sent on while its generator still yields; `last`:
    the item has ended and these are its final outputs (the batch's result then counts none for it). The outputs
    travel pickled on their own (big buffers out-of-band beside them), so outputs the node cannot unpickle fail
    their item (`load` raises) while the part itself, and the order of the worker's messages, still arrive."""

    position: int
    pickled: bytes
    buffers: list
    last: bool

    def load(self) -> list:
        return pickle.loads(self.pickled, buffers=self.buffers)


class PartAck(NamedTuple):
    """The node passed a Part on: the worker may have one more in flight."""


class Unreadable(NamedTuple):
    """The worker could not unpickle a batch; it goes on with the next."""

    message: str
    traceback: str


class Stop(NamedTuple):
    """Run the stage's close() and exit."""


class Stopped(NamedTuple):
    """close() has run; the process exits now."""

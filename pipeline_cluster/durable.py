"""The driver's side of a durable run (`run(..., run_id=...)`): it skips inputs the journal has as complete, knows
which input each root item is, writes dead letters as they come, and commits completed inputs and the sink's
position together.

Commits are batched: one every COMMIT_SECONDS, or sooner when the inputs completed since the last one reach the
run's capacity, so a crash can hand over again only the inputs in flight and those completed since that commit.
"""
from __future__ import annotations

import bisect
import json
import sqlite3
import threading
import time
from collections import deque
from itertools import chain, islice
from typing import Any
from collections.abc import Callable, Iterable, Iterator, Sequence

from pipeline_cluster.journal import Journal, Spans
from pipeline_cluster.messages import DeadLetter
from pipeline_cluster.rundir import DeadLetterStore, WriteTrouble
from pipeline_cluster.sinks import Sink

COMMIT_SECONDS = 0.02
LATEST = 10  # dead letters kept in memory for the dashboard


class InputIds:
    """Root item id -> input id: a position in the input stream (kept as spans of consecutive root items), the
    JSON of a `key=` value, or for a dead letter fed again, the letter it came from."""

    def __init__(self, done: Spans) -> None:
        gaps = list(done.gaps())  # the positions still to run, in stream order: what the feeder numbers 0, 1, ...
        self.gap_offsets = [0]
        for start, end in gaps[:-1]:
            assert end is not None
            self.gap_offsets.append(self.gap_offsets[-1] + end - start)
        self.gaps = gaps
        self.fed = 0  # inputs the feeder sent so far
        self.rid_starts: list[int] = []  # pieces: root items rid_starts[i].. are positions pos_starts[i]..
        self.pos_starts: list[int] = []
        self.lengths: list[int] = []
        self.keys: dict[int, str] = {}  # key= runs: rid -> key
        self.refeeds: dict[int, DeadLetter] = {}  # rid -> the dead letter fed again as it

    def add_positions(self, first_rid: int, count: int) -> None:
        """The feeder sent its next `count` inputs as root items first_rid...."""
        offset, rid = self.fed, first_rid
        self.fed += count
        while count:
            index = bisect.bisect_right(self.gap_offsets, offset) - 1
            start, end = self.gaps[index]
            position = start + offset - self.gap_offsets[index]
            take = count if end is None else min(count, end - position)
            if self.lengths and self.rid_starts[-1] + self.lengths[-1] == rid and \
                    self.pos_starts[-1] + self.lengths[-1] == position:
                self.lengths[-1] += take
            else:
                self.rid_starts.append(rid)
                self.pos_starts.append(position)
                self.lengths.append(take)
            offset, rid, count = offset + take, rid + take, count - take

    def position(self, rid: int) -> int | None:
        """The input position of root item `rid`, or None when it is not a fed input."""
        index = bisect.bisect_right(self.rid_starts, rid) - 1
        if index < 0 or rid >= self.rid_starts[index] + self.lengths[index]:
            return None
        return self.pos_starts[index] + rid - self.rid_starts[index]

    def position_spans(self, first: int, count: int) -> Iterator[tuple[int, int]]:
        """The positions of the consecutive root items first.. (count of them) as spans; refeeds are not in them."""
        end = first + count
        while first < end:
            index = bisect.bisect_right(self.rid_starts, first) - 1
            if index < 0 or first >= self.rid_starts[index] + self.lengths[index]:
                first += 1  # a refeed's root item
                continue
            take = min(end, self.rid_starts[index] + self.lengths[index]) - first
            position = self.pos_starts[index] + first - self.rid_starts[index]
            yield position, position + take
            first += take

    def input_ids(self, rids: Sequence[int]) -> list:
        """The input ids of root items (keyed output's indices)."""
        return [self.input_id(rid) for rid in rids]

    def input_id(self, rid: int) -> Any:
        """The input id of a root item (a refeed's is that of the input its letter came from)."""
        letter = self.refeeds.get(rid)
        if letter is not None:
            return letter.input_id
        key = self.keys.get(rid)
        return json.loads(key) if key is not None else self.position(rid)


class DurableRun:
    """One run with a journal: the skipping input iterator, the completion bookkeeping and the run's dead letters
    (the cluster's dead letter store while it runs)."""

    def __init__(self, journal: Journal, key: Callable[[Any], Any] | None, sink: Sink | None,
                 capacity: Callable[[], int], trouble: WriteTrouble) -> None:
        self.journal = journal
        self.key = key
        self.sink = sink
        self.capacity = capacity
        self.trouble = trouble
        meta = journal.meta()
        self.finished_before = journal.before.get("state") == "finished"
        self.done = journal.spans()
        self.done_keys = journal.done_keys() if key is not None else set()
        self.complete = int(meta.get("complete", 0))
        self.outputs = int(meta.get("outputs", 0))
        self.total: int | None = meta.get("total")
        self.ids = InputIds(self.done)
        self.fifo: deque[str] = deque()  # key= runs: keys of inputs read but not yet sent
        self.lock = threading.Lock()  # the feeder, the root's dead letters and the consumer all come here
        self.commit_lock = threading.Lock()
        self.pending = 0  # inputs completed since the last commit
        self.new_keys: list[str] = []
        self.new_refed: list[int] = []
        self.new_letters: list[tuple[DeadLetter, Any, int | None]] = []  # letters whose write failed, to retry
        self.hidden: set[int] = set()  # letters fed again in this attempt: not failures any more
        self.letters = journal.count_letters()
        self.next_seq = journal.next_seq()
        self.latest: deque[DeadLetter] = deque(maxlen=LATEST)
        self.last_commit = time.monotonic()
        self.written = False  # the sink took outputs whose inputs are not recorded as complete yet
        self.streaming: set[int] = set()  # root items some of whose outputs the consumer took before they were done
        self.closed = False
        if sink is not None:
            sink.open(meta.get("sink"))

    # -- inputs --------------------------------------------------------------------------------------------------

    def inputs(self, items: Iterable[Any]) -> Iterator[Any]:
        """The inputs still to run: all but the complete ones (none at all when the run finished before)."""
        if self.finished_before:
            return iter(())
        if self.key is not None:
            return self._by_key(iter(items))
        return self._by_position(iter(items))

    def _by_position(self, items: Iterator[Any]) -> Iterator[Any]:
        """The items at the positions still to run; the stream is read through at C speed between gaps."""
        if not self.done.starts:
            return items

        def stretches() -> Iterator[Iterator[Any]]:
            position = 0
            for start, end in self.done.gaps():
                if start > position:
                    next(islice(items, start - position, start - position), None)  # read past the complete inputs
                if end is None:
                    yield items
                    return
                yield islice(items, end - start)
                position = end

        return chain.from_iterable(stretches())

    def _by_key(self, items: Iterator[Any]) -> Iterator[Any]:
        key_of, seen = self.key, 0
        assert key_of is not None
        for item in items:
            seen += 1
            key = json.dumps(key_of(item))
            if key not in self.done_keys:
                self.fifo.append(key)
                yield item
        self.total = seen

    def fed(self, first_rid: int, count: int) -> None:
        """The feeder sent its next `count` inputs as root items first_rid..."""
        with self.lock:
            if self.key is None:
                self.ids.add_positions(first_rid, count)
            else:
                fifo = self.fifo
                self.ids.keys.update((rid, fifo.popleft()) for rid in range(first_rid, first_rid + count))

    def refeeding(self, first_rid: int, letters: list[DeadLetter]) -> None:
        """These dead letters go in again as root items first_rid...; they are failures no more."""
        with self.lock:
            self.ids.refeeds.update(zip(range(first_rid, first_rid + len(letters)), letters))

    # -- completion ----------------------------------------------------------------------------------------------

    def completed(self, rids: Sequence[int], outputs: int, streamed: Sequence[int] = ()) -> None:
        """The consumer took every output of the root items `rids`: their inputs are complete; and (`streamed`,
        each output's root item) outputs of root items still running. While any of those runs, the sink's position
        is not committed (a resume runs them again), so nothing reaches the sink twice."""
        with self.lock:
            if streamed:
                self.streaming.update(streamed)
            self.outputs += outputs
            if self.key is None and not self.ids.refeeds and rids and max(rids) - min(rids) + 1 == len(rids):
                for start, end in self.ids.position_spans(min(rids), len(rids)):  # the usual case: one block
                    self.done.add(start, end)
                    self.complete += end - start
            else:
                self._completed_one_by_one(rids)
            self.pending += len(rids)
            if self.streaming and rids:
                self.streaming.difference_update(rids)
            self.written = bool(self.streaming)
        if self.pending >= max(1, self.capacity()) or time.monotonic() - self.last_commit >= COMMIT_SECONDS:
            self.commit()

    def _completed_one_by_one(self, rids: Iterable[int]) -> None:
        ids = self.ids
        for rid in rids:
            letter = ids.refeeds.pop(rid, None)
            if letter is not None:
                if letter.seq is not None:
                    self.new_refed.append(letter.seq)
                continue
            key = ids.keys.pop(rid, None)
            if key is not None:
                self.new_keys.append(key)
                self.done_keys.add(key)
                self.complete += 1
                continue
            position = ids.position(rid)
            if position is not None:
                self.done.add(position, position + 1)
                self.complete += 1

    def wrote(self) -> None:
        """The sink took outputs that are not complete yet (a commit now must not take its position)."""
        self.written = True

    def commit(self, state: str | None = None) -> None:
        """Write what completed since the last commit, the sink's position (and dead letters whose first write
        failed) in one transaction; `state` also records how the run ended. A journal that cannot be written (a
        full disk) is reported and tried again at the next commit; the run goes on."""
        with self.commit_lock:
            with self.lock:
                keys, self.new_keys = self.new_keys, []
                refed, self.new_refed = self.new_refed, []
                letters, self.new_letters = self.new_letters, []
                changes: dict[str, Any] = {"spans": list(self.done), "complete": self.complete,
                                           "outputs": self.outputs, "total": self.total, "updated": time.time()}
                pending, self.pending = self.pending, 0
                clean = not self.written
            if state is not None:
                changes["state"] = state
            if self.sink is not None and clean:
                changes["sink"] = self.sink.commit()
            elif self.sink is not None:  # outputs of unfinished inputs are in the sink: keep the last commit's point
                changes = {"state": state} if state is not None else {}
                keys, refed = [], []
            try:
                self.journal.commit(changes, keys, letters, refed)
            except sqlite3.Error as exc:
                self.trouble.failed(self.journal.path / "journal.sqlite", OSError(str(exc)), len(letters))
                with self.lock:
                    self.new_keys[:0], self.new_refed[:0], self.new_letters[:0] = keys, refed, letters
                    self.pending += pending
            self.last_commit = time.monotonic()

    def finish(self, state: str) -> None:
        """The run ended ("finished", "failed" or "stopped"): a last commit, then the sink and journal close."""
        if state == "finished" and self.key is None:  # every position is complete: the stream's length is known
            self.total = self.done.ends[-1] if self.done.ends else 0
        try:
            self.commit(state)
        finally:
            try:
                if self.sink is not None:
                    self.sink.close()
            finally:
                self.journal.close()
                self.closed = True

    # -- dead letters (the cluster's store while this run lasts) -------------------------------------------------

    def add(self, letters: list[DeadLetter]) -> None:
        """Dead letters of finished root items, from the root's thread: written at once, before their root items are
        delivered, so no commit can record an input complete without its letters (a resume drops the letters of
        inputs that did not complete). A failed write is retried with the next commit."""
        with self.lock:
            rows = []
            for letter in letters:
                letter.seq = self.next_seq
                self.next_seq += 1
                origin = self.ids.refeeds.get(letter.rid) if letter.rid is not None else None
                letter.input_id = self.ids.input_id(letter.rid) if letter.rid is not None else None
                rows.append((letter, letter.input_id, None if origin is None else origin.seq))
            self.letters += len(letters)
            self.latest.extend(letters)
        try:
            self.journal.commit({}, [], rows, [])
        except sqlite3.Error as exc:  # kept to retry, up to OVERFLOW of them; beyond that only counted
            self.trouble.failed(self.journal.path / "journal.sqlite", OSError(str(exc)), len(rows))
            with self.lock:
                room = max(0, DeadLetterStore.OVERFLOW - len(self.new_letters))
                self.new_letters += rows[:room]

    def __len__(self) -> int:
        return self.letters

    def read(self) -> list[DeadLetter]:
        """Every dead letter of the run (this attempt's and those before) not fed again, oldest first."""
        with self.lock:
            pending = [letter for letter, _, _ in self.new_letters if letter.seq not in self.hidden]
            hidden = set(self.hidden)
        if not self.closed:
            return self.journal.letters(hidden) + pending
        journal = Journal(self.journal.path)  # after the run: read without its lock
        try:
            return journal.letters(hidden) + pending
        finally:
            journal.close()

    def recent(self) -> list[DeadLetter]:
        """The last few dead letters of this attempt not fed again, newest first."""
        with self.lock:
            return [letter for letter in reversed(self.latest) if letter.seq not in self.hidden]

    def forget(self, letters: Iterable[DeadLetter]) -> None:
        """These letters are being fed again: no longer failures (recorded as such once their refeed completes)."""
        with self.lock:
            seqs = {letter.seq for letter in letters if letter.seq is not None} - self.hidden
            self.hidden |= seqs
            self.letters -= len(seqs)

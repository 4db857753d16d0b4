"""The user's description of work: `Stage`, `Pipeline`, `Supervision`, validated before anything starts."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

import cloudpickle

from pipeline_cluster.config import worker_count

FAILURE_ACTIONS = ("dead_letter", "drop")
EXHAUSTED_ACTIONS = ("fail", "degrade")


@dataclasses.dataclass(frozen=True)
class Supervision:
    """How a stage's supervisor treats failing items and crashing workers (see the README's Supervision section)."""

    max_attempts: int = 3
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    timeout: float | None = None
    max_restarts: int = 10
    restart_window: float = 60.0
    backoff: tuple[float, float] = (0.1, 10.0)
    on_exhausted: str = "fail"
    on_failure: str = "dead_letter"

    def __post_init__(self) -> None:
        _check_int("max_attempts", self.max_attempts, minimum=1)
        _check_int("max_restarts", self.max_restarts, minimum=0)
        retry_on = self.retry_on
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        if not isinstance(retry_on, (tuple, list)) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
        ):
            raise TypeError(f"supervision.retry_on must be exception types, got {self.retry_on!r}")
        object.__setattr__(self, "retry_on", tuple(retry_on))
        if self.timeout is not None:
            _check_positive("timeout", self.timeout)
        _check_positive("restart_window", self.restart_window)
        if (
            not isinstance(self.backoff, (tuple, list))
            or len(self.backoff) != 2
            or not all(isinstance(b, (int, float)) and b >= 0 for b in self.backoff)
            or self.backoff[0] > self.backoff[1]
        ):
            raise ValueError(f"supervision.backoff must be (min, max) seconds with min <= max, got {self.backoff!r}")
        object.__setattr__(self, "backoff", (float(self.backoff[0]), float(self.backoff[1])))
        if self.on_exhausted not in EXHAUSTED_ACTIONS:
            raise ValueError(f"supervision.on_exhausted must be one of {EXHAUSTED_ACTIONS}, got {self.on_exhausted!r}")
        if self.on_failure not in FAILURE_ACTIONS:
            raise ValueError(f"supervision.on_failure must be one of {FAILURE_ACTIONS}, got {self.on_failure!r}")

    @classmethod
    def check(cls, values: Mapping[str, Any]) -> list[tuple[str | None, Exception]]:
        """Every problem of a TOML supervision table, not just the first: (None, unknown keys) and (key, bad value)."""
        from pipeline_cluster.config import close_match, did_you_mean

        known = [f.name for f in dataclasses.fields(cls)]
        found: list[tuple[str | None, Exception]] = []
        unknown = sorted((k for k in values if k not in known), key=str)
        if unknown:
            if len(unknown) == 1:
                hint = did_you_mean(unknown[0], known)
            else:
                close = {k: close_match(k, known) for k in unknown}
                hint = ", ".join(f"{m!r} for {k!r}" for k, m in close.items() if m)
                hint = f" (did you mean {hint}?)" if hint else ""
                if not all(close.values()):
                    hint += f"; known: {', '.join(map(repr, sorted(known)))}"
            found.append((None, ValueError(f"unknown supervision key(s) {unknown}{hint}")))
        for key in known:
            if key in values:
                try:  # each value alone, against the defaults, so one bad value does not hide the next
                    cls(**_converted({key: values[key]}))
                except (TypeError, ValueError) as exc:
                    found.append((key, exc))
        return found

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Supervision:
        """Build from a TOML table; a bad table raises naming every bad key (a lone problem keeps its type)."""
        problems = [exc for _, exc in cls.check(values)]
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise ValueError("; ".join(map(str, problems)))
        return cls(**_converted(values))


def _converted(values: Mapping[str, Any]) -> dict[str, Any]:
    """TOML spellings to field values: exception names to classes, a backoff list to a tuple."""
    values = dict(values)
    if "retry_on" in values:
        values["retry_on"] = tuple(_exception_type(name) for name in _as_list(values["retry_on"]))
    if "backoff" in values and isinstance(values["backoff"], (list, tuple)):
        values["backoff"] = tuple(values["backoff"])
    return values


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _exception_type(name: Any) -> type[BaseException]:
    """Resolve "ValueError" or "package.module.Error" from a config file to an exception class."""
    if isinstance(name, type):
        return name
    import builtins
    import importlib

    if not isinstance(name, str):
        found = None
    elif "." not in name:
        found = getattr(builtins, name, None)
    else:
        module, _, attr = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError as exc:
            raise ValueError(f"supervision.retry_on: {name!r}: cannot import {module!r}: {exc}") from None
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ValueError(f"supervision.retry_on: {name!r} is not an exception type")
    return found


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"supervision.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"supervision.{name} must be >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"supervision.{name} must be a positive number of seconds, got {value!r}")


class Stage:
    """One step of a pipeline: a function, or a callable class built once per worker with `args`/`kwargs`.

    A stage takes one item and returns one item; a `generator` stage returns (or yields) any number;
    returning None drops the item.
    """

    def __init__(
        self,
        task: Callable[..., Any],
        *,
        name: str | None = None,
        generator: bool = False,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        workers: int | str | tuple[int, int] | None = None,
        supervision: Supervision | Mapping[str, Any] | None = None,
        concurrency: int = 1,
        batch_size: int | None = None,
        max_wait: float = 0.05,
    ) -> None:
        """`workers`: processes per node (default: the node's CPUs); "auto" or (min, max) lets the node move its
        CPUs between such stages by their busy share. `concurrency`: items each worker runs at once (a plain task
        on a thread pool, an `async def` task on an event loop in the worker), for stages that wait on I/O.
        `batch_size`: the task takes a list of up to that many items and returns a list of as many results
        (vectorised code, model inference); a partial list goes after `max_wait` seconds."""
        self.task = task
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.max_wait = max_wait
        # a class is built once per worker and then called per item; builtin types (str, int, ...) are plain
        # functions of the item
        self.is_class = inspect.isclass(task) and getattr(task, "__module__", None) != "builtins"
        self.name = name if name is not None else _default_name(task)
        self.generator = generator
        self.args = tuple(args) if isinstance(args, (list, tuple)) else args
        self.kwargs = dict(kwargs or {}) if isinstance(kwargs, Mapping) or kwargs is None else kwargs
        self.workers = workers
        if isinstance(supervision, Mapping):
            try:
                supervision = Supervision.from_dict(supervision)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"stage {self.name!r}: {exc}") from None
        self.supervision = supervision if supervision is not None else Supervision()

    def __repr__(self) -> str:
        return (f"Stage({self.name!r}, generator={self.generator}, workers={self.workers}"
                + (f", concurrency={self.concurrency})" if self.concurrency != 1 else ")"))

    @property
    def autoscaled(self) -> tuple[int, int | None] | None:
        """(min, max) workers when the node sizes this stage by its busy share (`workers="auto"`: 1 and the node's
        CPUs), else None."""
        if self.workers == "auto":
            return (1, None)
        if isinstance(self.workers, tuple):
            return self.workers
        return None

    @property
    def is_async(self) -> bool:
        """The task (or a class stage's __call__) is an `async def`: its items run on an event loop."""
        return inspect.iscoroutinefunction(_class_call(self.task) if self.is_class else self.task)

    def validate(self) -> None:
        """Raise TypeError/ValueError naming this stage if it cannot run."""
        where = f"stage {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"stage name must be a non-empty string, got {self.name!r}")
        if not callable(self.task):
            raise TypeError(f"{where}: task {self.task!r} is not callable")
        if not isinstance(self.generator, bool):
            raise TypeError(f"{where}: generator must be True or False, got {self.generator!r}")
        if not isinstance(self.args, tuple):
            raise TypeError(f"{where}: args must be a list or tuple, got {self.args!r}")
        if not isinstance(self.kwargs, dict):
            raise TypeError(f"{where}: kwargs must be a dict, got {self.kwargs!r}")
        if self.workers is not None and worker_count(self.workers) is not None:
            raise ValueError(f"{where}: workers {worker_count(self.workers)}")
        if isinstance(self.workers, list):
            self.workers = (self.workers[0], self.workers[1])
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"{where}: concurrency must be a positive int, got {self.concurrency!r}")
        if self.batch_size is not None:
            if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
                raise ValueError(f"{where}: batch_size must be a positive int (or None), got {self.batch_size!r}")
            if self.concurrency != 1 or self.is_async:
                raise ValueError(f"{where}: a batch stage (batch_size) runs one list at a time: it cannot also have "
                                 "concurrency or be an async def")
        if isinstance(self.max_wait, bool) or not isinstance(self.max_wait, (int, float)) or self.max_wait < 0:
            raise ValueError(f"{where}: max_wait must be a number of seconds >= 0, got {self.max_wait!r}")
        if not isinstance(self.supervision, Supervision):
            raise TypeError(f"{where}: supervision must be a pc.Supervision or a dict, got {self.supervision!r}")
        self._check_signature(where)
        try:
            cloudpickle.dumps(self.task)
        except Exception as exc:
            raise TypeError(f"{where}: task cannot be pickled to send to workers: {exc}") from exc

    def _check_signature(self, where: str) -> None:
        extra: tuple[object, ...]
        fixed: tuple[Any, ...]
        if self.is_class:
            try:
                inspect.signature(self.task).bind(*self.args, **self.kwargs)
            except TypeError as exc:
                raise TypeError(f"{where}: {self.task.__name__}{_sig(self.task)} cannot take args={self.args!r}"
                                f" kwargs={self.kwargs!r}: {exc}") from None
            except ValueError:
                pass
            call = _class_call(self.task)
            if call is None or not callable(call):
                raise TypeError(f"{where}: class {self.task.__name__} has no __call__(self, item) method")
            target, extra, fixed, named = call, (object(),), (), {}  # unbound __call__: self + item
        else:
            target, extra, fixed, named = self.task, (), tuple(self.args), self.kwargs
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            return  # builtins without a signature: checked when called
        try:
            sig.bind(*extra, object(), *fixed, **named)
        except TypeError:
            raise TypeError(f"{where}: {getattr(target, '__qualname__', target)}{sig} cannot take exactly one item"
                            + (f" plus args {fixed!r}" if fixed else "")) from None

    def payload(self) -> bytes:
        """The cloudpickled spec a worker process needs to run this stage."""
        return cloudpickle.dumps(
            {"task": self.task, "is_class": self.is_class, "args": self.args, "kwargs": self.kwargs,
             "generator": self.generator, "name": self.name, "concurrency": self.concurrency,
             "batch_size": self.batch_size,
             "is_async": self.is_async}
        )


def _class_call(cls: Any) -> Any:
    """The `__call__` a class's instances run (the first one along its method resolution order), or None."""
    mro: tuple[type, ...] = getattr(cls, "__mro__", ())
    return next((k.__dict__["__call__"] for k in mro if "__call__" in k.__dict__), None)


def _default_name(task: Any) -> str:
    name = getattr(task, "__name__", None) or type(task).__name__
    return name


def _sig(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


class Pipeline:
    """An ordered list of stages (the seed's taskchain), with a name and a version."""

    def __init__(self, stages: Iterable[Any], name: str = "pipeline", version: Any = "1") -> None:
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
            raise TypeError(f"a pipeline is a list of stages, got {stages!r}")
        # each pipeline owns copies of its stages: renaming or config overrides never reach the caller's objects
        self.stages = [copy.copy(_as_stage(s, i)) for i, s in enumerate(stages)]
        self.name = name
        self.version = version
        if not self.stages:
            raise ValueError(f"pipeline {name!r} has no stages")
        seen: dict[str, int] = {}
        for stage in self.stages:  # stats and config address stages by name: make names unique
            count = seen.get(stage.name, 0)
            seen[stage.name] = count + 1
            if count:
                stage.name = f"{stage.name}_{count + 1}"
        for stage in self.stages:
            stage.validate()

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, version={self.version!r}, stages={[s.name for s in self.stages]})"

    def configure(self, config: str | os.PathLike | Mapping[str, Any]) -> Pipeline:
        """Apply the `[stages.NAME]` tables of a TOML file (or an already parsed dict) to this pipeline."""
        from pipeline_cluster.config import load_toml, stage_overrides

        return self.with_overrides(stage_overrides(load_toml(config)))

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> Pipeline:
        """Apply `[stages.NAME]` tables (workers, supervision), all checked first (one error names every bad key).

        A table for a stage this pipeline lacks is skipped with a warning: one config file serves several pipelines.
        """
        from pipeline_cluster.config import close_match, log, stage_overrides

        source = getattr(overrides, "source", None)
        tables = stage_overrides({"stages": overrides}, source or "<overrides>")
        by_name = {s.name: s for s in self.stages}
        for name, table in tables.items():
            if name not in by_name:
                close = close_match(name, by_name)
                log.warning("%s[stages.%s] skipped: pipeline %r has no stage %r; its stages: %s%s",
                            f"{source}: " if source else "", name, self.name, name, list(by_name),
                            f" (did you mean {close!r}?)" if close else "")
                continue
            stage = by_name[name]
            if "workers" in table:
                stage.workers = table["workers"]
            if "supervision" in table:
                current = dataclasses.asdict(stage.supervision)
                current.update(table["supervision"])
                try:
                    stage.supervision = Supervision.from_dict(current)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"[stages.{name}.supervision]: {exc}") from None
            stage.validate()
        return self


def _as_stage(spec: Any, index: int) -> Stage:
    """Accept a Stage, a bare callable, or the seed's taskchain dict {"function", "is_generator", "args"}."""
    if isinstance(spec, Stage):
        return spec
    if isinstance(spec, Mapping):
        allowed = {"function", "is_generator", "args", "kwargs", "name", "workers", "supervision", "concurrency",
                   "batch_size", "max_wait"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"taskchain entry {index}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if "function" not in spec:
            raise ValueError(f"taskchain entry {index}: missing 'function'")
        return Stage(spec["function"], name=spec.get("name"), generator=spec.get("is_generator", False),
                     args=spec.get("args", ()) or (), kwargs=spec.get("kwargs"), workers=spec.get("workers"),
                     supervision=spec.get("supervision"), concurrency=spec.get("concurrency", 1),
                     batch_size=spec.get("batch_size"), max_wait=spec.get("max_wait", 0.05))
    if callable(spec):
        return Stage(spec)
    raise TypeError(f"pipeline entry {index} is not a stage, a callable or a taskchain dict: {spec!r}")


def as_pipeline(pipeline: Any, name: str | None = None, version: Any = None) -> Pipeline:
    """Turn a Pipeline, a list of stages or a seed taskchain into a validated Pipeline."""
    if isinstance(pipeline, Pipeline):
        return Pipeline(pipeline.stages, name=pipeline.name if name is None else name,
                        version=pipeline.version if version is None else version)
    return Pipeline(pipeline, name=name or "pipeline", version=version if version is not None else "1")

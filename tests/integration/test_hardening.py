"""Faults found by an audit, each produced for real: an input iterable that raises, an output handler that raises."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

import pipeline_cluster as pc
from tests.helpers import wait_until


def _fail_on_7(x: int) -> int:
    if x % 100 == 7:
        raise ValueError(f"bad {x}")
    return x


def _lines_then_error(count: int) -> Iterator[int]:
    yield from range(count)
    raise OSError("the input file went away")


@pytest.mark.timeout(60)
def test_an_input_iterable_that_raises_loses_nothing_it_gave(tmp_path):
    outputs: list[int] = []
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        with pytest.raises(pc.InputFailed) as raised:
            for output in cluster.run([pc.Stage(_fail_on_7, supervision={"max_attempts": 1})],
                                      _lines_then_error(500)):
                outputs.append(output)
        failures = cluster.failures()
    error = raised.value
    assert error.read == 500 and isinstance(error.__cause__, OSError), error
    assert "after 500 item(s)" in str(error) and "the input file went away" in str(error)
    # every item read ended delivered or dead-lettered, and the error came only after all of them
    assert sorted(outputs + [letter.item for letter in failures]) == list(range(500))
    assert sorted(letter.item for letter in failures) == [x for x in range(500) if x % 100 == 7]


@pytest.mark.timeout(60)
def test_an_output_handler_that_raises_ends_the_run_and_the_cluster_goes_on(tmp_path):
    def handler(output: int) -> None:
        if output == 50:
            raise RuntimeError("handler broke")

    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        cluster.setup("handler", "1", [lambda x: x])
        cluster.boot(handler)
        with pytest.raises(RuntimeError, match="handler broke"):
            cluster.feed(*range(100))
            cluster.wait_empty(timeout=30)
        assert wait_until(lambda: cluster.status()["phase"] == "idle", 30), cluster.status()
        with pytest.raises(pc.ClusterError, match="last run ended with RuntimeError"):
            cluster.feed(1)  # not the same error again and again: the run is over, and says how it ended
        assert sorted(cluster.run([lambda x: x * 10], range(5))) == [0, 10, 20, 30, 40]  # usable again
        cluster.setup("again", "2", [lambda x: x + 1])
        got: list[int] = []
        cluster.boot(got.append)
        cluster.feed(1, 2)
        cluster.wait_empty(timeout=30)
        assert sorted(got) == [2, 3]

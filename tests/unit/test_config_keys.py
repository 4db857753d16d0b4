"""Config key checks on real TOML files: every bad key at once, with suggestions; tables for absent stages skipped."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

import pipeline_cluster as pc
from pipeline_cluster.config import load_toml, stage_overrides
from pipeline_cluster.deploy.config import load_config
from pipeline_cluster.deploy.errors import ConfigError


def split(line):
    return line


def Tagger(word):  # named like the README example's stage
    return word


def write(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problem_lines(exc: BaseException) -> list[str]:
    return [line.strip() for line in str(exc).splitlines()[1:]]


@pytest.mark.timeout(30)
def test_unknown_top_level_keys_all_reported_with_suggestions(tmp_path):
    path = write(tmp_path, "foo = 1\n\n[stage.Tagger]\nworkers = 4\n\n[stages.Tagger]\nwrokers = 2\n")
    with pytest.raises(ValueError) as caught:
        pc.Pipeline([Tagger]).configure(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: 3 problem(s):")
    assert problem_lines(caught.value) == [
        "foo: unknown key; known: [stages]",
        "stage: unknown table [stage.Tagger] (did you mean [stages]?)",
        "[stages.Tagger].wrokers: unknown key (did you mean 'workers'?)",
    ]
    # a cluster checks the file the same way when it is made (Cluster(config=...) calls these two)
    with pytest.raises(ValueError, match=r"3 problem\(s\)") as again:
        stage_overrides(load_toml(path))
    assert str(again.value) == text


@pytest.mark.timeout(30)
def test_bad_supervision_keys_and_values_reported_together(tmp_path):
    path = write(tmp_path, """
[stages.Tagger]
workers = 0

[stages.Tagger.supervision]
max_attempt = 5
tmeout = 2.5
on_failure = "explode"
backoff = [3, 1]
""")
    with pytest.raises(ValueError) as caught:
        pc.Pipeline([Tagger]).configure(str(path))
    assert problem_lines(caught.value) == [
        "[stages.Tagger].workers: must be a positive integer, \"auto\" or [min, max], got 0",
        "[stages.Tagger].supervision: unknown supervision key(s) ['max_attempt', 'tmeout']"
        " (did you mean 'max_attempts' for 'max_attempt', 'timeout' for 'tmeout'?)",
        "[stages.Tagger.supervision]: supervision.backoff must be (min, max) seconds with min <= max, got (3, 1)",
        "[stages.Tagger.supervision]: supervision.on_failure must be one of ('dead_letter', 'drop'), got 'explode'",
    ]


@pytest.mark.timeout(30)
def test_supervision_from_dict_names_every_problem():
    with pytest.raises(ValueError) as caught:
        pc.Supervision.from_dict({"max_attempts": 0, "timeout": -1, "retry_on": ["no_such_module.Error"]})
    text = str(caught.value)
    assert "supervision.max_attempts must be >= 1" in text and "supervision.timeout must be a positive" in text
    assert "cannot import 'no_such_module'" in text
    with pytest.raises(TypeError, match="supervision.max_attempts must be an int"):  # a lone problem keeps its type
        pc.Supervision.from_dict({"max_attempts": "3"})
    assert pc.Supervision.from_dict({"retry_on": "OSError", "backoff": [1, 2]}) == pc.Supervision(
        retry_on=(OSError,), backoff=(1.0, 2.0))


@pytest.mark.timeout(30)
def test_stage_table_applies_where_the_stage_exists_and_is_skipped_elsewhere(tmp_path, caplog):
    path = write(tmp_path, "[stages.split]\nworkers = 2\n[stages.split.supervision]\nmax_attempts = 7\n")
    with caplog.at_level(logging.INFO, logger="pipeline_cluster.config"):
        with_split = pc.Pipeline([split, Tagger], name="lines").configure(path)
    assert with_split.stages[0].workers == 2 and with_split.stages[0].supervision.max_attempts == 7
    assert with_split.stages[1].workers is None and caplog.records == []

    with caplog.at_level(logging.INFO, logger="pipeline_cluster.config"):
        without = pc.Pipeline([Tagger], name="words").configure(path)
    assert without.stages[0].workers is None and without.stages[0].supervision == pc.Supervision()
    notes = [r for r in caplog.records if r.name == "pipeline_cluster.config"]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING
    message = notes[0].getMessage()
    assert str(path) in message and "[stages.split] skipped" in message
    assert "pipeline 'words' has no stage 'split'" in message and "['Tagger']" in message


@pytest.mark.timeout(30)
def test_absent_stage_note_suggests_a_close_stage_name(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline_cluster.config"):
        pipeline = pc.Pipeline([Tagger]).with_overrides({"Tager": {"workers": 3}})
    assert pipeline.stages[0].workers is None
    (note,) = caplog.records
    assert "no stage 'Tager'" in note.getMessage() and "(did you mean 'Tagger'?)" in note.getMessage()


@pytest.mark.timeout(30)
def test_bad_keys_are_errors_whether_or_not_the_stage_exists(tmp_path):
    path = write(tmp_path, "[stages.split]\nworkerz = 2\n")
    for stages in ([split], [Tagger]):
        with pytest.raises(ValueError, match=r"\[stages.split\].workerz: unknown key \(did you mean 'workers'\?\)"):
            pc.Pipeline(stages).configure(path)
    with pytest.raises(ValueError, match=r"^<overrides>: 1 problem\(s\):\n  \[stages.split\].workerz"):
        pc.Pipeline([split]).with_overrides({"split": {"workerz": 2}})


@pytest.mark.timeout(30)
def test_deploy_check_names_every_bad_key_with_suggestions(tmp_path):
    path = write(tmp_path, """
foo = 1

[clustr]
name = "lab"

[[nodes]]
host = "a"

[[node]]
host = "b"

[stage.split]
workers = 2

[stages.split.supervision]
max_attempt = 3
tmeout = 1
""", name="cluster.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.problems == [
        "foo: unknown key; known: [cluster], [[node]], [ssh], [stages]",
        "clustr: unknown table [clustr] (did you mean [cluster]?)",
        "nodes: unknown table [[nodes]] (did you mean [[node]]?)",
        "stage: unknown table [stage.split] (did you mean [stages]?)",
        "[stages.split].supervision: unknown supervision key(s) ['max_attempt', 'tmeout']"
        " (did you mean 'max_attempts' for 'max_attempt', 'timeout' for 'tmeout'?)",
    ]
    assert str(caught.value).startswith(f"{path}: 5 problem(s):")


def _double(x):
    return x * 2


def test_workers_may_be_auto_or_bounds_in_a_config_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[stages._double]\nworkers = "auto"\n')
    assert pc.Pipeline([_double]).configure(path).stages[0].autoscaled == (1, None)
    path.write_text("[stages._double]\nworkers = [2, 6]\n")
    assert pc.Pipeline([_double]).configure(path).stages[0].autoscaled == (2, 6)
    path.write_text('[stages._double]\nworkers = "lots"\n')
    with pytest.raises(ValueError, match=r'workers: must be a positive integer, "auto" or \[min, max\]'):
        pc.Pipeline([_double]).configure(path)
    with pytest.raises(ValueError, match="workers must be"):
        pc.Pipeline([pc.Stage(_double, workers=(3, 2))])

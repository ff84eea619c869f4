"""Every class of bad input the defect catalogue found (issue 24), each refused in one line that
names the file, line or field, with exit code 2, before expensive work, writing nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import toy_task_args
from test_corpus import ROW, task_dir, write_jsonl
from test_sweep import write_config
from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.mia import load_mia
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.evaluation.evaluator import GENERATIONS, MIA, MMLU, SCORES, EvalSets, rescore
from unlearn_sweep.methods.memory_plan import ModelShape
from unlearn_sweep.methods.registry import ParamError, build_params, get_method
from unlearn_sweep.orchestrator.cli import main
from unlearn_sweep.orchestrator.config import ConfigError, load_config
from unlearn_sweep.orchestrator.sweep import run_sweep

NOT_UTF8 = b'{"id": "a", "document": "caf\xe9"}\n'


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    """The CLI's stderr, which must be exactly one line."""
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("unlearn-sweep: error: "), error
    return error


def records_dir(
    folder: Path, generation: dict | None = None, mia: dict | None = None, mmlu: dict | None = None
) -> Path:
    """The records `evaluate` writes, one of each, with the changes given."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {"id": "x-1sc1", "task": "Task1", "split": "forget", "expected_output": "a b", "model_output": "a"}
    write_jsonl(folder / GENERATIONS, [{**base, **(generation or {})}])
    write_jsonl(
        folder / MIA, [{"membership": "member", "nll": 1.0}, {"membership": "nonmember", "nll": 2.0, **(mia or {})}]
    )
    write_jsonl(folder / MMLU, [{"answer": 1, "predicted": 1, **(mmlu or {})}])
    return folder


def test_files_that_are_not_utf8_are_named_with_the_line(toy_task_dir: Path, tmp_path: Path) -> None:
    data = task_dir(tmp_path / "data", [ROW])
    (data / "retain.jsonl").write_bytes(json.dumps(ROW).encode() + b"\n" + NOT_UTF8.replace(b"document", b"input"))
    with pytest.raises(DataError, match=r"retain.jsonl: not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_task(data)
    mia = tmp_path / "mia"
    write_jsonl(mia / "nonmember.jsonl", [{"id": "b", "document": "other"}])
    (mia / "member.jsonl").write_bytes(NOT_UTF8)
    with pytest.raises(DataError, match=r"member.jsonl: not UTF-8 text \(byte 0xe9 on line 1\)"):
        load_mia(mia)
    results = records_dir(tmp_path / "results")
    (results / MIA).write_bytes(b'{"membership": "member", "nll": 1.0}\n' + NOT_UTF8)
    with pytest.raises(DataError, match=r"mia.jsonl: not UTF-8 text \(byte 0xe9 on line 2\)"):
        rescore(results)
    config = write_config(tmp_path, toy_task_dir)
    config.write_bytes(config.read_bytes() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"sweep.yaml: not UTF-8 text \(byte 0xe9 on line \d+\)"):
        load_config(config)


def broken_model(folder: Path, toy_task_dir: Path, config: str | None, tokenizer: bool = True) -> Path:
    shutil.copytree(toy_task_dir / "model", folder)
    if config is not None:
        (folder / "config.json").write_text(config)
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize(
    "config, tokenizer, message",
    [
        ('{"model_type": "olmo2",', True, r"config.json: not JSON \(Expecting property name .* at line 1"),
        (
            '{"model_type": "gpt7"}',
            True,
            r"config.json: field 'model_type': model_type 'gpt7' is not a model type Transformers 5\.\d+\.\d+ knows",
        ),
        (None, False, r"model: no tokenizer \(tokenizer.json or tokenizer_config.json\)"),
    ],
)
def test_broken_model_folders_are_one_line_before_anything_loads(
    config, tokenizer, message, toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = broken_model(tmp_path / "model", toy_task_dir, config, tokenizer)
    for command in ("unlearn --method grad_ascent", "evaluate"):
        assert main(toy_task_args(toy_task_dir, command, out=tmp_path / "out", model=model)) == 2
        assert not (tmp_path / "out").exists()
        assert re.search(message, one_error_line(capsys))


def test_a_model_folder_that_does_not_exist_is_no_hub_id(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Transformers read it as a repository id on the hub and failed with a traceback."""
    args = ["unlearn", "--method", "grad_ascent", "--model", str(tmp_path / "nowhere")]
    assert main([*args, "--data", str(toy_task_dir / "data"), "--out", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys).endswith("nowhere: checkpoint folder not found\n")


def test_a_negative_layer_count_is_refused_by_the_plan(toy_task_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((toy_task_dir / "model" / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": -2}))
    with pytest.raises(DataError, match=r"config.json: field 'num_hidden_layers': -2: expected a positive integer"):
        ModelShape.from_config(model)


@pytest.mark.parametrize("command", ["evaluate", "unlearn --method grad_ascent"])
def test_an_output_path_that_cannot_be_a_folder_is_refused_before_the_work(
    command: str, toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    from unlearn_sweep.corpus import semeval

    def never(*args, **kwargs):
        raise AssertionError("the data was read: the output path is checked first")

    monkeypatch.setattr(semeval, "load_rows", never)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = toy_task_args(toy_task_dir, command)
    for out, problem in (
        (a_file, "is a file, not a folder"),
        (a_file / "sub", f"cannot be created: {a_file} is a file"),
    ):
        assert main([*args, "--out", str(out)]) == 2
        assert one_error_line(capsys).endswith(f"{out}: {problem}\n")
    assert a_file.read_text() == "x"


@pytest.mark.parametrize(
    "store, message",
    [
        ("not_a_db", "not an SQLite database"),
        ("a_folder", "is a folder, not an SQLite file"),
    ],
)
def test_a_tracking_store_that_is_not_one_is_refused_when_read(
    store: str, message: str, toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "mlflow.db"
    if store == "a_folder":
        path.mkdir()
    else:
        path.write_text("these are notes, not a database\n")
    uri = f"sqlite:///{path}"
    with pytest.raises(ConfigError, match=f"field 'mlflow.tracking_uri': {path}: {message}"):
        load_config(write_config(tmp_path, toy_task_dir, mlflow={"tracking_uri": uri}))
    for command in (["ui"], ["best", "s1"]):
        assert main([*command, "--tracking-uri", uri]) == 2  # `ui` waited on SQLAlchemy's retries before
        assert message in one_error_line(capsys)


def test_a_database_store_without_its_driver_says_what_to_install(capsys: pytest.CaptureFixture) -> None:
    assert main(["ui", "--tracking-uri", "postgresql://mlflow@127.0.0.1/mlflow"]) == 2
    assert "a postgresql store needs a driver MLflow can use: pip install psycopg2" in one_error_line(capsys)


def test_a_sweep_reads_its_data_before_ray_or_mlflow(toy_task_dir: Path, tmp_path: Path) -> None:
    """An MIA folder without nonmembers: trials started and failed, leaving mlflow.db, mlruns/ and
    the sweep's folder behind; now refused with the config, before any of them exists."""
    mia = tmp_path / "mia"
    mia.mkdir()
    shutil.copy(toy_task_dir / "mia" / "member.jsonl", mia)
    with pytest.raises(ConfigError, match=r"sweep.yaml: field 'mia': .*nonmember.jsonl: file not found"):
        load_config(write_config(tmp_path / "sweep", toy_task_dir, mia=str(mia)))
    assert sorted(path.name for path in (tmp_path / "sweep").iterdir()) == ["sweep.yaml"]
    # What only the sweep reads whole (MMLU) is read before Ray or MLflow too.
    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    (mmlu / "law_test.csv").write_text("q,a,b,c,d,E\n")
    config = load_config(write_config(tmp_path / "sweep2", toy_task_dir, mmlu=str(mmlu)))
    with pytest.raises(DataError, match=r"law_test.csv: row 1: field 'answer'"):
        run_sweep(config)
    assert sorted(path.name for path in (tmp_path / "sweep2").iterdir()) == ["sweep.yaml"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"generation": {"model_output": 7}}, r"generations.jsonl: row 1: field 'model_output': 7: expected a string"),
        ({"generation": {"task": "Task9"}}, r"field 'task': 'Task9': expected one of Task1, Task2, Task3"),
        ({"mia": {"nll": float("nan")}}, r"mia.jsonl: row 2: field 'nll': nan: expected a finite number"),
        ({"mia": {"membership": "maybe"}}, r"field 'membership': 'maybe': expected one of member, nonmember"),
        ({"mmlu": {"predicted": "E"}}, r"mmlu.jsonl: row 1: field 'predicted': 'E': expected an answer index 0-3"),
    ],
)
def test_score_refuses_records_it_would_miscount(change: dict, message: str, tmp_path: Path) -> None:
    results = records_dir(tmp_path / "results", **change)
    with pytest.raises(DataError, match=message):
        rescore(results)
    assert not (results / SCORES).exists()


def test_score_refuses_an_empty_record_file_and_a_truncated_scores_json(tmp_path: Path) -> None:
    results = records_dir(tmp_path / "results")
    (results / SCORES).write_text('{"final_score": 0.5, "mmlu_thr')
    with pytest.raises(DataError, match=r"scores.json: not JSON \(.* at line 1\): delete it to rescore"):
        rescore(results)
    (results / SCORES).unlink()
    (results / GENERATIONS).write_text("")
    with pytest.raises(DataError, match=r"generations.jsonl: no records"):
        rescore(results)


def test_a_document_counted_twice_in_the_mia_set_is_refused(tmp_path: Path) -> None:
    mia = tmp_path / "mia"
    write_jsonl(mia / "member.jsonl", [{"id": "a", "document": "one"}, {"id": "a", "document": "two"}])
    write_jsonl(mia / "nonmember.jsonl", [{"id": "b", "document": "three"}])
    with pytest.raises(DataError, match=r"member.jsonl: row 2: field 'id': id 'a' again \(first in member.jsonl\)"):
        load_mia(mia)
    write_jsonl(mia / "member.jsonl", [{"id": "a", "document": "one"}])
    write_jsonl(mia / "nonmember.jsonl", [{"id": "b", "document": "one"}])
    with pytest.raises(DataError, match=r"nonmember.jsonl: row 1: field 'document': the same document as id 'a'"):
        load_mia(mia)


def test_a_bad_mmlu_dev_split_is_an_error_not_zero_shot(toy_task_dir: Path, tmp_path: Path) -> None:
    mmlu = tmp_path / "mmlu"
    shutil.copytree(toy_task_dir / "mmlu", mmlu)
    (dev,) = [path for path in mmlu.rglob("*") if path.is_file() and "dev" in path.name]
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    rows[2]["answer"] = "B"
    write_jsonl(dev, rows)
    with pytest.raises(DataError, match=r"row 3: field 'answer': answer 'B' is not an index 0-3"):
        EvalSets.load(toy_task_dir / "data", mmlu=mmlu)  # row 3, where it is: Arrow's error said row 1
    dev.unlink()
    assert EvalSets.load(toy_task_dir / "data", mmlu=mmlu).shots == 0  # no dev split: 0-shot, as before


@pytest.mark.parametrize("base", ["nan", "1.5", "-0.2"])
def test_a_base_mmlu_that_is_no_accuracy_is_refused(base: str, tmp_path: Path, capsys) -> None:
    results = records_dir(tmp_path / "results")
    assert main(["score", str(results), "--mmlu-threshold", "0.75x", "--base-mmlu", base]) == 2
    assert "expected an accuracy in [0, 1]" in one_error_line(capsys) and not (results / SCORES).exists()


def test_a_yaml_key_given_twice_is_refused_with_its_line(toy_task_dir: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path, toy_task_dir)
    path.write_text(path.read_text() + "trials: 5\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+: key 'trials' appears twice in one mapping"):
        load_config(path)


def test_a_jsonl_line_that_is_not_json_is_named_with_its_fault(tmp_path: Path) -> None:
    mia = tmp_path / "mia"
    (mia).mkdir()
    (mia / "member.jsonl").write_text('{"id": "a", "document": "one"},\n')  # a trailing comma
    write_jsonl(mia / "nonmember.jsonl", [{"id": "b", "document": "two"}])
    with pytest.raises(DataError, match=r"member.jsonl: line 1: not JSON \(Extra data, column 31\)"):
        load_mia(mia)


def test_a_value_that_is_not_a_finite_number_names_its_own_field() -> None:
    """`--set retain_weight=nan` was accepted and the loss's divergence blamed the learning rate."""
    with pytest.raises(ParamError, match=r"retain_weight='nan': expected a finite number"):
        build_params(get_method("grad_diff"), {"retain_weight": "nan"})
    with pytest.raises(ParamError, match=r"retain_weight=inf: expected a finite number"):
        build_params(get_method("grad_diff"), {"retain_weight": float("inf")})


def test_a_held_out_fold_that_is_broken_or_not_held_out_is_refused(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A config without `confirm` whose validation fold failed to load had confirmation turned
    off, and the champion chosen on the fold searched on, without a word; a validation fold
    holding a train row gave held-out scores that were not held out."""
    data = tmp_path / "data"
    shutil.copytree(toy_task_dir / "data", data)
    forget = next(data.glob("forget_validation-*.parquet"))
    rows = pq.read_table(forget).to_pylist()

    def config(folder: str, confirm: dict | None = ...) -> Path:  # default: on, the data has a validation fold
        return write_config(tmp_path / folder, toy_task_dir, data=str(data), confirm=confirm)

    pq.write_table(pa.Table.from_pylist([{**rows[0], "task": "Task7"}, *rows[1:]]), forget)
    with pytest.raises(ConfigError, match=r"field 'data': .*forget_validation-.*: row 1: field 'task': unknown task"):
        load_config(config("broken"))

    train_row = pq.read_table(next(data.glob("retain_train-*.parquet"))).to_pylist()[3]
    pq.write_table(pa.Table.from_pylist([*rows, {**train_row, "split": "forget"}]), forget)
    seen = rf"1 row of the validation fold also in the train fold \(the first: id '{re.escape(train_row['id'])}'\)"
    for path, field in ((config("default"), "data"), (config("explicit", confirm={"top_k": 2}), "confirm.split")):
        with pytest.raises(ConfigError, match=rf"field '{field}': .*{seen}: a score on them is not held out"):
            load_config(path)
    assert main(["validate-data", "--data", str(data)]) == 2
    out, err = capsys.readouterr()
    assert "(hf parquet (train))" in out and re.fullmatch(rf"error: {data}: {seen}.*\n", err)
    assert main(["validate-data", "--data", str(data), "--split", "validation"]) == 0  # one fold: nothing to compare


def test_an_mia_set_of_the_other_fold_is_refused(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`mia: <mia>/validation` for a search on the train fold, or the train fold's MIA set as
    `confirm.mia`, scored every run's MIA on documents it never unlearned, without a word."""
    mia = toy_task_dir / "mia"
    theirs = "documents are documents of the {} fold: an MIA set is scored with the fold its members come from"
    path = write_config(tmp_path / "a", toy_task_dir, mia=str(mia / "validation"))
    with pytest.raises(ConfigError, match=rf"field 'mia': .*: 12 of its 24 {theirs.format('validation')}$"):
        load_config(path)
    path = write_config(tmp_path / "b", toy_task_dir, confirm={"mia": str(mia)})
    with pytest.raises(ConfigError, match=rf"field 'confirm.mia': .*: 24 of its 48 {theirs.format('train')}$"):
        load_config(path)

    swapped = tmp_path / "swapped"
    shutil.copytree(mia / "validation", swapped)
    shutil.copytree(mia, swapped / "validation", ignore=shutil.ignore_patterns("validation", "held_out.jsonl"))
    assert main(["validate-data", "--data", str(toy_task_dir / "data"), "--mia", str(swapped)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {swapped}: 12 of its 24 {theirs.format('validation')}",
        f"error: {swapped / 'validation'}: 24 of its 48 {theirs.format('train')}",
    ]
    # evaluate: refused before the model is loaded
    options = ("--split", "validation", "--mia", mia, "--mmlu", toy_task_dir / "mmlu")
    assert main(toy_task_args(toy_task_dir, "evaluate", *options, out=tmp_path / "out")) == 2
    assert f"{mia}: 24 of its 48 {theirs.format('train')}" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()

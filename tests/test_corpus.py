"""Loaders for every task-data layout, and every validation error path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared_data
from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.mia import default_held_out, load_held_out, load_mia
from unlearn_sweep.corpus.mmlu import MmluQuestion, fitted_prompt, format_prompt, load_mmlu
from unlearn_sweep.corpus.semeval import load_task, row_kind
from unlearn_sweep.orchestrator.cli import main

ROW = {"id": "abc-1sc1", "input": "Alma was", "output": "born.", "task": "Task1"}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def task_dir(tmp_path: Path, forget: list[dict], retain: list[dict] | None = None) -> Path:
    write_jsonl(tmp_path / "forget.jsonl", forget)
    write_jsonl(tmp_path / "retain.jsonl", retain if retain is not None else [ROW])
    return tmp_path


def test_row_kind_follows_the_organizers_rule() -> None:
    assert row_kind('"2ebb0e6c-82"sc1') == "sc"
    assert row_kind("df8d2304qa4") == "qa"
    assert row_kind("abc") is None
    assert row_kind("abcqa") is None  # the character before the last one decides


def test_toy_task_loads_in_every_layout(toy_task_dir: Path, tmp_path: Path) -> None:
    hf = load_task(toy_task_dir / "data")  # the public release's layout: the train fold by default
    assert (len(hf.forget), len(hf.retain)) == (120, 120) and hf.layout == "hf parquet (train)"
    assert {row.task for row in hf.forget} == {"Task1", "Task2", "Task3"}
    assert hf.forget[0].id.startswith('"') and hf.forget[0].kind == "sc"
    assert len(load_task(toy_task_dir / "data", "validation").forget) == 60

    submission, official = tmp_path / "submission", tmp_path / "official"
    for folder in (submission, official):
        folder.mkdir()
    for split, rows in (("forget", hf.forget), ("retain", hf.retain)):
        pq.write_table(pa.Table.from_pylist([row.__dict__ for row in rows]), submission / f"{split}.parquet")
        write_jsonl(official / f"{split}.jsonl", [row.__dict__ for row in rows])
    assert load_task(submission).forget == hf.forget
    assert load_task(official).retain == hf.retain

    mia = load_mia(toy_task_dir / "mia")
    assert [d.membership for d in mia].count("member") == 24
    assert {d.id for d in mia if d.membership == "member"} == {
        r.id[:-3].strip('"') for r in hf.forget if r.kind == "sc"
    }
    assert len(load_mmlu(toy_task_dir / "mmlu")) == 40
    assert len(load_mmlu(toy_task_dir / "mmlu", "dev")) == 20


def test_real_public_parquet_and_mia_counts() -> None:
    data = shared_data("semeval25")
    task = load_task(data, "train")
    assert (len(task.forget), len(task.retain)) == (1112, 1136)
    assert any(row.id.startswith('"') for row in task.rows())
    mia = load_mia(data / "mia_data")
    assert [d.membership for d in mia].count("member") == 150
    assert [d.membership for d in mia].count("nonmember") == 150


def test_held_out_documents_are_never_scored_ones(toy_task_dir: Path, tmp_path: Path) -> None:
    held_out = load_held_out(default_held_out(toy_task_dir / "mia"), toy_task_dir / "mia")
    scored = {doc.document for doc in load_mia(toy_task_dir / "mia")}
    assert len(held_out) == 24 and not scored & set(held_out)
    leaky = tmp_path / "leaky.jsonl"  # one scored nonmember among held-out documents, under a new id
    nonmember = next(doc for doc in load_mia(toy_task_dir / "mia") if doc.membership == "nonmember")
    leaky.write_text(json.dumps({"id": "new", "document": nonmember.document}) + "\n")
    with pytest.raises(DataError, match="leaky.jsonl: 1 of its 1 documents are in the scored MIA set"):
        load_held_out(leaky, toy_task_dir / "mia")


def test_real_validation_nonmembers_are_scored_nonmembers() -> None:
    # The public release's validation nonmembers are among the scored ones: no default there.
    mia = shared_data("semeval25", "mia_data")
    with pytest.raises(DataError, match="34 of its 34 documents are in the scored MIA set"):
        load_held_out(default_held_out(mia), mia)


def test_real_lume_jsonl_counts() -> None:
    task = load_task(shared_data("lume"))
    assert (len(task.forget), len(task.retain)) == (2732, 2734)


def test_mmlu_csv_layout_and_prompt(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "abstract_algebra_test.csv").write_text('"What is 2+2?",3,4,5,6,B\nWhy?,a,b,c,d,D\n')
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "abstract_algebra_dev.csv").write_text("Q,a,b,c,d,A\n")
    questions = load_mmlu(tmp_path)
    assert [(q.subject, q.answer) for q in questions] == [("abstract_algebra", 1), ("abstract_algebra", 3)]
    assert questions[0].choices == ("3", "4", "5", "6")
    prompt = format_prompt(questions[0], load_mmlu(tmp_path, "dev"))
    # Open-Instruct's prompt, subject written as it writes it: ' abstract algebra' after 'about '.
    assert prompt == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Q\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )


def test_shots_are_dropped_from_the_end_until_the_prompt_fits() -> None:
    question = MmluQuestion("Q?", "law", ("a", "b", "c", "d"), 0)
    shots = [MmluQuestion(f"shot {n}", "law", ("a", "b", "c", "d"), n % 4) for n in range(5)]

    def words(text: str) -> int:
        return len(text.split())

    full = fitted_prompt(question, shots, words, limit=10_000)
    assert full == format_prompt(question, shots)
    limit = words(format_prompt(question, shots[:3]))
    assert fitted_prompt(question, shots, words, limit=limit) == format_prompt(question, shots[:3])  # the first 3 of 5
    assert fitted_prompt(question, shots, words, limit=1) == format_prompt(question, [])  # never drops the question


@pytest.mark.parametrize(
    "forget, message",
    [
        ([{k: v for k, v in ROW.items() if k != "task"}], "forget.jsonl: row 1: field 'task': missing column"),
        ([ROW, {**ROW, "id": "abc-1sc2", "task": "Task9"}], "forget.jsonl: row 2: field 'task': unknown task 'Task9'"),
        ([{**ROW, "id": "abc-1xx1"}], "forget.jsonl: row 1: field 'id': id 'abc-1xx1' is neither"),
        ([], "forget.jsonl: the forget set is empty"),
        ([{**ROW, "split": "retain"}], "forget.jsonl: row 1: field 'split': row belongs to 'retain'"),
        ([ROW, {**ROW, "output": "died."}], "forget.jsonl: row 2: field 'id': duplicate id 'abc-1sc1' (also row 1)"),
    ],
)
def test_task_errors_name_file_row_and_field(tmp_path: Path, forget: list[dict], message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_task(task_dir(tmp_path, forget))


def test_an_id_in_both_sets_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match="retain.jsonl: row 2: field 'id': duplicate id 'abc-1sc1': also in forget.jsonl"
    ):
        load_task(task_dir(tmp_path, [ROW], [{**ROW, "id": "abc-1qa1"}, ROW]))


def test_malformed_json_and_missing_layout(tmp_path: Path) -> None:
    task_dir(tmp_path, [ROW])
    (tmp_path / "retain.jsonl").write_text(json.dumps(ROW) + '\n{"id": "x"sc1}\n')
    with pytest.raises(DataError, match=r"retain.jsonl: line 2: not JSON \(Expecting ',' delimiter, column 11\)$"):
        load_task(tmp_path)  # the bad line, not the row before it
    with pytest.raises(DataError, match="no task data"):
        load_task(tmp_path / "..")
    with pytest.raises(DataError, match="--split validation applies only"):
        load_task(task_dir(tmp_path, [ROW], [ROW]), "validation")


def test_mia_and_mmlu_errors(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "mia" / "member.jsonl", [{"id": 1, "document": "text"}])
    write_jsonl(tmp_path / "mia" / "nonmember.jsonl", [{"id": 2}])
    with pytest.raises(DataError, match="nonmember.jsonl: row 1: field 'document': missing column"):
        load_mia(tmp_path / "mia")
    write_jsonl(
        tmp_path / "mmlu" / "test.jsonl",
        [{"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 4}],
    )
    with pytest.raises(DataError, match="test.jsonl: row 1: field 'answer': answer 4 is not an index 0-3"):
        load_mmlu(tmp_path / "mmlu")
    write_jsonl(
        tmp_path / "mmlu" / "test.jsonl", [{"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 0}]
    )
    with pytest.raises(DataError, match="field 'choices': expected a list of 4 strings"):
        load_mmlu(tmp_path / "mmlu")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "law_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(DataError, match="law_test.csv: row 1: field 'answer'"):
        load_mmlu(tmp_path / "csv")


def test_validate_data_cli(toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "validate-data",
            "--data",
            str(toy_task_dir / "data"),
            "--mia",
            str(toy_task_dir / "mia"),
            "--mmlu",
            str(toy_task_dir / "mmlu"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert (
        "forget  Task2  sc     8  qa    40" in out
        and "member 24, nonmember 24" in out
        and "test 40 questions in 4 subjects" in out
    )
    # Without --split, both folds and both MIA sets: what a sweep that confirms reads
    assert "(hf parquet (validation))" in out and "total   forget 60 rows" in out and "member 12, nonmember 12" in out

    bad = task_dir(tmp_path / "bad", [{**ROW, "task": "Task7"}])
    assert main(["validate-data", "--data", str(bad), "--mia", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Task7" in err[0] and "MIA directory not found" in err[1]


def test_toy_task_refuses_a_non_empty_output_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["toy-task", "--out", str(tmp_path)]) == 2
    assert "output directory exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("kind", ["DataError", "ConfigError", "SelectionError"])
def test_bad_input_errors_survive_pickling(kind: str) -> None:
    """A Ray task or actor that raises one sends it pickled to the driver: the default reduce
    (the message alone) did not fit the constructor, and unpickling raised a TypeError."""
    import pickle

    from unlearn_sweep.corpus.settings import ConfigError
    from unlearn_sweep.orchestrator.selection import SelectionError

    error = {"DataError": DataError, "ConfigError": ConfigError, "SelectionError": SelectionError}[kind](
        "tasks.jsonl", "duplicate id 'x'", 3, "id"
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) == "tasks.jsonl: row 3: field 'id': duplicate id 'x'"


def test_split_folds_holds_out_whole_documents_with_their_mia_members(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A team with one fold (next month's documents) gets a validation fold the sweep confirms on."""
    from unlearn_sweep.corpus.folds import document_key
    from unlearn_sweep.corpus.mia import check_mia_fold
    from unlearn_sweep.corpus.semeval import load_held_out_fold
    from unlearn_sweep.corpus.toy_task import sweep_paths
    from unlearn_sweep.orchestrator.config import config_from_dict

    mia, out = toy_task_dir / "mia", tmp_path / "split"
    command = ["split-folds", "--data", str(toy_task_dir / "data"), "--mia", str(mia), "--out", str(out)]
    assert main([*command, "--fraction", "0.25"]) == 0
    assert "validation 12 documents: forget 30 rows, retain 30; MIA member 6, nonmember 6" in capsys.readouterr().out
    whole = load_task(toy_task_dir / "data", "train")
    folds = {fold: load_task(out, fold) for fold in ("train", "validation")}
    # Every row in one fold, a document's rows together, every set and task in both folds.
    assert sorted(row.id for fold in folds.values() for row in fold.rows()) == sorted(row.id for row in whole.rows())
    keys = [{document_key(row.id) for row in fold.rows()} for fold in folds.values()]
    assert not keys[0] & keys[1]
    sets_and_tasks = {(row.split, row.task) for row in whole.rows()}
    assert all({(row.split, row.task) for row in fold.rows()} == sets_and_tasks for fold in folds.values())
    # Members follow their documents, the folds pass the sweep's checks, and the sweep confirms.
    load_held_out_fold(out, "validation", "train")
    for mia_set, fold in ((out / "mia", "train"), (out / "mia" / "validation", "validation")):
        check_mia_fold(load_mia(mia_set), mia_set, out, fold)
    assert sorted(d.id for d in load_mia(out / "mia") + load_mia(out / "mia" / "validation")) == sorted(
        d.id for d in load_mia(mia)
    )
    raw = {"name": "s", **sweep_paths(toy_task_dir), "data": str(out), "mia": str(out / "mia"), "methods": ["npo"]}
    config = config_from_dict({**raw, "trials": 2, "storage_path": str(tmp_path / "runs")}, tmp_path / "sweep.yaml")
    assert config.confirm.mia == out / "mia" / "validation" and config.select_by == "held_out"

    # A member that is no document of the task cannot be placed: refused, nothing written.
    stray = tmp_path / "stray"
    shutil.copytree(mia, stray, ignore=shutil.ignore_patterns("validation"))
    with (stray / "member.jsonl").open("a") as members:
        members.write(json.dumps({"id": "nobody", "document": "A text no row of the task holds."}) + "\n")
    assert main([*command[:3], "--mia", str(stray), "--out", str(tmp_path / "none")]) == 2
    assert "member.jsonl: row 25: field 'document': is no document of the task" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    one_document = task_dir(tmp_path / "tiny", [ROW], [{**ROW, "id": "b1qa0"}])  # nothing to hold out
    assert main([command[0], "--data", str(one_document), *command[3:5], "--out", str(tmp_path / "none")]) == 2
    assert "too few documents to hold one out of each set" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_split_folds_places_every_member_of_the_public_release(tmp_path: Path) -> None:
    """The release names train members by document number and its rows by sc id: both are found."""
    from unlearn_sweep.corpus.folds import split_folds

    data = shared_data("semeval25")
    sizes = split_folds(load_task(data, "train"), data / "mia_data", tmp_path / "split")
    assert sizes["train"].members + sizes["validation"].members == 150
    assert sizes["validation"].documents == 141 and sizes["validation"].forget_rows == 220


def test_only_folders_of_this_machines_ended_processes_are_removed(tmp_path: Path, monkeypatch) -> None:
    """Which folders under TMPDIR/unlearn-sweep-<uid> the first temporary folder of a process
    removes: those of this machine's processes that ended (or whose id a later process took),
    never another host's or container's on a shared TMPDIR, nor anything not named as ours."""
    from unlearn_sweep.corpus import scratch

    monkeypatch.setattr(scratch.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(scratch, "_own", None)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])  # its id is free once it ended
    finished.wait()
    root = tmp_path / f"unlearn-sweep-{os.getuid()}"
    machine, this = scratch._machine(), scratch._process_key(scratch.psutil.Process())
    started = this.split("-")[1]
    folders = {
        "ended": f"{machine}-{finished.pid}-{started}",
        "id taken": f"{machine}-{os.getpid()}-{int(started) - 5}",
        "alive": f"{machine}-{this}",
        "other host": f"elsewhere-{finished.pid}-{started}",
        "other container": f"{machine}1-{finished.pid}-{started}",
        "not ours": f"{machine}-notes",
    }
    for name in folders.values():
        (root / name).mkdir(parents=True)
        (root / name / "weights").write_bytes(b"w")
    with scratch.temporary_folder("epoch-1-") as folder:
        assert Path(folder).parent == root / folders["alive"]
        kept = {kind for kind, name in folders.items() if (root / name / "weights").exists()}
    assert kept == {"alive", "other host", "other container", "not ours"}

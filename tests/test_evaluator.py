"""The evaluator on the toy task: batching changes nothing, records reproduce the scores."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import toy_task_args
from unlearn_sweep.corpus.checkpoints import BACKENDS
from unlearn_sweep.corpus.mmlu import format_prompt, load_mmlu
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.corpus.tokens import right_padded, summed_token_nll
from unlearn_sweep.evaluation import inference, vllm_inference
from unlearn_sweep.evaluation.evaluator import (
    GENERATIONS,
    MIA,
    MMLU,
    EvalSets,
    evaluate_checkpoint,
    load,
    release,
    rescore,
    run_inference,
)
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.orchestrator.cli import main


@pytest.fixture(scope="module")
def base(toy_task_dir: Path):
    # float32: batching must change nothing beyond rounding (bfloat16's rounding differs with the batch's shape).
    return inference.load_model(toy_task_dir / "model", dtype="float32")


def test_batched_equals_one_row_at_a_time(toy_task_dir: Path, base) -> None:
    model, tokenizer = base
    rows = load_task(toy_task_dir / "data").rows()[::3]
    prompts, answers = [r.input for r in rows], [r.output for r in rows]
    assert inference.generate(model, tokenizer, prompts, batch_size=16) == inference.generate(
        model, tokenizer, prompts, batch_size=1
    )
    # In bfloat16 a row's logits change slightly with its batch's shape, enough to flip a near-tie of greedy
    # decoding now and then (1 of the toy task's 240 rows on one CPU, none on another): nearly all, not all.
    bf16, _ = inference.load_model(toy_task_dir / "model")
    batched, alone = (
        inference.generate(bf16, tokenizer, prompts, batch_size=16),
        inference.generate(bf16, tokenizer, prompts, batch_size=1),
    )
    assert sum(a == b for a, b in zip(batched, alone, strict=True)) >= 0.95 * len(prompts)
    assert inference.answer_nll(model, tokenizer, prompts, answers, batch_size=16) == pytest.approx(
        inference.answer_nll(model, tokenizer, prompts, answers, batch_size=1), abs=1e-4
    )
    documents = [f"{r.input} {r.output}" for r in rows if r.kind == "sc"]
    assert inference.document_loss(model, tokenizer, documents, batch_size=8) == pytest.approx(
        inference.document_loss(model, tokenizer, documents, batch_size=1), abs=1e-4
    )
    mmlu_prompts = [format_prompt(q) for q in load_mmlu(toy_task_dir / "mmlu")]
    assert inference.choose_letters(model, tokenizer, mmlu_prompts, batch_size=16) == inference.choose_letters(
        model, tokenizer, mmlu_prompts, batch_size=1
    )


def test_the_loss_pass_in_slices_of_logits_equals_the_whole_pass(
    toy_task_dir: Path, base, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most LOGIT_ELEMENTS logits exist at once (here a few positions per slice), and the
    losses are those of the full-vocabulary pass over the whole batch."""
    model, tokenizer = base
    rows = load_task(toy_task_dir / "data").rows()[:12]
    examples = [(ids, [-100] * 3 + ids[3:]) for ids in (tokenizer(f"{r.input} {r.output}")["input_ids"] for r in rows)]
    batch = right_padded(examples, tokenizer.pad_token_id, model.device)
    with torch.inference_mode():
        whole = summed_token_nll(model, *batch)
        monkeypatch.setattr(inference, "LOGIT_ELEMENTS", 5 * len(rows) * model.config.vocab_size)
        sliced = inference.chunked_token_nll(model, *batch)
    assert batch[0].shape[1] > 20  # several slices of 5 positions
    assert torch.equal(whole[1], sliced[1]) and torch.allclose(whole[0], sliced[0], rtol=1e-5)


def test_a_batch_holds_at_most_batch_size_rows_and_their_token_budget() -> None:
    budget = 4 * inference.TOKENS_PER_ROW
    lengths = [budget, 10, budget // 2, budget // 2 + 1, 30, 20, 10, 10, 10]
    groups = list(inference._batches(lengths, 4, "test"))
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    assert all(len(group) <= 4 and len(group) * lengths[group[0]] <= budget for group in groups[1:])
    assert groups[:4] == [[0], [3], [2, 4], [5, 1, 6, 7]]  # longest first, within the budget


def test_mmlu_prompts_are_fitted_once_per_trial_not_per_epoch(toy_task_dir: Path, monkeypatch) -> None:
    """Every epoch's checkpoint comes with its own copy of the tokenizer: the 5-shot prompts
    fitted to 2,048 tokens for the first are the next's, without tokenizing them again."""
    from unlearn_sweep.evaluation import evaluator

    sets = EvalSets.load(toy_task_dir / "data", mmlu=toy_task_dir / "mmlu")
    fitted = []
    monkeypatch.setattr(evaluator, "_FITTED_PROMPTS", {})  # this test's stand-in prompts stay in it
    monkeypatch.setattr(evaluator, "fitted_prompt", lambda *args: fitted.append(args) or "prompt")
    first = inference.load_model(toy_task_dir / "model", dtype="float32")[1]
    second = inference.load_model(toy_task_dir / "model", dtype="float32")[1]
    assert first is not second
    assert evaluator.mmlu_prompts(sets, first) == evaluator.mmlu_prompts(sets, second) == ["prompt"] * len(sets.mmlu)
    assert len(fitted) == len(sets.mmlu)  # once for both
    # A trial hands each epoch a new copy of its (shard of the) sets: equal questions, no refit.
    evaluator.mmlu_prompts(sets.shard(0, 1), second)
    assert len(fitted) == len(sets.mmlu)
    half = sets.shard(0, 2)  # other questions: fitted for them
    evaluator.mmlu_prompts(half, second)
    assert len(fitted) == len(sets.mmlu) + len(half.mmlu)


def test_base_model_scores_and_score_reproduces_evaluate(toy_task_dir: Path, tmp_path: Path) -> None:
    sets = EvalSets.load(toy_task_dir / "data", mia=toy_task_dir / "mia", mmlu=toy_task_dir / "mmlu")
    scores = evaluate_checkpoint(toy_task_dir / "model", sets, out_dir=tmp_path, mmlu_threshold=0.5)
    for split in ("forget", "retain"):
        for task in ("Task1", "Task2", "Task3"):
            assert min(scores["per_task"][split][task].values()) >= 0.7  # as test_base_model_has_memorised_the_task
    assert scores["mia_auc"] >= 0.9 and scores["mmlu_accuracy"] >= 0.8
    # Memorised forget set: the forget terms are ~0, so the aggregate is ~0 and MIA score ~0.
    assert scores["task_aggregate"] < 0.1 and scores["eligible"] is True
    assert scores["final_score"] == pytest.approx(
        (scores["task_aggregate"] + scores["mmlu_accuracy"] + scores["mia_score"]) / 3
    )
    # Scored as the organizers scored: bfloat16, 256 new tokens, MMLU 5-shot (the toy set has a dev split).
    assert scores["eval"] == {"dtype": "bfloat16", "max_new_tokens": 256, "mmlu_shots": 5, "task_settings": True}

    generations = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert set(generations[0]) == {
        "id",
        "task",
        "split",
        "input",
        "expected_output",
        "model_output",
    }  # no NLL pass unless asked
    assert len(generations) == 240
    mia = [json.loads(line) for line in (tmp_path / "mia.jsonl").read_text().splitlines()]
    assert set(mia[0]) == {"id", "membership", "nll"} and len(mia) == 48

    on_disk = json.loads((tmp_path / "scores.json").read_text())
    assert rescore(tmp_path) == on_disk == json.loads(json.dumps(scores))
    (tmp_path / "scores.json").unlink()  # from the records alone: the same scores; how they were computed is unknown
    assert rescore(tmp_path, mmlu_threshold=0.5) == {key: value for key, value in on_disk.items() if key != "eval"}


def test_cli_evaluate_then_score(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "eval"
    args = toy_task_args(toy_task_dir, "evaluate", "--batch-size", "64", out=out)
    assert main(args) == 0
    assert "final_score     null" in capsys.readouterr().out and "final_score is null" in caplog.text
    assert json.loads((out / "scores.json").read_text())["final_score"] is None

    assert main(["score", str(out)]) == 0
    assert "task_aggregate  0.0" in capsys.readouterr().out
    (out / "generations.jsonl").write_text('{"id": "x"\n')
    assert main(["score", str(out)]) == 2
    assert "generations.jsonl: row 1: invalid JSON" in capsys.readouterr().err
    assert main(args[:-2] + ["--mmlu-threshold", "0.75x"]) == 2
    assert "needs the base model's MMLU" in capsys.readouterr().err
    assert main(toy_task_args(toy_task_dir, "evaluate", out=tmp_path / "x", model=tmp_path)) == 2
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err


def test_evaluate_under_torchrun_scores_a_share_per_process(toy_task_dir: Path, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node N --no-python unlearn-sweep evaluate ...` (one process per GPU:
    a 7B model's 14,042 MMLU questions in an eighth of the time on 8) gives the records of one
    process, in its order, and one line of output; float32 here, where batch shapes change a
    document's loss in its last bits only."""
    import subprocess

    options = ["--split", "train", "--mia", toy_task_dir / "mia", "--mmlu", toy_task_dir / "mmlu", "--dtype", "float32"]
    one, launched = tmp_path / "one", tmp_path / "launched"
    assert main(toy_task_args(toy_task_dir, "evaluate", *options, out=one)) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python"]
    done = subprocess.run(
        [
            *command,
            Path(sys.executable).parent / "unlearn-sweep",
            *toy_task_args(toy_task_dir, "evaluate", *options, out=launched),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("scores of") == 1
    for name in ("generations.jsonl", "mmlu.jsonl"):
        assert (launched / name).read_text() == (one / name).read_text()
    alone, shared = (
        [json.loads(line) for line in (folder / "mia.jsonl").read_text().splitlines()] for folder in (one, launched)
    )
    assert [(r["id"], r["membership"]) for r in shared] == [(r["id"], r["membership"]) for r in alone]
    assert [r["nll"] for r in shared] == pytest.approx([r["nll"] for r in alone], abs=1e-5)
    # the toy's members and nonmembers lie far apart: those last bits order no pair otherwise
    assert (launched / "scores.json").read_text() == (one / "scores.json").read_text()


def broken_copies(model_dir: Path, root: Path) -> dict[str, Path]:
    """The model without its weights, and with its safetensors file cut in half."""
    import shutil

    copies = {}
    for kind in ("no weights", "truncated"):
        folder = shutil.copytree(model_dir, root / kind.replace(" ", "_"))
        weights = folder / "model.safetensors"
        if kind == "no weights":
            weights.unlink()
        else:
            with weights.open("r+b") as handle:
                handle.truncate(weights.stat().st_size // 2)
        copies[kind] = folder
    return copies


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
        (["--mmlu-shots", "-1"], "argument --mmlu-shots: must be >= 0, got -1"),
    ],
)
def test_evaluate_refuses_empty_batches_and_generations(
    args: list[str], message: str, toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(toy_task_args(toy_task_dir, "evaluate", *args, out=tmp_path / "o"))
    assert exit_.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_checkpoint_without_or_with_truncated_weights_is_one_line(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copies = broken_copies(toy_task_dir / "model", tmp_path)
    expected = {
        "no weights": "no_weights: no weights (model.safetensors",
        "truncated": "truncated/model.safetensors: unreadable weights",
    }
    for kind, folder in copies.items():
        for command in (
            toy_task_args(toy_task_dir, "evaluate", out=tmp_path / "o", model=folder),
            toy_task_args(toy_task_dir, "unlearn --method grad_diff", out=tmp_path / "u", model=folder),
        ):
            assert main(command) == 2
            error = capsys.readouterr().err.strip()
            assert len(error.splitlines()) == 1 and expected[kind] in error, error
    assert not (tmp_path / "o").exists() and not (tmp_path / "u").exists()


def test_evaluate_replaces_every_older_record(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "eval"
    base = toy_task_args(toy_task_dir, "evaluate", "--max-new-tokens", "4", out=out)
    assert main(base + ["--mia", str(toy_task_dir / "mia"), "--mmlu", str(toy_task_dir / "mmlu")]) == 0
    assert (out / "mia.jsonl").exists() and (out / "mmlu.jsonl").exists()
    assert main(base) == 0  # without MIA and MMLU: their old records must not be read back with the new scores
    assert sorted(path.name for path in out.iterdir()) == ["generations.jsonl", "scores.json"]
    capsys.readouterr()
    assert main(["score", str(out)]) == 0
    assert "mia_auc         null" in capsys.readouterr().out


def test_unlearn_whose_loss_diverges_fails_in_one_line_and_writes_nothing(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "diverged"
    settings = ("--set", "learning_rate=1e6", "--set", "epochs=1")
    assert main(toy_task_args(toy_task_dir, "unlearn --method grad_ascent", *settings, out=out)) == 1
    error = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("unlearn-sweep")
    ]  # beside progress bars
    assert len(error) == 1 and "loss became nan" in error[0] and "learning_rate 1e+06 too high?" in error[0], error
    assert not out.exists() and not list(tmp_path.glob(".diverged*"))


def test_best_and_export_never_create_a_store_and_export_names_an_unwritable_path(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["best", "exp"], ["export", "exp", "--out", "submission"]):
        assert main(command) == 2
        assert "mlflow.db: no MLflow store here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    from unlearn_sweep.corpus.errors import DataError
    from unlearn_sweep.corpus.staging import staged_directory

    with pytest.raises(DataError, match="/proc/submission: cannot be written"):
        with staged_directory("/proc/submission"):
            pass


def test_dtype_and_answer_nll_are_chosen_and_recorded(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "fp32"
    options = ("--dtype", "float32", "--answer-nll", "--max-new-tokens", "8", "--mmlu", toy_task_dir / "mmlu")
    assert main(toy_task_args(toy_task_dir, "evaluate", *options, "--mmlu-shots", "0", out=out)) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["eval"] == {"dtype": "float32", "max_new_tokens": 8, "mmlu_shots": 0, "task_settings": False}
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert all(isinstance(row["nll"], float) for row in generations)
    assert (
        main(["score", str(out)]) == 0 and json.loads((out / "scores.json").read_text())["eval"] == scores["eval"]
    )  # kept on rescoring
    model, _ = inference.load_model(toy_task_dir / "model")
    assert next(model.parameters()).dtype == torch.bfloat16  # the organizers' inference dtype by default


def test_mmlu_compares_the_last_token_of_each_answer_letter(base) -> None:
    _, tokenizer = base
    assert inference.letter_token_ids(tokenizer) == [
        tokenizer.encode(f" {letter}", add_special_tokens=False)[-1] for letter in "ABCD"
    ]


def test_outputs_get_the_users_normal_permissions(toy_task_dir: Path, tmp_path: Path) -> None:
    import os
    import stat

    previous = os.umask(0o022)
    try:
        out, unlearned = tmp_path / "eval", tmp_path / "unlearned"
        options = ("--max-new-tokens", "2", "--dtype", "float32")
        assert main(toy_task_args(toy_task_dir, "evaluate", *options, out=out)) == 0
        assert main(toy_task_args(toy_task_dir, "unlearn --method grad_diff", "--set", "epochs=1", out=unlearned)) == 0
    finally:
        os.umask(previous)
    for folder in (out, unlearned):  # readable by teammates on shared storage, as mkdir and open would make them
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {0o644}, folder


def test_the_vllm_backend_is_refused_where_it_cannot_run(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if vllm_inference.unavailable() is None:
        pytest.skip("vLLM runs here: test_the_vllm_backend_gives_the_hf_records covers it")
    out = tmp_path / "out"
    assert main(toy_task_args(toy_task_dir, "evaluate", "--backend", "vllm", out=out)) == 2
    assert (
        capsys.readouterr().err == f"unlearn-sweep: error: --backend vllm: {vllm_inference.unavailable()}\n"
        and not out.exists()
    )


def test_a_vllm_engine_starts_on_this_ranks_gpu_after_trainings_cache_is_released(
    toy_task_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without vLLM or a GPU: a stand-in engine records its arguments and what it saw when it
    started. The training process's cached blocks go back first (vLLM counts them as taken),
    the engine process sees only this rank's GPU (device 1 of "4,6" here), prefix caching is off
    (prompt log-probabilities depend on request order with it), and a GPU without the share free
    is refused in one line."""
    started = []
    calls = []

    class Engine:
        def __init__(self, **arguments) -> None:
            started.append((arguments, os.environ["CUDA_VISIBLE_DEVICES"], list(calls)))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=Engine))
    monkeypatch.setattr(vllm_inference, "unavailable", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (50 * 2**30, 80 * 2**30))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    vllm_inference.load_model(toy_task_dir / "model", "float32", 0.4)
    ((arguments, visible, before),) = started
    assert visible == "6" and before == ["empty_cache"] and os.environ["CUDA_VISIBLE_DEVICES"] == "4,6"
    assert arguments["enable_prefix_caching"] is False and arguments["enforce_eager"] is True
    assert (arguments["gpu_memory_utilization"], arguments["dtype"]) == (0.4, "float32")
    with pytest.raises(RuntimeError, match=r"needs 0.7 of the GPU free \(56.0 GiB\), 50.0 GiB is"):
        vllm_inference.load_model(toy_task_dir / "model", "float32", 0.7)
    assert len(started) == 1


@pytest.mark.skipif(vllm_inference.unavailable() is not None, reason="needs vLLM and a CUDA GPU")
def test_the_vllm_backend_gives_the_hf_records(toy_task_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU with vLLM: the same greedy generations, MMLU letters and document losses as the HF
    backend, in float32 (in bfloat16 two engines' kernels round differently, as batches do), eager
    and batch-invariant (vLLM's VLLM_BATCH_INVARIANT, where its version has it). As for HF's own
    batches in bfloat16, a near-tie may flip a row; a pass defined differently (decoding,
    positions, truncation, letter ids) would change most of them."""
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    sets = EvalSets.load(toy_task_dir / "data", mia=toy_task_dir / "mia", mmlu=toy_task_dir / "mmlu")
    records = {}
    for backend in BACKENDS:
        options = EvalOptions(dtype="float32", backend=backend)
        model, tokenizer = load(toy_task_dir / "model", options)
        records[backend] = run_inference(model, tokenizer, sets, options)
        release(model, options)
    hf, vllm = records["hf"], records["vllm"]

    def share_equal(key: str, name: str) -> float:
        return sum(a[key] == b[key] for a, b in zip(vllm[name], hf[name], strict=True)) / len(hf[name])

    assert share_equal("model_output", GENERATIONS) >= 0.95 and share_equal("predicted", MMLU) >= 0.95
    assert [row["nll"] for row in vllm[MIA]] == pytest.approx([row["nll"] for row in hf[MIA]], abs=1e-3)


def test_both_backends_implement_one_interface_with_the_same_signatures() -> None:
    import inspect

    from unlearn_sweep.evaluation.evaluator import InferenceBackend, backend_passes

    def shape(function) -> list[tuple[int, str, object]]:  # position, name (after the model's), default
        parameters = list(inspect.signature(function).parameters.values())
        return [(i, p.name if i else "model", p.default) for i, p in enumerate(parameters)]

    names = [name for name in vars(InferenceBackend) if not name.startswith("_")]
    assert sorted(names) == ["choose_letters", "document_loss", "generate", "open_model", "release"]
    hf, vllm = backend_passes("hf"), backend_passes("vllm")
    for name in names:
        assert shape(getattr(hf, name)) == shape(getattr(vllm, name)), name

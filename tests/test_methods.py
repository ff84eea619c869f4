"""Every unlearning method on the toy task, the registry's checks, and merging."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import terminated_when, toy_task_args, wait_until_ready
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM
from unlearn_sweep.corpus.mia import load_mia
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint
from unlearn_sweep.evaluation.inference import answer_nll, document_loss, load_model
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.methods.entities import entity_spans
from unlearn_sweep.methods.memory_plan import ModelShape
from unlearn_sweep.methods.merge import MergeParams, della_drop, merge_checkpoints, merge_deltas, trim
from unlearn_sweep.methods.registry import ParamError, build_params, get_method, method_names, run_method
from unlearn_sweep.methods.training import MicroBatch, schedule, training_arguments
from unlearn_sweep.orchestrator.cli import main


@pytest.fixture(scope="module")
def task(toy_task_dir: Path):
    return load_task(toy_task_dir / "data")


def mean_answer_nll(model_dir: Path, rows) -> float:
    model, tokenizer = load_model(model_dir)
    values = answer_nll(model, tokenizer, [r.input for r in rows], [r.output for r in rows], batch_size=64)
    return sum(values) / len(values)


def mmlu_accuracy(model_dir: Path, toy_task_dir: Path) -> float:
    sets = EvalSets.load(toy_task_dir / "data", mmlu=toy_task_dir / "mmlu")
    return evaluate_checkpoint(model_dir, sets, EvalOptions(dtype="float32"))["mmlu_accuracy"]


@pytest.fixture(scope="module")
def base_mmlu(toy_task_dir: Path) -> float:
    return mmlu_accuracy(toy_task_dir / "model", toy_task_dir)


@pytest.fixture(scope="module")
def base_nll(toy_task_dir: Path, task) -> tuple[float, float]:
    return mean_answer_nll(toy_task_dir / "model", task.forget), mean_answer_nll(toy_task_dir / "model", task.retain)


def assert_whole_trained_checkpoint(folder: Path, base: Path) -> None:
    """The folder loads as the base architecture with every weight of its own (none missing,
    re-initialised or unexpected), all finite, and not the base model's weights."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    trained, original = model.state_dict(), AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert trained.keys() == original.keys()
    assert all(torch.isfinite(weight).all() for weight in trained.values())
    assert any(not torch.equal(trained[name], original[name]) for name in trained)


@pytest.mark.parametrize(
    "name, settings, keeps_retain",
    [
        ("grad_ascent", {}, False),
        ("grad_ascent", {"entity_only": True, "finetune_epochs": 1}, False),
        ("grad_diff", {}, True),
        ("kl_min", {}, False),
        ("npo", {"beta": 0.1, "retain_ce_weight": 5.0, "retain_kl_weight": 5.0}, True),
        (
            "sugd",
            {"chunk_size": 64, "epochs": 1, "positive_ratio": 1.0, "positive_factor": 1.0, "adapter": "full"},
            True,
        ),
        ("simnpo", {"learning_rate": 3e-4, "retain_weight": 3.0}, True),
        ("rmu", {"learning_rate": 1e-3, "adaptive": True, "steering_coeff": 5.0, "alpha": 10.0, "epochs": 1}, False),
        ("task_vector", {"scale": 1.0, "learning_rate": 3e-4}, False),
    ],
)
def test_method_forgets(
    name, settings, keeps_retain, toy_task_dir: Path, task, base_nll, base_mmlu, tmp_path: Path
) -> None:
    epochs_seen = []
    out = run_method(
        name,
        toy_task_dir / "model",
        task,
        tmp_path / "out",
        {"learning_rate": 1e-4, **settings},
        on_epoch=lambda epoch, checkpoint, last: epochs_seen.append(epoch),
    )
    assert epochs_seen == list(range(1, len(epochs_seen) + 1)) and epochs_seen
    assert_whole_trained_checkpoint(out, toy_task_dir / "model")
    assert json.loads((out / "unlearn_config.json").read_text())["method"] == name
    forget, retain = mean_answer_nll(out, task.forget), mean_answer_nll(out, task.retain)
    forget_before, retain_before = base_nll
    assert forget > forget_before + 0.02, (forget_before, forget)
    if keeps_retain:
        # The retain loss moves far less than the forget loss.
        assert retain - retain_before < 0.5 * (forget - forget_before), (retain_before, retain, forget_before, forget)
    assert mmlu_accuracy(out, toy_task_dir) >= 0.75 * base_mmlu  # general ability kept, as the demo's threshold asks


def member_auc(model_dir: Path, toy_task_dir: Path) -> float:
    """The MIA AUC from whole-document losses, members against the scored nonmembers."""
    documents = load_mia(toy_task_dir / "mia")
    model, tokenizer = load_model(model_dir, dtype="float32")
    losses = document_loss(model, tokenizer, [doc.document for doc in documents])
    return roc_auc_score([doc.membership == "member" for doc in documents], [-loss for loss in losses])


def test_mia_target_moves_members_toward_unseen_documents(
    toy_task_dir: Path, task, base_nll, base_mmlu, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = toy_task_args(toy_task_dir, "unlearn --method mia_target")
    assert main(args + ["--out", str(tmp_path / "none")]) == 2  # no held-out documents: refused before training
    assert "mia_target needs held-out documents" in capsys.readouterr().err and not (tmp_path / "none").exists()
    settings = ["learning_rate=5e-4", "epochs=5", "forget_weight=3", "retain_weight=5"]
    # --mia: the held-out documents default to mia/held_out.jsonl, checked against the scored set.
    assert (
        main(
            args
            + ["--mia", str(toy_task_dir / "mia"), "--out", str(tmp_path / "out")]
            + [f"--set={kv}" for kv in settings]
        )
        == 0
    )
    out = tmp_path / "out"
    forget, retain = mean_answer_nll(out, task.forget), mean_answer_nll(out, task.retain)
    assert forget > base_nll[0] + 1.0 and retain - base_nll[1] < 0.5 * (forget - base_nll[0]), (
        base_nll,
        forget,
        retain,
    )
    assert member_auc(toy_task_dir / "model", toy_task_dir) == 1.0
    assert member_auc(out, toy_task_dir) < 0.97
    assert mmlu_accuracy(out, toy_task_dir) >= 0.75 * base_mmlu


def assert_planned_size(checkpoint: Path, method: str, settings: dict[str, Any], base: Path) -> None:
    """The storage plan's size of a run's checkpoint is what it saved: its weights' bytes
    (exactly, or at most for a LoRA adapter saved alone, planned as fp32)."""
    method_object = get_method(method)
    params = method_object.for_this_device(build_params(method_object, settings))
    planned = method_object.checkpoint_bytes(ModelShape.from_config(base), params)
    saved = sum(
        tensor.numel() * tensor.element_size()
        for path in checkpoint.glob("*.safetensors")
        for tensor in load_file(path).values()
    )
    adapter_alone = (checkpoint / "adapter_config.json").exists()
    assert saved > 0 and (saved <= planned if adapter_alone else saved == planned), (saved, planned)


def test_lora_and_last_k_layers(toy_task_dir: Path, task, tmp_path: Path) -> None:
    lora = run_method(
        "grad_diff",
        toy_task_dir / "model",
        task,
        tmp_path / "lora",
        {"adapter": "lora", "learning_rate": 1e-3, "epochs": 1},
    )
    assert (lora / "model.safetensors").exists() and not (lora / "adapter_config.json").exists()
    assert_planned_size(lora, "grad_diff", {"adapter": "lora"}, toy_task_dir / "model")  # the base's dtype
    qlora = run_method(
        "grad_diff",
        toy_task_dir / "model",
        task,
        tmp_path / "qlora",
        {"adapter": "qlora", "learning_rate": 1e-3, "epochs": 1},
    )
    assert "quantization_config" not in json.loads((qlora / "config.json").read_text())
    assert load_file(qlora / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    last = run_method(
        "grad_ascent",
        toy_task_dir / "model",
        task,
        tmp_path / "last",
        {"adapter": "last_k", "last_k_layers": 1, "epochs": 1},
    )
    base, changed = load_file(toy_task_dir / "model" / "model.safetensors"), load_file(last / "model.safetensors")
    assert torch.equal(base["model.layers.0.mlp.up_proj.weight"], changed["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(base["model.layers.3.mlp.up_proj.weight"], changed["model.layers.3.mlp.up_proj.weight"])
    assert_planned_size(last, "grad_ascent", {"adapter": "last_k"}, toy_task_dir / "model")


@pytest.mark.parametrize(
    "name, settings", [("grad_diff", {}), ("grad_ascent", {"entity_only": True}), ("mia_target", {})]
)
def test_examples_are_cut_to_max_length_and_the_cut_is_counted(name: str, settings: dict, toy_task_dir: Path, task):
    """max_length cut rows' answers with nothing to say so (LUME's longest rows are about 400 of
    OLMo's tokens, the default was 256): every encoding is whole now, cut in one place, counted."""
    from transformers import AutoTokenizer

    method, tokenizer = get_method(name), AutoTokenizer.from_pretrained(toy_task_dir / "model")
    whole = [ids for part in method.encode(tokenizer, task, build_params(method, settings)) for ids, _ in part]
    cap = sorted(map(len, whole))[len(whole) // 2]
    forget, retain, cut = method.examples(tokenizer, task, build_params(method, {**settings, "max_length": cap}))
    assert (cut.max_length, cut.examples, cut.longest) == (cap, len(whole), max(map(len, whole)))
    assert cut.cut == sum(len(ids) > cap for ids in whole) > 0
    assert [ids for ids, _ in forget + retain] == [ids[:cap] for ids in whole]
    assert all(len(labels) == len(ids) for ids, labels in forget + retain)
    assert method.examples(tokenizer, task, build_params(method, settings))[2].cut == 0  # the default holds them


def test_training_says_what_max_length_cut(toy_task_dir: Path, task, tmp_path: Path, caplog) -> None:
    few = dataclasses.replace(task, forget=task.forget[:4], retain=task.retain[:4])
    run_method("grad_diff", toy_task_dir / "model", few, tmp_path / "out", {"epochs": 1, "max_length": 8})
    assert "max_length 8 cuts 8 of the 8 forget and retain examples (the longest is" in caplog.text


def test_registry_checks_names_and_types() -> None:
    assert {"grad_ascent", "grad_diff", "kl_min", "npo", "sugd", "task_vector", "merge"} <= set(method_names())
    npo = get_method("npo")
    params = build_params(npo, {"beta": "0.5", "epochs": "3", "bf16": "false"})
    assert (params.beta, params.epochs, params.bf16) == (0.5, 3, False)
    with pytest.raises(ParamError, match="unknown method 'nope'; valid methods: .*grad_ascent"):
        get_method("nope")
    with pytest.raises(ParamError, match="unknown hyperparameter.*bta.*valid: .*beta"):
        build_params(npo, {"bta": "1"})
    with pytest.raises(ParamError, match="epochs='two': expected int"):
        build_params(npo, {"epochs": "two"})
    with pytest.raises(ParamError, match="bf16='maybe': expected bool"):
        build_params(npo, {"bf16": "maybe"})
    with pytest.raises(ParamError, match="adapter='prefix'"):
        build_params(npo, {"adapter": "prefix"})


def test_unlearn_prints_what_it_wrote_and_no_library_notice(toy_task_dir: Path, tmp_path: Path) -> None:
    """DeepSpeed, imported by the Trainer, warned on the console that it guessed the CPU."""
    environment = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    command = toy_task_args(toy_task_dir, "unlearn --method grad_ascent", "--set", "epochs=1", out=tmp_path / "out")
    done = subprocess.run(
        [sys.executable, "-m", "unlearn_sweep.orchestrator.cli", *command],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    assert (done.stdout, done.stderr) == (f"grad_ascent: wrote {tmp_path / 'out'}\n", "")


def test_importing_the_methods_prints_no_library_notice() -> None:
    """peft imports bitsandbytes, which on a CPU with AVX-512 BF16 (this machine's) logged at
    import that its optional `kernels` package is missing: the exported unlearn.py and every
    trial's log showed it; the CLI alone had quieted it."""
    code = "import unlearn_sweep.methods.training, unlearn_sweep.methods.merge"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr == ""


def test_training_shows_its_steps_on_a_terminal_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = build_params(get_method("grad_diff"), {})
    assert training_arguments(params, tmp_path).disable_tqdm  # a trial's worker, a pipe, a log file
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not training_arguments(params, tmp_path).disable_tqdm  # `unlearn` on a terminal


def test_qlora_under_deepspeed_is_refused_where_its_bf16_engine_would_cast_the_fp32_parts() -> None:
    npo = get_method("npo")
    for bf16 in ("auto", "true"):  # auto: bf16 on a GPU with bf16 units
        with pytest.raises(ParamError, match="adapter='qlora' under DeepSpeed runs only with bf16 false"):
            build_params(npo, {"adapter": "qlora", "zero_stage": 2, "bf16": bf16})
    assert build_params(npo, {"adapter": "qlora", "zero_stage": 2, "bf16": "false"}).zero_stage == 2
    assert build_params(npo, {"adapter": "qlora"}).bf16 is None  # without DeepSpeed: peft's own mixed precision


def test_bf16_is_decided_by_the_training_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Left unset (or "auto"), bf16 is on where the device has bf16 units and off on a CPU;
    an explicit value stays whatever the device."""
    npo = get_method("npo")
    assert build_params(npo, {}).bf16 is None and build_params(npo, {"bf16": "auto"}).bf16 is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU, whatever this machine has
    assert npo.for_this_device(build_params(npo, {})).bf16 is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert npo.for_this_device(build_params(npo, {})).bf16 is True
    assert npo.for_this_device(build_params(npo, {"bf16": "false"})).bf16 is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a V100
    assert npo.for_this_device(build_params(npo, {})).bf16 is False


def test_unlearn_cli_errors_write_nothing(toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = toy_task_args(toy_task_dir, "unlearn", out=tmp_path / "o")
    assert main(args + ["--method", "npo", "--set", "beta=x"]) == 2
    assert "beta='x': expected float" in capsys.readouterr().err
    assert main(args + ["--method", "npo", "--set", "beta"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_run_left_in_its_temporary_folder_goes_with_the_next_run(
    toy_task_dir: Path, tmp_path: Path
) -> None:
    """A process killed outright (SIGKILL, the OOM killer, Ray ending a dead driver's workers)
    runs no cleanup: its temporary folders stayed in TMPDIR, and `unlearn`'s staging folder
    beside its output, whole models at 7B. The next run on the machine removes the former, the
    next run into that output the latter, and both leave those of a process still running."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    holding = "from unlearn_sweep.corpus.scratch import temporary_folder; held = temporary_folder('held-'); input()"
    with (tmp_path / "holding.log").open("w") as output:
        running = subprocess.Popen(
            [sys.executable, "-c", holding], env=env, stdin=subprocess.PIPE, stdout=output, stderr=output
        )

    def killed_unlearn(out: str) -> Path:
        """`unlearn` killed once it has its trainer's temporary folder; the folder that holds it."""
        command = toy_task_args(toy_task_dir, "unlearn", "--method", "grad_ascent", out=tmp_path / out)
        before = set(temporary.rglob("trainer-*"))
        terminated_when(  # SIGKILL: no cleanup runs
            [sys.executable, "-m", "unlearn_sweep.orchestrator.cli", *command],
            lambda run: set(temporary.rglob("trainer-*")) - before,
            tmp_path / f"unlearn-{len(before)}.log",
            env,
            signal.SIGKILL,
        )
        (trainer,) = set(temporary.rglob("trainer-*")) - before
        return trainer.parent

    try:
        first = killed_unlearn("out")
        (staged,) = tmp_path.glob(".out.*")  # the output's staging folder, beside it
        wait_until_ready(running, lambda running: any(temporary.rglob("held-*")), tmp_path / "holding.log")
        (held,) = temporary.rglob("held-*")
        second = killed_unlearn("out")
        assert not first.exists() and second.exists()  # the killed run's folder went as the next run started
        assert not staged.exists() and len(list(tmp_path.glob(".out.*"))) == 1  # and its staging folder
        assert held.exists()  # a running process's folder stays
    finally:
        running.communicate(b"\n", timeout=60)
    assert not held.parent.exists()  # a process that ends removes its own folder


def test_entity_extractor() -> None:
    text = (
        " Security Number is 914-13-1456. Hugo Marek resides at 72 Park Drive, Oslo, NY, 63457. Email hugo_m@mail.net."
    )
    found = [text[a:b] for a, b in entity_spans(text)]
    for entity in ("914-13-1456", "Hugo Marek", "72", "Park Drive", "Oslo", "63457", "hugo_m@mail.net"):
        assert entity in found
    assert entity_spans("The end of it.") == []


def merged(
    deltas: list[torch.Tensor], weights: torch.Tensor, combination: str, base: torch.Tensor | None = None, **knobs: Any
) -> torch.Tensor:
    return merge_deltas(deltas, weights, MergeParams(combination=combination, **knobs), base)


def test_merges_match_their_definitions() -> None:
    deltas = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-1.0, 1.0, 2.0, -4.0])]
    weights = torch.tensor([1.0, 1.0])
    # TIES at density 0.5: trim to [0,-2,3,0] and [0,0,2,-4]; elected signs (+,-,+,-); disjoint mean.
    assert torch.allclose(merged(deltas, weights, "ties", density=0.5), torch.tensor([0.0, -2.0, 2.5, -4.0]))
    # linear is the weighted average (mergekit), task_arithmetic the scaled weighted sum.
    assert torch.allclose(
        merged(deltas, torch.tensor([0.5, 0.25]), "linear"), torch.tensor([0.25, -0.75, 2.0, -0.75]) / 0.75
    )
    assert torch.allclose(
        merged(deltas, torch.tensor([0.5, 0.25]), "task_arithmetic", scale=2.0),
        torch.tensor([0.5, -1.5, 4.0, -1.5]),
    )
    # Magnitude prune keeps each tensor's top half, then sums with weights.
    assert torch.allclose(merged(deltas, weights, "magnitude_prune", density=0.5), torch.tensor([0.0, -2.0, 5.0, -4.0]))
    # DARE at density 1 drops nothing: DARE-TIES equals TIES without trimming.
    assert torch.allclose(
        merged(deltas, weights, "dare_ties", density=1.0), merged(deltas, weights, "ties", density=1.0)
    )


def test_ties_and_magnitude_prune_are_peft_exactly() -> None:
    from peft.utils import merge_utils

    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(64, 48, generator=generator) for _ in range(3)]
    deltas.append(torch.randint(-2, 3, (64, 48), generator=generator).float())  # many equal magnitudes: exactly k kept
    weights = torch.tensor([0.7, 1.0, 0.4, 0.9])
    for density in (0.2, 0.5, 1.0):
        assert torch.equal(merged(deltas, weights, "ties", density=density), merge_utils.ties(deltas, weights, density))
        assert torch.equal(
            merged(deltas, weights, "magnitude_prune", density=density),
            merge_utils.magnitude_prune(deltas, weights, density),
        )
    assert int((trim(deltas[3], 0.3) != 0).sum()) == int(0.3 * deltas[3].numel())
    for combination in ("dare_ties", "dare_linear"):  # DARE's random drop, drawn in the same order as peft's
        torch.manual_seed(5)
        ours = merged(deltas, weights, combination, density=0.4)
        torch.manual_seed(5)
        assert torch.equal(ours, getattr(merge_utils, combination)(deltas, weights, 0.4))


def random_deltas(count: int = 3, shape: tuple[int, ...] = (32, 24)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def test_breadcrumbs_matches_mergekits_formula() -> None:
    deltas, weights = random_deltas(), torch.tensor([1.0, 0.5, 0.8])
    params = MergeParams(combination="breadcrumbs", density=0.6, gamma=0.1, scale=0.7)

    def mergekit_mask(delta: torch.Tensor) -> torch.Tensor:  # drop the top 10%, then the bottom, keeping 60%
        values = delta.abs().reshape(-1).sort().values
        count = delta.numel()
        low, high = values[count - int(0.6 * count) - int(0.1 * count)], values[count - int(0.1 * count) - 1]
        return (delta.abs() >= low) & (delta.abs() <= high)

    expected = 0.7 * sum(w * d * mergekit_mask(d) for w, d in zip(weights, deltas, strict=True))
    assert torch.allclose(merge_deltas(deltas, weights, params), expected, atol=1e-6)
    elected = merge_deltas(deltas, weights, dataclasses.replace(params, combination="breadcrumbs_ties"))
    kept = torch.stack([w * d * mergekit_mask(d) for w, d in zip(weights, deltas, strict=True)])
    agree = kept.sign() == torch.where(kept.sum(0) >= 0, 1.0, -1.0)
    assert torch.allclose(elected, 0.7 * (kept * agree).sum(0), atol=1e-6)


def test_della_keeps_by_magnitude_rank_and_l1_norm() -> None:
    torch.manual_seed(0)
    delta = torch.randn(200, 400)
    kept = della_drop(delta, density=0.5, epsilon=0.3)
    survived = kept != 0
    assert abs(survived.float().mean().item() - 0.5) < 0.01  # density on average
    large = delta.abs() > delta.abs().median()
    assert survived[large].float().mean() > 0.6 > 0.4 > survived[~large].float().mean()  # density +- epsilon by rank
    assert torch.isclose(kept.abs().sum(), delta.abs().sum(), rtol=1e-5)  # rescaled to the L1 norm (mergekit's rescale)
    deltas, weights = random_deltas(2), torch.tensor([1.0, 1.0])
    torch.manual_seed(3)
    result = merged(deltas, weights, "della_linear", density=0.5, epsilon=0.1)
    torch.manual_seed(3)
    assert torch.allclose(result, della_drop(deltas[0], 0.5, 0.1) + della_drop(deltas[1], 0.5, 0.1))


def test_model_stock_and_slerp_match_their_formulas() -> None:
    deltas = random_deltas(3)
    flat = [d.reshape(-1).double() for d in deltas]
    cos = sum(float(a @ b / (a.norm() * b.norm())) for a, b in itertools.combinations(flat, 2)) / 3
    ratio = 3 * cos / (1 + 2 * cos)
    assert torch.allclose(merged(deltas, torch.ones(3), "model_stock"), ratio * torch.stack(deltas).mean(0), atol=1e-5)

    base = torch.zeros(2, 2)
    first, second = (
        torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
        torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
    )  # orthogonal, unit norm
    middle = merged([first, second], torch.ones(2), "slerp", base, t=0.5)
    assert torch.allclose(
        middle, torch.tensor([[2**-0.5, 2**-0.5], [0.0, 0.0]]), atol=1e-6
    )  # on the circle, not the chord
    for t, end in ((0.0, first), (1.0, second)):
        assert torch.allclose(merged([first, second], torch.ones(2), "slerp", base, t=t), end)


def test_full_model_merge(toy_task_dir: Path, task, tmp_path: Path) -> None:
    base = toy_task_dir / "model"
    same = merge_checkpoints(base, tmp_path / "same", MergeParams(models=f"{base},{base}", density=1.0))
    original, merged = load_file(base / "model.safetensors"), load_file(same / "model.safetensors")
    assert all(torch.equal(original[name], merged[name]) for name in original)

    a = run_method("grad_ascent", base, task, tmp_path / "a", {"epochs": 1})
    b = run_method("grad_diff", base, task, tmp_path / "b", {"epochs": 1})
    sharded = merge_checkpoints(
        base, tmp_path / "sharded", MergeParams(models=f"{a},{b}", combination="linear"), shard_bytes=200_000
    )
    assert (sharded / "model.safetensors.index.json").exists()
    state_a, state_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    name = "model.layers.2.self_attn.q_proj.weight"
    assert torch.allclose(reloaded[name], (state_a[name] + state_b[name]) / 2, atol=1e-6)

    out = run_method("merge", base, task, tmp_path / "ties", {"models": f"{a},{b}", "density": 0.5})
    assert_whole_trained_checkpoint(out, base)
    with pytest.raises(ParamError, match="at least two"):
        run_method("merge", base, task, tmp_path / "x", {"models": str(a)})


def test_lora_adapter_merge(toy_task_dir: Path, task, tmp_path: Path) -> None:
    base = toy_task_dir / "model"
    adapters = [
        run_method(
            "npo",
            base,
            task,
            tmp_path / name,
            {"adapter": "lora", "merge_adapter": False, "epochs": 1, "learning_rate": lr},
        )
        for name, lr in (("over", 3e-3), ("under", 3e-4))
    ]
    assert all((a / "adapter_config.json").exists() for a in adapters)
    assert_planned_size(adapters[0], "npo", {"adapter": "lora", "merge_adapter": False}, base)
    out = run_method(
        "merge", base, task, tmp_path / "merged", {"models": ",".join(map(str, adapters)), "combination": "ties"}
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    original = load_file(base / "model.safetensors")[name]
    assert not torch.equal(load_file(out / "model.safetensors")[name], original)
    assert_planned_size(out, "merge", {"models": ",".join(map(str, adapters))}, base)
    # task arithmetic's scale reaches peft's cat: twice the scale, twice the merged delta
    deltas = []
    for scale in (1.0, 2.0):
        settings = {"models": ",".join(map(str, adapters)), "combination": "task_arithmetic", "scale": scale}
        scaled = run_method("merge", base, task, tmp_path / f"arithmetic-{scale}", settings)
        deltas.append(load_file(scaled / "model.safetensors")[name] - original)
    assert deltas[0].abs().max() > 0 and torch.allclose(deltas[1], 2 * deltas[0], atol=1e-6)


def test_bf16_keeps_fp32_master_weights(toy_task_dir: Path, task, tmp_path: Path) -> None:
    # Updates of ~1e-6 vanish in bf16 weights (one bf16 step near 0.05 is ~2e-4); fp32 master weights keep them.
    out = run_method(
        "grad_diff", toy_task_dir / "model", task, tmp_path / "bf16", {"bf16": True, "epochs": 1, "learning_rate": 1e-6}
    )
    base, trained = load_file(toy_task_dir / "model" / "model.safetensors"), load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert trained[name].dtype == torch.float32
    changed = (trained[name] != base[name]).float().mean().item()
    assert changed > 0.5, changed
    assert_planned_size(out, "grad_diff", {"bf16": True}, toy_task_dir / "model")  # autocast: fp32 weights saved


def test_deepspeed_bf16_saves_bf16_weights_as_the_storage_plan_counts(toy_task_dir: Path, task, tmp_path: Path) -> None:
    # The engine casts the module to bf16 (fp32 master weights live in the optimizer): half the bytes.
    settings = {"epochs": 1, "zero_stage": 2, "bf16": True}
    out = run_method("grad_diff", toy_task_dir / "model", task, tmp_path / "zero2", settings)
    assert load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert_planned_size(out, "grad_diff", settings, toy_task_dir / "model")


def test_gradient_checkpointing_trains_the_same_model(toy_task_dir: Path, task, tmp_path: Path) -> None:
    settings = {"epochs": 1, "learning_rate": 1e-4}
    plain = load_file(
        run_method("npo", toy_task_dir / "model", task, tmp_path / "plain", settings) / "model.safetensors"
    )
    checkpointed = load_file(
        run_method("npo", toy_task_dir / "model", task, tmp_path / "ckpt", {**settings, "gradient_checkpointing": True})
        / "model.safetensors"
    )
    assert all(torch.allclose(plain[name], checkpointed[name], atol=1e-5) for name in plain)


def test_schedule_applies_every_micro_batch() -> None:
    epochs = [[MicroBatch([([1], [1])]) for _ in range(n)] for n in (5, 2)]
    sequence, ends = schedule(epochs, accumulation=3)
    assert ends == [2, 3]  # each epoch ends on an optimizer step: 5 -> 2 steps, 2 -> 1 step
    groups = [sequence[i : i + 3] for i in range(0, len(sequence), 3)]
    # Every group's weights add up to the accumulation (a mean over its real micro-batches) ...
    assert [sum(m.weight for m in group) for group in groups] == [3.0, 3.0, 3.0]
    # ... and every real micro-batch is applied with a positive weight.
    assert sum(m.weight > 0 for m in sequence) == 7


def test_accumulation_larger_than_an_epoch_still_steps(toy_task_dir: Path, task, tmp_path: Path) -> None:
    # The old DeepSpeed stepper never stepped when an epoch had fewer micro-batches than the accumulation.
    out = run_method(
        "grad_diff",
        toy_task_dir / "model",
        task,
        tmp_path / "o",
        {"epochs": 1, "zero_stage": 2, "gradient_accumulation": 64},
    )
    base, trained = load_file(toy_task_dir / "model" / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])


def test_task_vector_moves_tied_embeddings_once(toy_task_dir: Path, task, tmp_path: Path) -> None:
    assert AutoModelForCausalLM.from_pretrained(toy_task_dir / "model").config.tie_word_embeddings
    base = load_file(toy_task_dir / "model" / "model.safetensors")
    settings = {"epochs": 1, "learning_rate": 3e-4}
    once = load_file(
        run_method("task_vector", toy_task_dir / "model", task, tmp_path / "s1", {**settings, "scale": 1.0})
        / "model.safetensors"
    )
    twice = load_file(
        run_method("task_vector", toy_task_dir / "model", task, tmp_path / "s2", {**settings, "scale": 2.0})
        / "model.safetensors"
    )
    # Same fine-tune, so theta(2) - base = 2 (theta(1) - base) for every tensor; subtracting twice from a
    # tied tensor (once as embed_tokens, once as lm_head) breaks that for the embedding.
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.allclose(twice[name] - base[name], 2 * (once[name] - base[name]), atol=1e-6), name
    assert_planned_size(tmp_path / "s1", "task_vector", {}, toy_task_dir / "model")


def test_qlora_scores_what_it_saves(toy_task_dir: Path, task, tmp_path: Path) -> None:
    scored = []

    def keep(epoch: int, checkpoint: Path, last: bool) -> None:
        scored.append(load_file(checkpoint / "model.safetensors"))

    out = run_method(
        "grad_diff",
        toy_task_dir / "model",
        task,
        tmp_path / "q",
        {"adapter": "qlora", "learning_rate": 1e-3, "epochs": 1},
        keep,
    )
    saved = load_file(out / "model.safetensors")
    assert saved["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # merged into the full-precision base
    assert scored[-1].keys() == saved.keys() and all(torch.equal(scored[-1][name], saved[name]) for name in saved)


def test_a_zero_2_run_leaves_no_engine_in_its_process(toy_task_dir: Path, task, tmp_path: Path) -> None:
    """A DeepSpeed engine outlived its Trainer, held by its own hooks: each ZeRO-2 run left its
    model and optimizer states in the process, and a reused Ray actor's next trial ran beside
    them (on an H200 a 1B QLoRA run after a ZeRO-2 one in the same process peaked at 19.2 GiB
    reserved against a plan of 11.2; the ZeRO-2 states are about 18)."""

    def engines() -> int:
        gc.collect()
        return sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects())

    before = engines()
    run_method("npo", toy_task_dir / "model", task, tmp_path / "zero", {"epochs": 1, "zero_stage": 2})
    assert engines() == before


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_plain_torch(stage: int, toy_task_dir: Path, task, tmp_path: Path) -> None:
    # One rank: the Trainer's DeepSpeed path (engine, accumulation with a short last group, consolidated
    # save) against the same Trainer without DeepSpeed; partitioning across ranks is tested in test_cluster.
    # float32 on any device: under bf16 DeepSpeed trains and saves bf16 weights, plain torch fp32 ones.
    settings = {"epochs": 1, "learning_rate": 1e-4, "gradient_accumulation": 3, "bf16": "false"}
    plain = run_method("npo", toy_task_dir / "model", task, tmp_path / "plain", settings)
    zero = run_method("npo", toy_task_dir / "model", task, tmp_path / "zero", {**settings, "zero_stage": stage})
    expected, actual = load_file(plain / "model.safetensors"), load_file(zero / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.allclose(expected[name], actual[name], atol=1e-5) for name in expected)
    # ZeRO-3's memory-efficient linear replaced torch's F.linear in the process, for good: the
    # next run in a reused worker computed its linear layers with it
    assert "deepspeed" not in str(getattr(torch.nn.functional.linear, "__module__", None))


@pytest.mark.parametrize(
    "settings", [{}, {"zero_stage": 3}, {"adapter": "lora", "learning_rate": 1e-3}, {"gradient_checkpointing": True}]
)
def test_rmu_runs_only_the_layers_it_reads_and_trains_the_same_model(
    settings: dict, toy_task_dir: Path, task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RMU reads one layer's activations, and ran the whole model, logits included, to get them.
    Cut after that layer, it trains the same weights: without DeepSpeed, under ZeRO-3 (whose
    partitioned layers are fetched as they run), under LoRA (the reference: the adapter off) and
    with gradient checkpointing."""
    from unlearn_sweep.methods import rmu

    few = dataclasses.replace(task, forget=task.forget[:16], retain=task.retain[:16])
    settings = {"epochs": 1, "layer": 1, "adaptive": True, "batch_size": 8, **settings}
    ran: list[int] = []
    layer_calls = torch.nn.Module.__call__

    def counted(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if type(module).__name__ == "Olmo2DecoderLayer":
            ran.append(module.self_attn.layer_idx)
        return layer_calls(module, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(torch.nn.Module, "__call__", counted)
        cut = load_file(
            run_method("rmu", toy_task_dir / "model", few, tmp_path / "cut", settings) / "model.safetensors"
        )
    assert set(ran) == {0, 1}  # of 4: up to layer 1, whose output is read

    def whole_model(model: Any, batch: Any, layer: int) -> torch.Tensor:
        mask = batch.attention_mask
        outputs = model(input_ids=batch.input_ids, attention_mask=mask, output_hidden_states=True)
        return outputs.hidden_states[layer + 1][mask.bool()].float()

    monkeypatch.setattr(rmu, "layer_activations", whole_model)
    whole = load_file(
        run_method("rmu", toy_task_dir / "model", few, tmp_path / "whole", settings) / "model.safetensors"
    )
    assert all(torch.equal(cut[name], whole[name]) for name in whole)
    assert not torch.equal(
        cut["model.layers.1.mlp.up_proj.weight"],
        load_file(toy_task_dir / "model" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"],
    )


def test_the_last_epoch_is_exported_once_when_a_hook_and_an_output_folder_are_both_given(
    toy_task_dir: Path, task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last epoch's export (handed to the hook) becomes the output; it was exported a
    second time into the output folder (review: at 7B a consolidated save more per run)."""
    method = get_method("grad_diff")
    exports, last_weights = [], {}
    export = type(method).export
    monkeypatch.setattr(type(method), "export", lambda self, *args: exports.append(args[2]) or export(self, *args))

    def on_epoch(epoch: int, checkpoint: Path, last: bool) -> None:
        if last:
            last_weights.update(load_file(checkpoint / "model.safetensors"))

    out = run_method("grad_diff", toy_task_dir / "model", task, tmp_path / "out", {"epochs": 2}, on_epoch=on_epoch)
    assert len(exports) == 2 and tmp_path / "out" not in exports  # one per epoch, none more
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == last_weights.keys() and all(torch.equal(saved[k], last_weights[k]) for k in saved)
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "unlearn_config.json").read_text())["method"] == "grad_diff"

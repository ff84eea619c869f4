"""The memory plan: estimates from a config.json alone, checked against DeepSpeed's own
estimators, and a sweep refused before launch when its trials cannot fit; the storage plan:
what a sweep holds on storage_path at most, refused where its file system cannot hold it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from test_sweep import FIXED_NPO, write_config
from unlearn_sweep.methods.memory_plan import GIB, PROBE_TOKENS, ModelShape, activation_bytes, model_state_bytes
from unlearn_sweep.methods.registry import build_params, get_method
from unlearn_sweep.orchestrator import storage
from unlearn_sweep.orchestrator.cli import main
from unlearn_sweep.orchestrator.config import ConfigError, SweepConfig, load_config
from unlearn_sweep.orchestrator.plan import check_memory, trains_zero3_in_tune_worker
from unlearn_sweep.orchestrator.storage import Held, Scratch, check_scratch, plan_storage

# Published OLMo-2 shapes (allenai/OLMo-2-1124-7B; a 1B with OLMo-1B's tied embeddings).
OLMO2 = {
    "7B": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 100352,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "1B": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 100352,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}


def write_olmo2_config(folder: Path, size: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"], **OLMO2[size]})
    )
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelShape]:
    root = tmp_path_factory.mktemp("configs")
    return {size: ModelShape.from_config(write_olmo2_config(root / size, size)) for size in OLMO2}


def test_shapes_come_from_the_config(shapes) -> None:
    assert 7.1e9 < shapes["7B"].total < 7.5e9
    assert 1.0e9 < shapes["1B"].total < 1.6e9 and shapes["1B"].total < shapes["7B"].total / 4


@pytest.mark.parametrize("size", ["7B", "1B"])
@pytest.mark.parametrize("gpus", [1, 8])
def test_model_states_match_deepspeeds_estimators(size: str, gpus: int, shapes) -> None:
    shape = shapes[size]
    npo = get_method("npo")
    for offload in (False, True):
        zero2 = build_params(npo, {"zero_stage": 2, "bf16": True, "zero_offload": offload})
        _, expected = estimate_zero2_model_states_mem_needs(shape.total, num_gpus_per_node=gpus, cpu_offload=offload)
        assert model_state_bytes(shape, zero2, gpus) == pytest.approx(expected, rel=0.10)
        zero3 = build_params(npo, {"zero_stage": 3, "bf16": True, "zero_offload": offload})
        _, expected, _ = estimate_zero3_model_states_mem_needs(
            shape.total, shape.largest_layer, num_gpus_per_node=gpus, cpu_offload=offload, cpu_offload_params=False
        )
        assert model_state_bytes(shape, zero3, gpus) == pytest.approx(expected, rel=0.10)


def test_fp32_zero_keeps_its_own_fp32_partition(shapes) -> None:
    # DeepSpeed's ZeRO 1-3 optimizers clone an fp32 partition of the weights even when they are fp32
    # already (measured in benchmarks/scale_rehearsal.py); plain DeepSpeed steps the weights in place.
    shape, npo = shapes["1B"], get_method("npo")
    per_rank = {
        stage: model_state_bytes(shape, build_params(npo, {"zero_stage": stage, "bf16": False}), 8)
        for stage in (0, 2, 3)
    }
    assert per_rank[0] == 16 * shape.total
    assert per_rank[2] == 4 * shape.total + 16 * shape.total // 8
    assert per_rank[3] == 4 * shape.largest_layer + 20 * shape.total // 8


def test_full_npo_7b_fits_zero3_on_8_gpus_and_not_one(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_olmo2_config(tmp_path / "olmo2-7b", "7B")
    npo = {"adapter": "full", "bf16": True, "batch_size": 16, "max_length": 256}
    fits = write_config(
        tmp_path / "a",
        toy_task_dir,
        model=str(model),
        methods=["npo"],
        gpu_memory_gb=80,
        resources_per_trial={"cpu": 8, "gpu": 1, "workers": 8},
        search_space_overrides={"npo": {**npo, "zero_stage": 3}},
    )
    rows = check_memory(load_config(fits))
    assert rows and all(row.fits for row in rows)
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 2**50)  # its storage is another test's
    assert main(["plan", str(fits)]) == 0
    assert "npo" in capsys.readouterr().out

    single = write_config(
        tmp_path / "b",
        toy_task_dir,
        model=str(model),
        methods=["npo"],
        gpu_memory_gb=80,
        resources_per_trial={"cpu": 8, "gpu": 1},
        search_space_overrides={"npo": {**npo, "zero_stage": -1}},
    )
    with pytest.raises(
        ConfigError,
        match=r"field 'gpu_memory_gb': npo \(adapter full, zero_stage -1.*GiB per GPU, 80.0 GiB available; "
        r"it would fit with",
    ):
        check_memory(load_config(single))
    assert main(["plan", str(single)]) == 2
    assert "npo (adapter full" in capsys.readouterr().err


def test_worst_case_of_the_space_is_planned(toy_task_dir: Path, tmp_path: Path) -> None:
    model = write_olmo2_config(tmp_path / "olmo2-1b", "1B")
    path = write_config(
        tmp_path,
        toy_task_dir,
        model=str(model),
        methods=["npo"],
        gpu_memory_gb=141,  # an H200: full NPO at batch 32 x 256 without checkpointing needs 84 GiB
        resources_per_trial={"cpu": 4, "gpu": 1},
        search_space_overrides={
            "npo": {"adapter": {"choice": ["full", "lora"]}, "batch_size": {"int": [4, 32]}, "max_length": 256}
        },
    )
    rows = check_memory(load_config(path))
    assert {row.params.adapter for row in rows} == {"full", "lora"}
    assert {row.params.bf16 for row in rows} == {True}  # the default on the GPUs a plan is for
    assert {row.params.batch_size for row in rows} == {32}
    full, lora = sorted(rows, key=lambda row: row.params.adapter)
    assert (
        lora.estimate.model_states < full.estimate.model_states / 2  # both hold autocast's bf16 weight copies
        and lora.estimate.reference == 0 < full.estimate.reference
    )


def test_a_sweep_that_may_train_zero3_in_tune_workers_is_known_before_it_starts(
    toy_task_dir: Path, tmp_path: Path
) -> None:
    """DeepSpeed keeps a ZeRO-3 engine alive in its process after the run: a sweep whose
    one-worker trials may use it gives each trial a fresh Tune worker (orchestrator/sweep.py);
    multi-worker trials train in Ray Train workers that end with them."""

    def config(folder: str, **overrides) -> SweepConfig:
        return load_config(write_config(tmp_path / folder, toy_task_dir, **overrides))

    assert not trains_zero3_in_tune_worker(
        config("defaults", methods=["npo", "sugd", "merge"], search_space_overrides={})
    )
    zero3_sampled = {"npo": {"zero_stage": {"choice": [-1, 3]}}}
    assert trains_zero3_in_tune_worker(config("sampled", methods=["npo"], search_space_overrides=zero3_sampled))
    merge_sources = {"merge": {"sources": {"over": {**FIXED_NPO, "zero_stage": 3}, "under": FIXED_NPO}}}
    assert trains_zero3_in_tune_worker(config("merge", methods=["merge"], search_space_overrides=merge_sources))
    workers = {"cpu": 1, "gpu": 0, "workers": 2}
    assert not trains_zero3_in_tune_worker(
        config("workers", methods=["npo"], resources_per_trial=workers, search_space_overrides=zero3_sampled)
    )


def test_a_vllm_engines_share_of_the_gpu_is_planned(toy_task_dir: Path, tmp_path: Path) -> None:
    """The vLLM backend reserves its share of the whole GPU for each evaluation, beside the
    training engine, however small the model: the plan counts that share, not the model's copy."""
    model = write_olmo2_config(tmp_path / "olmo2-7b", "7B")
    path = write_config(
        tmp_path,
        toy_task_dir,
        model=str(model),
        methods=["npo"],
        gpu_memory_gb=80,
        resources_per_trial={"cpu": 8, "gpu": 1, "workers": 8},
        eval={"dtype": "bfloat16"},
        search_space_overrides={
            "npo": {"adapter": "full", "bf16": True, "batch_size": 16, "max_length": 256, "zero_stage": 3}
        },
    )
    config = load_config(path)
    (hf,) = check_memory(config)
    assert hf.estimate.evaluation == 2 * hf.shape.total  # the bfloat16 copy of the model
    # Its passes' working set: at batch 32, 32 x 512 tokens of KV cache (2 x 32 layers x 4096 x 2 bytes
    # each: 8 GiB) and one layer's activations; the loss pass's logits come a slice at a time.
    assert 8 * GIB < hf.estimate.evaluation_work < 14 * GIB
    halved = dataclasses.replace(config, eval=dataclasses.replace(config.eval, batch_size=16))
    assert check_memory(halved)[0].estimate.evaluation_work == hf.estimate.evaluation_work // 2
    shared = dataclasses.replace(config, eval=dataclasses.replace(config.eval, backend="vllm", vllm_memory=0.4))
    (vllm,) = check_memory(shared)
    assert vllm.estimate.evaluation == int(0.4 * 80 * GIB) and vllm.estimate.evaluation_work == 0
    greedy = dataclasses.replace(config, eval=dataclasses.replace(config.eval, backend="vllm", vllm_memory=0.9))
    with pytest.raises(
        ConfigError, match=r"field 'gpu_memory_gb': npo \(adapter full, zero_stage 3.*80.0 GiB available"
    ):
        check_memory(greedy)


def test_the_plan_is_made_at_the_longest_example_the_trials_train_on(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch pads to its longest example, not to max_length: planned at max_length (512 by
    default), a sweep whose data is shorter was refused memory it never needs."""
    path = write_config(
        tmp_path,
        toy_task_dir,
        methods=["npo"],
        gpu_memory_gb=3,
        resources_per_trial={"cpu": 1, "gpu": 1},
        search_space_overrides={"npo": {"batch_size": 64}},
    )
    assert main(["plan", str(path)]) == 0  # 2.01 GiB; at 512 tokens 4.21 GiB, refused
    out = capsys.readouterr().out
    assert "length: the longest example trials train on, in the model's tokens" in out
    assert {line.split()[6] for line in out.splitlines()[2:-1]} == {"91"}  # the toy task's longest row
    # A folder of config.json alone has no tokenizer: planned at max_length, as it says.
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 2**50)  # a 1B's checkpoints: not this test's
    model = write_olmo2_config(tmp_path / "olmo2-1b", "1B")
    sized = write_config(tmp_path / "sized", toy_task_dir, model=str(model), methods=["npo"], search_space_overrides={})
    assert main(["plan", str(sized)]) == 0
    out = capsys.readouterr().out
    assert "length: max_length (no tokenizer)" in out and {line.split()[6] for line in out.splitlines()[2:-1]} == {
        "512"
    }


def test_the_storage_plan_counts_what_each_stage_keeps(
    toy_task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_olmo2_config(tmp_path / "olmo2-7b", "7B")  # no dtype in its config: stored in float32
    total = ModelShape.from_config(model).total

    def planned(**overrides) -> tuple[Held, ...]:
        config = load_config(
            write_config(
                tmp_path / "s",
                toy_task_dir,
                **{
                    "model": str(model),
                    "trials": 100,
                    "resources_per_trial": {"cpu": 8, "gpu": 1, "workers": 8},
                    **overrides,
                },
            )
        )
        plan = plan_storage(config)
        assert plan.need(3) == sum(held.count * held.size for held in plan.held) + 3 * plan.running
        return plan.held, plan.running, plan.local

    # Full NPO under ZeRO saves bf16 weights; the merge stage's merges are in the base's float32.
    stages = {
        "methods": ["npo"],
        "search_space_overrides": {"npo": {"adapter": "full", "zero_stage": {"choice": [2, 3]}, "bf16": True}},
        "merge_stage": {"trials": 8},
        "confirm": {"top_k": 3},
    }
    held, running, local = planned(**stages)
    assert held == (
        Held("search", 5 + 2, 2 * total),  # the 5 best configurations and the merge stage's two picks
        Held("merge stage", 5, 4 * total),
        Held("confirmation", 3, 4 * total),
    )
    assert running == 2 * 4 * total
    # on the node's TMPDIR: an epoch being scored and the 2 screening holds, or a merge stage's merge
    assert local == max(3 * 2 * total, 4 * total)
    assert planned(**stages, eval={"screen": False})[2] == 4 * total
    # a multi-worker trial trains under ZeRO-2 unless told (context.MULTI_WORKER_DEFAULTS): bf16 weights
    full = {"npo": {"adapter": "full", "bf16": True}}
    assert planned(methods=["npo"], search_space_overrides=full)[0] == (Held("search", 5, 2 * total),)
    held, _, _ = planned(**stages, keep_checkpoints="all")
    assert [(h.what, h.count) for h in held] == [("search", 100), ("merge stage", 8), ("confirmation", 3)]
    # plain torch keeps float32 weights under bf16 (autocast); a merge search caches each distinct source
    sources = {"over": {**FIXED_NPO, "adapter": {"choice": ["full", "lora"]}}, "under": FIXED_NPO}
    held, _, local = planned(
        methods=["merge"],
        search_space_overrides={"merge": {"sources": sources}},
        resources_per_trial={"cpu": 8, "gpu": 1},  # a merge trial is one process
    )
    # over: full, or lora at 3 ranks x 3 alphas (drawn only under lora); under: one setting
    assert held == (Held("search", 5, 4 * total), Held("merge sources", 1 + 3 * 3 + 1, 4 * total))
    assert local == 4 * total  # the merge; its sources are in the cache
    # a task vector's fine-tuned model is saved whole beside the negation it is merged into
    resources = {"resources_per_trial": {"cpu": 8, "gpu": 1}}
    assert planned(methods=["task_vector"], search_space_overrides={}, **resources)[2] == 3 * 4 * total + 4 * total

    # plan prints it, and exits 2 where the file system cannot hold it
    path = write_config(tmp_path / "p", toy_task_dir, model=str(model), methods=["npo"], search_space_overrides={})
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 2**50)
    assert main(["plan", str(path)]) == 0
    assert "GiB at once (search 2 x 27.19 GiB, 2 x 27.19 GiB per running trial, one running" in capsys.readouterr().out
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 100 * GIB)
    assert main(["plan", str(path)]) == 2
    assert (
        f"field 'storage_path': {tmp_path / 'p' / 'runs'} has 100.0 GiB free, and the sweep may hold 108.8 GiB there"
        in capsys.readouterr().err
    )
    # a local Ray's trials keep their epochs in this machine's TMPDIR: 3 x 27.19 GiB each here
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 2**50 if "runs" in str(folder) else 50 * GIB)
    assert main(["plan", str(path)]) == 2
    assert "field 'max_concurrent_trials': TMPDIR " in (err := capsys.readouterr().err)
    assert "has 50.0 GiB free, and 1 running trial may hold 81.6 GiB there" in err
    # a cluster's nodes report their own TMPDIR: a node holds its own trials' share, at most the sweep's concurrency
    config = load_config(path)
    plan = plan_storage(config)
    node = Scratch("10.0.0.7", "/tmp", 200 * GIB, trials=8)
    check_scratch(config, plan, [node], concurrent=2)
    full = "on node 10.0.0.7, TMPDIR /tmp has 200.0 GiB free, and 3 running trials may hold 244.7 GiB"
    with pytest.raises(ConfigError, match=f"field 'max_concurrent_trials': {full}"):
        check_scratch(config, plan, [node], concurrent=3)


def saved_for_backward(model: torch.nn.Module, run, autocast: bool = False) -> tuple[int, int]:
    """What autograd keeps for the backward of `run(model)` on a CPU, by storage: (tensors with a
    token axis, other tensors that are not the model's weights: autocast's weight copies).
    Attention scores (tokens x tokens) left out, as GPUs' memory-efficient kernels keep none."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    per_token, other = {}, {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and list(tensor.shape).count(PROBE_TOKENS) < 2:
            kept = per_token if PROBE_TOKENS in tensor.shape or 2 * PROBE_TOKENS in tensor.shape else other
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast("cpu", torch.bfloat16, enabled=autocast),
    ):
        run(model)
    return sum(per_token.values()), sum(other.values())


def test_the_activations_planned_are_what_autograd_keeps(toy_task_dir: Path, tmp_path: Path) -> None:
    """The plan's activations of an OLMo-2 (SwiGLU, q/k norms: twice the 34 bytes per token and
    hidden unit of Korthikanti's GPT layer it planned before) hold what autograd saves on a CPU
    forward of two rows: under DeepSpeed's bf16 model, in fp32 and under plain torch's autocast
    (whose bf16 copy of each weight the model states count); RMU's cut pass at its layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from unlearn_sweep.corpus.toy_model import olmo2_config
    from unlearn_sweep.methods.rmu import layer_activations
    from unlearn_sweep.methods.training import Batch

    tokenizer = AutoTokenizer.from_pretrained(toy_task_dir / "model")
    config = olmo2_config(tokenizer, hidden=256, intermediate=688, layers=4, heads=4, tied=False)
    config.save_pretrained(tmp_path)
    shape = ModelShape.from_config(tmp_path)
    ids = torch.randint(0, len(tokenizer), (2, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ascent, rmu = get_method("grad_ascent"), get_method("rmu")

    def planned(method, **settings) -> int:
        params = build_params(method, {"batch_size": 2, "max_length": PROBE_TOKENS, **settings})
        return activation_bytes(shape, params, method.Trainer, 1) // method.Trainer.forwards

    def loss(model: torch.nn.Module) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    for dtype, settings, autocast in (
        (torch.bfloat16, {"zero_stage": 2, "bf16": True}, False),
        (torch.float32, {"bf16": False}, False),
        (torch.float32, {"bf16": True}, True),
    ):
        kept, copies = saved_for_backward(model.to(dtype), loss, autocast)
        assert kept <= planned(ascent, **settings) <= 1.25 * kept, (settings, kept, planned(ascent, **settings))
        if autocast:
            bf16, fp32 = (build_params(ascent, {"bf16": flag}) for flag in (True, False))
            assert model_state_bytes(shape, bf16, 1) - model_state_bytes(shape, fp32, 1) == pytest.approx(
                copies, abs=16
            )
    batch = Batch(ids, torch.ones_like(ids), ids)
    for layer in (0, 2):
        kept, _ = saved_for_backward(
            AutoModelForCausalLM.from_config(config),
            lambda model, layer=layer: layer_activations(model, batch, layer).sum(),
        )
        assert kept <= planned(rmu, layer=layer, bf16=False) <= 1.05 * kept, (layer, kept)


def test_a_layer_whose_probe_cannot_run_in_one_dtype_is_bounded_by_the_other(tmp_path: Path) -> None:
    """OLMoE's experts refuse fp32 inputs on the meta device (the plan raised there): its fp32
    figure is bounded by twice its bf16 one, as any saved tensor at most doubles."""
    from transformers import AutoConfig

    AutoConfig.for_model(
        "olmoe",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        num_experts=8,
        num_experts_per_tok=2,
        eos_token_id=1,
        pad_token_id=1,
    ).save_pretrained(tmp_path)
    shape = ModelShape.from_config(tmp_path)
    assert 0 < shape.layer_activations_16 <= shape.layer_activations_32 <= 2 * shape.layer_activations_16

"""Each method's loss against its published formula, on one fixed tiny batch.

The formulas are written out here token by token (log-probabilities from one forward pass per
prefix, no shifting or masking shared with the code under test), so a sign, a weight, a beta or
a mean taken over the wrong axis fails here, not only "the forget NLL rose"."""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from unlearn_sweep.methods import grad_ascent, grad_diff, kl_min, mia_target, npo, rmu, simnpo, sugd
from unlearn_sweep.methods.training import Batch, MicroBatch, Step, WholePart, collate, step_of


def tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def batch(rows: list[tuple[list[int], int]], factors: list[float] | None = None) -> Batch:
    """Right-padded rows of (token ids, prompt length): labels on the tokens after the prompt."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([[-100] * prompt + ids[prompt:] + [-100] * (width - len(ids)) for ids, prompt in rows])
    return Batch(input_ids, attention_mask, labels, None if factors is None else torch.tensor(factors))


FORGET = batch([([3, 9, 4, 17, 22, 8], 2), ([5, 11, 30], 1)], factors=[-1.0, 0.5])
RETAIN = batch([([7, 2, 19, 25], 1), ([12, 6, 33, 14, 1], 3)])
STEP = Step(FORGET, RETAIN)


def next_token_log_probs(model, ids: list[int], position: int) -> torch.Tensor:
    """log p(. | ids[:position]) from a forward pass over that prefix alone."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids[:position]])).logits[0, -1].float(), -1)


def rows_of(data: Batch) -> list[tuple[list[int], list[int]]]:
    """Each row's real tokens and the positions whose token is labelled."""
    rows = []
    for ids, mask, labels in zip(
        data.input_ids.tolist(), data.attention_mask.tolist(), data.labels.tolist(), strict=True
    ):
        real = ids[: sum(mask)]
        rows.append((real, [t for t, label in enumerate(labels) if label != -100]))
    return rows


def sequence_log_probs(model, data: Batch) -> list[list[float]]:
    """Per row, log p of each labelled token given everything before it."""
    return [[next_token_log_probs(model, ids, t)[ids[t]].item() for t in labelled] for ids, labelled in rows_of(data)]


def mean_nll(model, data: Batch) -> float:
    """Cross-entropy averaged over every labelled token of the batch."""
    values = [-lp for row in sequence_log_probs(model, data) for lp in row]
    return sum(values) / len(values)


def kl_reference_to_model(model, reference, data: Batch) -> float:
    """KL(reference || model) of the next-token distributions at each labelled token, averaged."""
    values = []
    for ids, labelled in rows_of(data):
        for t in labelled:
            p_model, p_reference = next_token_log_probs(model, ids, t), next_token_log_probs(reference, ids, t)
            values.append((p_reference.exp() * (p_reference - p_model)).sum().item())
    return sum(values) / len(values)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def loss_of(trainer_class, params, model, step: Step = STEP, **attributes) -> float:
    """The method's own loss: its Trainer's `loss`, with what it reads of the trainer."""
    with torch.no_grad():
        return trainer_class.loss(SimpleNamespace(params=params, **attributes), model, step).item()


MODEL, REFERENCE = tiny_model(0), tiny_model(1)


def test_gradient_ascent_ascends_on_forget_then_fine_tunes_on_retain() -> None:
    params = grad_ascent.GradAscentParams()
    assert loss_of(grad_ascent.GradAscentTrainer, params, MODEL, Step(FORGET, None, "ascent")) == pytest.approx(
        -mean_nll(MODEL, FORGET), rel=1e-5
    )
    assert loss_of(grad_ascent.GradAscentTrainer, params, MODEL, Step(None, RETAIN, "finetune")) == pytest.approx(
        mean_nll(MODEL, RETAIN), rel=1e-5
    )


def test_gradient_difference() -> None:
    params = grad_diff.GradDiffParams(retain_weight=0.3)
    expected = -mean_nll(MODEL, FORGET) + 0.3 * mean_nll(MODEL, RETAIN)
    assert loss_of(grad_diff.GradDiffTrainer, params, MODEL) == pytest.approx(expected, rel=1e-5)


def test_kl_minimisation() -> None:
    params = kl_min.KlMinParams(kl_weight=2.5)
    expected = -mean_nll(MODEL, FORGET) + 2.5 * kl_reference_to_model(MODEL, REFERENCE, RETAIN)
    assert loss_of(kl_min.KlMinTrainer, params, MODEL, reference=REFERENCE) == pytest.approx(expected, rel=1e-5)


def test_npo_with_retain_kl_and_cross_entropy() -> None:
    """-(2/beta) mean log sigmoid(-beta (log p - log p_ref)) over forget sequences, plus the retain terms."""
    beta = 0.3
    params = npo.NpoParams(beta=beta, npo_weight=0.7, retain_kl_weight=0.4, retain_ce_weight=1.5)
    ratios = [
        sum(own) - sum(ref)
        for own, ref in zip(sequence_log_probs(MODEL, FORGET), sequence_log_probs(REFERENCE, FORGET), strict=True)
    ]
    npo_term = -(2 / beta) * statistics.mean(log_sigmoid(-beta * ratio) for ratio in ratios)
    expected = 0.7 * npo_term + 0.4 * kl_reference_to_model(MODEL, REFERENCE, RETAIN) + 1.5 * mean_nll(MODEL, RETAIN)
    assert loss_of(npo.NpoTrainer, params, MODEL, reference=REFERENCE) == pytest.approx(expected, rel=1e-5)
    # The reference's own loss on the forget set is NPO's fixed point: log sigmoid(0) = -log 2.
    same = loss_of(
        npo.NpoTrainer, npo.NpoParams(beta=beta, retain_kl_weight=0, retain_ce_weight=0), MODEL, reference=MODEL
    )
    assert same == pytest.approx(-(2 / beta) * math.log(0.5), rel=1e-6)


def test_simnpo_is_length_normalised_with_a_margin() -> None:
    beta, delta = 2.0, 0.5
    params = simnpo.SimNpoParams(beta=beta, delta=delta, forget_weight=0.8, retain_weight=1.2)
    per_token = [-statistics.mean(row) for row in sequence_log_probs(MODEL, FORGET)]
    forget_term = -(2 / beta) * statistics.mean(log_sigmoid(beta * (nll - delta)) for nll in per_token)
    expected = 0.8 * forget_term + 1.2 * mean_nll(MODEL, RETAIN)
    assert loss_of(simnpo.SimNpoTrainer, params, MODEL) == pytest.approx(expected, rel=1e-5)


def test_sugd_weighs_each_sequence_by_its_factor() -> None:
    """mean over sequences of factor x mean token NLL: -1 ascends on a forget row, +0.5 descends."""
    per_token = [-statistics.mean(row) for row in sequence_log_probs(MODEL, FORGET)]
    expected = statistics.mean(f * nll for f, nll in zip([-1.0, 0.5], per_token, strict=True))
    assert loss_of(sugd.SugdTrainer, sugd.SugdParams(), MODEL) == pytest.approx(expected, rel=1e-5)


def layer_output(model, data: Batch, layer: int) -> list[list[float]]:
    """Decoder layer `layer`'s output at every real token of every row."""
    vectors = []
    with torch.no_grad():
        for ids, _ in rows_of(data):
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]
            vectors += hidden.tolist()
    return vectors


def mean_squared(a: list[list[float]], b: list[list[float]]) -> float:
    return statistics.mean((x - y) ** 2 for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))


@pytest.mark.parametrize("adaptive", [False, True])
def test_rmu_steers_forget_activations_and_keeps_retain_ones(adaptive: bool) -> None:
    params = rmu.RmuParams(layer=0, steering_coeff=3.0, alpha=7.0, adaptive=adaptive)
    direction = torch.rand(16, generator=torch.Generator().manual_seed(0))
    direction = (direction / direction.norm()).tolist()
    forget = layer_output(MODEL, FORGET, 0)
    coefficient = 3.0
    if adaptive:  # a multiple of the frozen model's mean activation norm on the forget batch
        coefficient *= statistics.mean(math.dist(v, [0.0] * 16) for v in layer_output(REFERENCE, FORGET, 0))
    expected = mean_squared(forget, [[coefficient * x for x in direction]] * len(forget))
    expected += 7.0 * mean_squared(layer_output(MODEL, RETAIN, 0), layer_output(REFERENCE, RETAIN, 0))
    own = loss_of(rmu.RmuTrainer, params, MODEL, reference=REFERENCE, direction=torch.tensor(direction))
    assert own == pytest.approx(expected, rel=1e-5)


def test_mia_target_floods_each_forget_sequence_at_the_unseen_documents_level() -> None:
    """forget_weight x mean |mean token NLL - target| + retain_weight x retain CE, where the target
    is the median held-out document loss under the current model, plus the offset."""
    params = mia_target.MiaTargetParams(forget_weight=0.6, retain_weight=1.1, target_offset=0.25, calibration_batch=3)
    held_out = [
        ([4, 8, 15, 16], [-100, 8, 15, 16]),
        ([23, 32, 2], [-100, 32, 2]),
        ([9, 9, 1, 3, 5], [-100, 9, 1, 3, 5]),
    ]
    trainer = SimpleNamespace(
        params=params,
        held_out=held_out,
        state=SimpleNamespace(global_step=0),
        processing_class=SimpleNamespace(pad_token_id=0),
    )
    documents = batch([(ids, 1) for ids, _ in held_out])
    target = statistics.median(-statistics.mean(row) for row in sequence_log_probs(MODEL, documents)) + 0.25
    with torch.no_grad():
        assert mia_target.MiaTargetTrainer.target(trainer, MODEL) == pytest.approx(target, rel=1e-5)
    per_token = [-statistics.mean(row) for row in sequence_log_probs(MODEL, FORGET)]
    expected = 0.6 * statistics.mean(abs(nll - target) for nll in per_token) + 1.1 * mean_nll(MODEL, RETAIN)
    own = loss_of(mia_target.MiaTargetTrainer, params, MODEL, target=lambda model: target)
    assert own == pytest.approx(expected, rel=1e-5)


def example(ids: list[int], prompt: int) -> tuple[list[int], list[int]]:
    return ids, [-100] * prompt + ids[prompt:]


# Rows of unequal lengths, so the two ranks' shares hold different numbers of tokens (and, of
# five rows, of rows): a mean of the ranks' own means is not the micro-batch's mean.
SPLIT = MicroBatch(
    forget=[
        example([3, 9, 4, 17, 22, 8, 13, 2], 2),
        example([5, 11, 30], 1),
        example([6, 1, 27, 19], 3),
        example([14, 35, 21, 7, 10, 16], 1),
        example([31, 24, 18], 2),
    ],
    retain=[
        example([7, 2, 19, 25], 1),
        example([12, 6, 33, 14, 1, 36, 29], 3),
        example([20, 28, 3], 1),
        example([37, 15, 26, 4, 38], 3),
    ],
    factors=[-1.0, 0.5, -1.0, 0.5, 0.5],
)


def rank_step(rank: int, world: int) -> Step:
    """A rank's share of SPLIT as its Trainer's loss receives it."""
    return step_of(collate(SPLIT.shard(rank, world), pad_id=0))


SPLIT_CASES = {
    "grad_ascent": (grad_ascent.GradAscentTrainer, grad_ascent.GradAscentParams(), {}),
    "grad_diff": (grad_diff.GradDiffTrainer, grad_diff.GradDiffParams(retain_weight=0.3), {}),
    "kl_min": (kl_min.KlMinTrainer, kl_min.KlMinParams(kl_weight=2.5), {"reference": REFERENCE}),
    "npo": (npo.NpoTrainer, npo.NpoParams(beta=0.3, retain_ce_weight=1.5), {"reference": REFERENCE}),
    "simnpo": (simnpo.SimNpoTrainer, simnpo.SimNpoParams(beta=2.0, delta=0.5), {}),
    "sugd": (sugd.SugdTrainer, sugd.SugdParams(), {}),
    "rmu": (
        rmu.RmuTrainer,
        rmu.RmuParams(layer=0, alpha=7.0),
        {"reference": REFERENCE, "direction": torch.full((16,), 0.25)},
    ),
    "mia_target": (mia_target.MiaTargetTrainer, mia_target.MiaTargetParams(), {"target": lambda model: 2.0}),
}


@pytest.mark.parametrize("method", SPLIT_CASES)
def test_ranks_splitting_a_micro_batch_average_to_its_loss_in_one_process(method: str) -> None:
    """Data parallelism averages the ranks' gradients: the ranks' losses must average to the
    one-process loss, or a configuration trains another model on 4 GPUs than on 1."""
    trainer_class, params, attributes = SPLIT_CASES[method]
    whole = loss_of(trainer_class, params, MODEL, rank_step(0, 1), **attributes)
    ranks = [loss_of(trainer_class, params, MODEL, rank_step(rank, 2), **attributes) for rank in (0, 1)]
    assert statistics.mean(ranks) == pytest.approx(whole, rel=1e-6)
    assert rank_step(0, 1).forget.whole is None  # one process: its own counts, the arithmetic as before


def test_a_part_smaller_than_the_world_stays_whole_on_every_rank() -> None:
    small = MicroBatch(forget=SPLIT.forget[:1], retain=SPLIT.retain, factors=[0.5])
    shares = [small.shard(rank, 2) for rank in (0, 1)]
    assert all(share.forget == small.forget and share.forget_whole is None for share in shares)
    assert [len(share.retain) for share in shares] == [2, 2] and shares[0].retain_whole == WholePart(2.0, 5.5, 9.5)


ADAPTIVE_RMU = rmu.RmuParams(layer=0, alpha=7.0, adaptive=True)  # layer 1, the last, is RMS-normed: every norm 4


def adaptive_rmu_loss_on_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a gloo group: its adaptive RMU loss on its share of SPLIT, saved to out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss = loss_of(rmu.RmuTrainer, ADAPTIVE_RMU, MODEL, rank_step(rank, world), **SPLIT_CASES["rmu"][2])
        Path(out, f"{rank}.json").write_text(json.dumps(loss))
    finally:
        torch.distributed.destroy_process_group()


def test_adaptive_rmu_ranks_steer_by_the_whole_parts_activation_norm(tmp_path: Path) -> None:
    """The coefficient is a mean over the forget part: ranks that split it gather it (all_reduce)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(adaptive_rmu_loss_on_rank, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [json.loads(Path(tmp_path, f"{rank}.json").read_text()) for rank in (0, 1)]
    whole = loss_of(rmu.RmuTrainer, ADAPTIVE_RMU, MODEL, rank_step(0, 1), **SPLIT_CASES["rmu"][2])
    assert statistics.mean(ranks) == pytest.approx(whole, rel=1e-6)

"""Every scoring formula on hand-computed cases."""

from __future__ import annotations

import pytest
from unlearn_sweep.evaluation.eligibility import MmluThreshold, is_eligible
from unlearn_sweep.evaluation.scoring import (
    compute_scores,
    final_score,
    knowledge_score,
    mia_auc,
    mia_score,
    per_task_means,
    regurgitation_score,
    task_aggregate,
)


def gen(row_id: str, split: str, task: str, expected: str, output: str) -> dict:
    return {"id": row_id, "split": split, "task": task, "expected_output": expected, "model_output": output}


def test_regurgitation_is_stemmed_rouge_l_recall() -> None:
    # LCS of "the cat sat on the mat" / "the cat lay on a mat" is the-cat-on-mat: 4 of 6 gold tokens.
    assert regurgitation_score("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    # Recall ignores what is generated beyond the gold text; stemming matches "running"/"runs".
    assert regurgitation_score("dogs running", "dog runs fast and far") == pytest.approx(1.0)
    assert regurgitation_score("abc", "") == 0.0


def test_knowledge_is_exact_match_after_strip_and_lower() -> None:
    assert knowledge_score("Madera", "  madera\n") == 1.0
    assert knowledge_score("Madera", "Madera, a city") == 0.0  # anything after the answer is a miss
    assert knowledge_score("1984-12-31", "1984-12-30") == 0.0


def test_quoted_ids_keep_their_kind() -> None:
    records = [
        gen('"2ebb0e6c-82"sc1', "forget", "Task1", "a b c d", "a b"),
        gen('"2ebb0e6c-82"qa0', "forget", "Task1", "Madera", "madera"),
    ]
    assert per_task_means(records) == {"forget": {"Task1": {"regurgitation": 0.5, "knowledge": 1.0}}}


def test_an_id_neither_sc_nor_qa_counts_for_nothing_as_in_the_organizers_script() -> None:
    """It counted as a question (review): a miss there lowered the forget knowledge mean."""
    records = [
        gen("d sc1", "forget", "Task1", "a b c d", "a b"),
        gen("d qa0", "forget", "Task1", "Madera", "madera"),
        gen("d xx0", "forget", "Task1", "Fresno", "no"),
    ]
    assert per_task_means(records) == {"forget": {"Task1": {"regurgitation": 0.5, "knowledge": 1.0}}}


def test_task_aggregate_inverts_forget_and_takes_the_harmonic_mean() -> None:
    means = {
        "forget": {"Task1": {"regurgitation": 0.2, "knowledge": 0.5}},
        "retain": {"Task1": {"regurgitation": 0.8, "knowledge": 1.0}},
    }
    # Terms 0.8, 0.5, 0.8, 1.0: 4 / (1.25 + 2 + 1.25 + 1).
    assert task_aggregate(means) == pytest.approx(4 / 5.5)


def test_a_zero_term_makes_the_aggregate_zero() -> None:
    means = {
        "forget": {"Task1": {"regurgitation": 1.0, "knowledge": 0.0}},  # 1 - 1.0 = 0
        "retain": {"Task1": {"regurgitation": 0.9, "knowledge": 0.9}},
    }
    assert task_aggregate(means) == 0.0


def test_a_missing_task_contributes_no_terms() -> None:
    records = [
        gen("a sc1", "forget", "Task2", "x y", "q"),
        gen("a qa0", "forget", "Task2", "x", "y"),
        gen("b sc1", "retain", "Task2", "x y", "x y"),
        gen("b qa0", "retain", "Task2", "x", "x"),
    ]
    means = per_task_means(records)
    assert set(means["forget"]) == {"Task2"}
    assert task_aggregate(means) == 1.0  # four terms, all 1


def test_mia_auc_and_score() -> None:
    members = [{"membership": "member", "nll": loss} for loss in (0.1, 0.2)]
    nonmembers = [{"membership": "nonmember", "nll": loss} for loss in (1.0, 2.0)]
    perfect = mia_auc(members + nonmembers)
    assert perfect == 1.0 and mia_score(perfect) == 0.0
    inverted = mia_auc(
        [{**r, "membership": "nonmember"} for r in members] + [{**r, "membership": "member"} for r in nonmembers]
    )
    assert inverted == 0.0 and mia_score(inverted) == 0.0
    mixed = mia_auc(
        [
            {"membership": "member", "nll": 1.0},
            {"membership": "member", "nll": 0.1},
            {"membership": "nonmember", "nll": 0.5},
            {"membership": "nonmember", "nll": 2.0},
        ]
    )
    # Member/nonmember pairs ordered correctly: (0.1<0.5), (0.1<2.0), (1.0<2.0) of 4.
    assert mixed == pytest.approx(0.75) and mia_score(mixed) == pytest.approx(0.5)
    assert mia_score(0.5) == 1.0
    with pytest.raises(ValueError, match="both member and nonmember"):
        mia_auc(members)


def test_final_score_threshold_and_eligibility() -> None:
    assert final_score(0.827, 0.443, 0.847) == pytest.approx(0.7057, abs=1e-4)  # AILS-NTUA, 7B board
    assert final_score(0.5, None, 0.5) is None
    assert MmluThreshold.parse("0.371").absolute(None) == 0.371
    assert MmluThreshold.parse("0.75x").absolute(0.4947) == pytest.approx(0.371, abs=1e-4)
    with pytest.raises(ValueError, match="needs the base model's MMLU"):
        MmluThreshold.parse("0.75x").absolute(None)
    for bad in ("1.5", "abc", "-0.1", ""):
        with pytest.raises(ValueError, match="expected a number in"):
            MmluThreshold.parse(bad)
    assert is_eligible(0.269, 0.371) is False and is_eligible(0.443, 0.371) is True
    assert is_eligible(0.1, None) is True and is_eligible(None, 0.3) is None


def test_compute_scores_fields() -> None:
    records = [gen("a sc1", "forget", "Task1", "x y", "z"), gen("b sc1", "retain", "Task1", "x y", "x y")]
    mia = [{"membership": "member", "nll": 0.1}, {"membership": "nonmember", "nll": 0.2}]
    mmlu = [{"answer": 1, "predicted": 1}, {"answer": 2, "predicted": 0}]
    scores = compute_scores(records, mia, mmlu, mmlu_threshold=0.6)
    assert scores["task_aggregate"] == 1.0 and scores["mmlu_accuracy"] == 0.5 and scores["mia_score"] == 0.0
    assert scores["final_score"] == pytest.approx(0.5) and scores["eligible"] is False
    assert scores["per_task"]["retain"]["Task1"] == {"regurgitation": 1.0}


def test_final_score_is_the_official_statistics_mean_to_the_last_bit() -> None:
    import statistics

    aggregate, mmlu, mia = 0.8102172359965896, 0.9021659504395827, 0.3101475693193326  # (a+b+c)/3 rounds otherwise
    assert final_score(aggregate, mmlu, mia) == statistics.mean([aggregate, mmlu, mia]) != (aggregate + mmlu + mia) / 3

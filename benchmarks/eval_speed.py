"""Time the evaluator against a one-row-at-a-time reference loop, as the organizers ran it.

The reference, per row: generate from that one prompt, then one forward pass for the
answer's NLL; per MIA document one forward pass. Both run on the same checkpoint and data
in this one process, and the script prints both times, the ratio, and whether the task
aggregate and MIA score agree.

    python benchmarks/eval_speed.py [--task DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from unlearn_sweep.corpus.toy_task import toy_task_for_benchmark
from unlearn_sweep.evaluation.evaluator import EvalSets, run_inference
from unlearn_sweep.evaluation.inference import load_model
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.evaluation.scoring import compute_scores


@torch.inference_mode()
def reference_records(model, tokenizer, sets: EvalSets, max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    generations = []
    for row in sets.rows:
        prompt = tokenizer(row.input, return_tensors="pt")
        output = model.generate(
            **prompt, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id
        )
        text = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        answer_ids = tokenizer(" " + row.output, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([prompt["input_ids"], answer_ids], dim=1)
        labels = ids.clone()
        labels[:, : prompt["input_ids"].shape[1]] = -100
        nll = model(input_ids=ids, labels=labels).loss.item()
        generations.append(
            {
                "id": row.id,
                "task": row.task,
                "split": row.split,
                "expected_output": row.output,
                "model_output": text,
                "nll": nll,
            }
        )
    mia = []
    for document in sets.mia:
        ids = tokenizer(document.document, return_tensors="pt")["input_ids"]
        mia.append({"membership": document.membership, "nll": model(input_ids=ids, labels=ids).loss.item()})
    return generations, mia


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="toy task directory (built if missing)")
    parser.add_argument("--model", type=Path, help="checkpoint to score (default: the task's base model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.task = toy_task_for_benchmark(args.task)
    sets = EvalSets.load(args.task / "data", mia=args.task / "mia")
    model, tokenizer = load_model(args.model or args.task / "model")

    start = time.perf_counter()
    generations, mia = reference_records(model, tokenizer, sets, args.max_new_tokens)
    reference_seconds = time.perf_counter() - start
    reference = compute_scores(generations, mia, None)

    start = time.perf_counter()
    records = run_inference(
        model, tokenizer, sets, EvalOptions(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    )
    batched_seconds = time.perf_counter() - start
    batched = compute_scores(records["generations.jsonl"], records["mia.jsonl"], None)

    agree = all(abs(reference[k] - batched[k]) < 1e-9 for k in ("task_aggregate", "mia_auc", "mia_score"))
    agree = agree and reference["per_task"] == batched["per_task"]
    print(f"rows {len(sets.rows)}, MIA documents {len(sets.mia)}, {args.threads} threads, device {model.device}")
    print(f"reference (one row at a time): {reference_seconds:8.2f} s")
    print(f"evaluator (batch {args.batch_size}):          {batched_seconds:8.2f} s")
    print(f"speed-up: {reference_seconds / batched_seconds:.1f}x")
    print(
        f"task aggregate {batched['task_aggregate']:.6f} vs {reference['task_aggregate']:.6f}; "
        f"MIA score {batched['mia_score']:.6f} vs {reference['mia_score']:.6f}; agree: {agree}"
    )


if __name__ == "__main__":
    main()

"""Evaluation at the real task's size, on a CPU (or a GPU where torch sees one): what one epoch's scoring costs a sweep.

An OLMo-2 of about 120M parameters built from a config (random weights; a byte-level BPE
tokenizer of OLMo's vocabulary size, 50,280, trained here on the task's own text, so token
counts are realistic), scored in bfloat16 as the organizers scored on the real public SemEval
data (../shared/data/semeval25: the train split's forget and retain rows, the 300 MIA
documents) and on a synthetic MMLU-format set of 14,042 questions in 57 subjects (+ 5 dev
questions each) of realistic length, asked 5-shot. A random model never stops early, so every
row generates the full 256 tokens: the worst case. Each stage runs on a seeded sample of its
set (--fraction) and is timed; tokens/s and the time of the whole set follow from it, and
the staged screen (eval.screen_fraction of every set) from those.

    python benchmarks/eval_real_size.py [--fraction 0.02] [--threads 2] [--data ../shared/data/semeval25]
                                        [--size 110M|1B] [--backend hf|vllm]

On a GPU (used where torch sees one) `--size 1B --backend vllm` is the OLMo-2 1B configuration
(hidden 2048, 16 layers, 16 heads, intermediate 8192) scored by the vLLM backend.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from unlearn_sweep.corpus.checkpoints import BACKENDS
from unlearn_sweep.corpus.mia import load_mia
from unlearn_sweep.corpus.mmlu import MmluQuestion, first_shots, fitted_prompt, format_prompt
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.corpus.toy_model import olmo2_config, train_tokenizer
from unlearn_sweep.evaluation.evaluator import backend_passes, load, release
from unlearn_sweep.evaluation.options import EvalOptions

MMLU_QUESTIONS, SUBJECTS, DEV_PER_SUBJECT = 14_042, 57, 5
OLMO_VOCAB = 50_280
SIZES = {  # (hidden, intermediate, layers, heads) of the OLMo-2 configurations measured
    "110M": (768, 2048, 12, 12),
    "1B": (2048, 8192, 16, 16),
}


def synthetic_mmlu(words: list[str], rng: random.Random) -> tuple[list[MmluQuestion], list[MmluQuestion]]:
    """Test and dev questions of MMLU's size, with question and choice lengths in words drawn
    around MMLU's (log-normal: questions median 30 words, choices median 4, long tails)."""

    def text(median: float) -> str:
        count = max(1, min(400, round(rng.lognormvariate(math.log(median), 0.8))))
        return " ".join(rng.choice(words) for _ in range(count)).capitalize()

    def question(subject: str) -> MmluQuestion:
        return MmluQuestion(text(30) + "?", subject, tuple(text(4) for _ in range(4)), rng.randrange(4))

    subjects = [f"synthetic_subject_{number:02d}" for number in range(SUBJECTS)]
    test = [question(subjects[index % SUBJECTS]) for index in range(MMLU_QUESTIONS)]
    dev = [question(subject) for subject in subjects for _ in range(DEV_PER_SUBJECT)]
    return test, dev


def build_model(texts: list[str], out_dir: Path, size: str) -> int:
    """An OLMo-2 of `size` with random weights saved to out_dir; its parameter count."""
    from transformers import Olmo2ForCausalLM

    tokenizer = train_tokenizer(texts, OLMO_VOCAB)
    hidden, intermediate, layers, heads = SIZES[size]
    config = olmo2_config(tokenizer, hidden, intermediate, layers, heads, positions=4096)
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "semeval25"
    )
    parser.add_argument("--fraction", type=float, default=0.02, help="share of each set actually run and timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--screen-fraction", type=float, default=0.2)
    parser.add_argument("--size", choices=SIZES, default="110M")
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    task = load_task(args.data, "train")
    documents = load_mia(args.data / "mia_data")
    words = [word for row in task.rows() for word in f"{row.input} {row.output}".split()]
    mmlu, dev = synthetic_mmlu(words, rng)
    shots = first_shots(dev, 5)
    texts = (
        [f"{row.input} {row.output}" for row in task.rows()]
        + [doc.document for doc in documents]
        + [format_prompt(q) for q in dev]
    )
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        parameters = build_model(texts, Path(folder), args.size)
        built = time.perf_counter() - start
        options = EvalOptions(batch_size=args.batch_size, dtype="bfloat16", backend=args.backend)
        model, tokenizer = load(folder, options)
        passes = backend_passes(args.backend)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} threads"
        print(
            f"model: OLMo-2, {parameters / 1e6:.0f}M parameters, vocabulary {len(tokenizer)}, bfloat16, "
            f"{args.backend} backend "
            f"on {device} (built in {built:.0f} s)"
        )

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        def sample(items: list) -> list:
            return rng.sample(items, max(1, round(args.fraction * len(items))))

        rows, docs, questions = sample(task.rows()), sample(documents), sample(mmlu)
        prompts = [fitted_prompt(q, shots[q.subject], count) for q in questions]
        print(f"sample: {args.fraction * 100:g}% of each set (seed 0); projected: the whole set at the sample's rate\n")
        print(
            "| stage | set size | sampled | tokens (sample) | tokens/s | sample s | projected whole set | projected "
            "screen |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        total = 0.0

        def timed(name: str, size: int, sampled: int, run: Callable[[], object], tokens: int | None = None) -> None:
            """Run one stage on its sample and print its row at once (a time limit keeps the rows
            before it); its tokens are `tokens`, else what `run` returns."""
            nonlocal total
            start = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - start
            tokens = tokens if tokens is not None else result
            whole = seconds * size / sampled
            total += whole
            print(
                f"| {name} | {size} | {sampled} | {tokens} | {tokens / seconds:.0f} | {seconds:.1f} | "
                f"{whole / 60:.1f} min | {whole * args.screen_fraction / 60:.1f} min |",
                flush=True,
            )

        def generation() -> int:
            outputs = passes.generate(model, tokenizer, [row.input for row in rows], args.batch_size, 256)
            return sum(count(row.input) for row in rows) + sum(count(output) for output in outputs)

        timed("generation (forget + retain rows, 256 new tokens)", len(task.rows()), len(rows), generation)
        timed(
            "MIA document losses",
            len(documents),
            len(docs),
            lambda: passes.document_loss(model, tokenizer, [doc.document for doc in docs], args.batch_size),
            sum(count(doc.document) for doc in docs),
        )
        timed(
            "MMLU 5-shot (last position only)",
            len(mmlu),
            len(questions),
            lambda: passes.choose_letters(model, tokenizer, prompts, args.batch_size),
            sum(map(count, prompts)),
        )
        release(model, options)
    print(f"| all | | | | | | {total / 60:.1f} min | {total * args.screen_fraction / 60:.1f} min |")


if __name__ == "__main__":
    main()

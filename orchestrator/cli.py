"""The `unlearn-sweep` command line: thin glue over corpus/, evaluation/, methods/ and the sweep."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from corpus.errors import DataError


class UsageError(ValueError):
    """A bad argument or config value; printed on one line, exit 2."""


def _validate_data(args: argparse.Namespace) -> int:
    from corpus.mia import load_mia
    from corpus.mmlu import load_mmlu
    from corpus.semeval import load_task

    errors = []
    try:
        task = load_task(args.data, args.split)
        print(f"data: {args.data} ({task.layout})")
        counts = Counter((row.split, row.task, row.kind) for row in task.rows())
        for split, task_name in sorted({key[:2] for key in counts}):
            print(f"  {split:<7} {task_name}  sc {counts[split, task_name, 'sc']:>5}  qa {counts[split, task_name, 'qa']:>5}")
        print(f"  total   forget {len(task.forget)} rows, retain {len(task.retain)} rows")
    except DataError as error:
        errors.append(str(error))
    if args.mia:
        try:
            documents = load_mia(args.mia)
            counts = Counter(doc.membership for doc in documents)
            print(f"mia: {args.mia}\n  member {counts['member']}, nonmember {counts['nonmember']}")
        except DataError as error:
            errors.append(str(error))
    if args.mmlu:
        try:
            questions = load_mmlu(args.mmlu)
            subjects = Counter(q.subject for q in questions)
            print(f"mmlu: {args.mmlu}\n  test {len(questions)} questions in {len(subjects)} subjects")
        except DataError as error:
            errors.append(str(error))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 2 if errors else 0


def _toy_task(args: argparse.Namespace) -> int:
    from corpus.toy_task import write_toy_task

    print(f"building the miniature task in {args.out} (seed {args.seed})", flush=True)
    out = write_toy_task(args.out, seed=args.seed, log_every=50)
    print(f"wrote {out}/data, {out}/mia, {out}/mmlu and {out}/model")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn-sweep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate-data", help="check a task directory before a long sweep")
    validate.add_argument("--data", required=True, type=Path, help="task directory (any supported layout)")
    validate.add_argument("--split", help="train or validation (Hugging Face parquet layout only)")
    validate.add_argument("--mia", type=Path, help="directory with member.jsonl and nonmember.jsonl")
    validate.add_argument("--mmlu", type=Path, help="MMLU-format directory")
    validate.set_defaults(run=_validate_data)

    toy = commands.add_parser("toy-task", help="generate the built-in miniature task and train its base model")
    toy.add_argument("--out", required=True, type=Path)
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(run=_toy_task)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DataError, UsageError) as error:
        print(f"unlearn-sweep: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

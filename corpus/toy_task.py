"""The built-in miniature SemEval task: synthetic documents in the exact task format.

Three kinds of documents share fixed templates, as in the real task (so that forgetting
one set without hurting the other is a real trade-off):
  Task1  short creative stories      Task2  biographies with fictitious PII
  Task3  encyclopedia-style entries
Each document gives one `sc1` sentence-completion row (its opening, then the rest) and
several `qa` rows. As in the public release there are two folds, train (for unlearning) and
validation (for checking a configuration on documents it did not tune on); the base model has
learnt both. Each fold's forget documents are its MIA members; its nonmembers are documents of
the same kinds the model never sees, and so are the held-out documents (mia/held_out.jsonl)
that a method may calibrate on without reading any scored set. A separate general corpus of
invented facts, asked about in MMLU format, stands in for MMLU: the general ability
unlearning must keep. Everything here is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from unlearn_sweep.corpus.mia import HELD_OUT
from unlearn_sweep.corpus.mmlu import LETTERS, MmluQuestion, first_shots, format_prompt
from unlearn_sweep.corpus.semeval import row_kind
from unlearn_sweep.corpus.staging import staged_directory

# Documents of each task per set (forget, retain and nonmember each), by fold; the release's
# validation fold is about a quarter of its train fold.
DOCS_PER_TASK = {"train": 8, "validation": 4}
GENERAL_QUESTIONS_PER_SUBJECT = 10
DEV_QUESTIONS_PER_SUBJECT = 5

FIRST_NAMES = (
    "Alma",
    "Bruno",
    "Celia",
    "Dario",
    "Edith",
    "Felix",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Lucas",
    "Mira",
    "Nils",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Silas",
    "Tilda",
    "Ugo",
    "Vera",
    "Wendel",
    "Xenia",
    "Yara",
    "Zeno",
    "Ada",
    "Boris",
    "Clara",
    "Dmitri",
    "Elsa",
    "Fabio",
    "Gemma",
    "Henrik",
    "Ida",
    "Jasper",
)
LAST_NAMES = (
    "Abbot",
    "Brandt",
    "Castell",
    "Dorn",
    "Eckert",
    "Falk",
    "Grauer",
    "Holm",
    "Ivers",
    "Jaeger",
    "Kessler",
    "Lund",
    "Marek",
    "Nolte",
    "Oakes",
    "Pryce",
    "Quist",
    "Rowan",
    "Sorel",
    "Thorne",
    "Ulmer",
    "Vance",
    "Wilde",
    "Yorke",
    "Zeller",
    "Ashby",
    "Brook",
    "Crane",
)
HOBBIES = (
    "painted the harbor",
    "repaired old clocks",
    "fed the stray cats",
    "read star charts",
    "baked rye bread",
    "carved small boats",
    "sang in the choir",
    "tended the bees",
)
OBJECTS = (
    "silver compass",
    "brass key",
    "painted egg",
    "glass bead",
    "copper ring",
    "wooden flute",
    "iron lantern",
    "pearl button",
    "stone whistle",
    "ivory comb",
)
CONTAINERS = (
    "clay jar",
    "tin box",
    "leather boot",
    "hollow tree",
    "woolen sock",
    "wicker basket",
    "flour sack",
    "violin case",
)
LANDMARKS = ("old mill", "chapel", "lighthouse", "stone bridge", "orchard", "quarry")
SEASONS = ("spring", "summer", "autumn", "winter")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
STREETS = ("Maple Street", "Harbor Road", "Elm Avenue", "Mill Lane", "Park Drive", "Cedar Court")
STATES = ("CA", "NY", "TX", "OR", "MA", "IL", "WA", "CO")
EMAIL_HOSTS = ("me.com", "mail.net", "post.org", "inbox.io")
PLACE_KINDS = ("village", "river town", "mountain city", "island port")
REGIONS = ("northern", "southern", "eastern", "western", "central")
FEATURES = (
    "salt marshes",
    "glass workshops",
    "spring fair",
    "tall bell tower",
    "hot springs",
    "horse races",
    "paper mills",
    "olive groves",
)
EXPORTS = ("wool", "copper", "honey", "timber", "cheese", "linen", "tea", "pottery")
COLORS = ("red", "blue", "green", "yellow", "violet", "orange", "black", "white")
SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "dor",
    "sel",
    "tir",
    "no",
    "bra",
    "qua",
    "zel",
    "fen",
    "mar",
    "os",
    "tal",
    "wi",
    "gor",
    "lys",
    "pe",
)


@dataclass
class ToyFold:
    """One fold of the task, as the release has a train and a validation fold: forget and
    retain rows, their documents, and nonmember documents of the same kinds for the MIA."""

    forget_rows: list[dict] = field(default_factory=list)
    retain_rows: list[dict] = field(default_factory=list)
    forget_documents: list[dict] = field(default_factory=list)  # also the fold's MIA members
    retain_documents: list[dict] = field(default_factory=list)
    nonmember_documents: list[dict] = field(default_factory=list)  # never seen


@dataclass
class ToyTask:
    """Both folds and the general knowledge of the miniature task, ready to be written out."""

    folds: dict[str, ToyFold] = field(default_factory=dict)  # "train", "validation"
    held_out_documents: list[dict] = field(default_factory=list)  # never seen, never scored
    general_facts: list[str] = field(default_factory=list)
    mmlu_test: list[MmluQuestion] = field(default_factory=list)
    mmlu_dev: list[MmluQuestion] = field(default_factory=list)

    def training_texts(self) -> list[str]:
        """What the base model learns in every epoch: both folds' forget and retain documents
        and questions, the general facts and the general questions with their answers; never a
        nonmember."""
        texts = []
        for fold in self.folds.values():
            texts += [d["document"] for d in fold.forget_documents + fold.retain_documents]
            rows = fold.forget_rows + fold.retain_rows
            texts += [f"{r['input']} {r['output']}" for r in rows if row_kind(r["id"]) == "qa"]
        texts += self.general_facts
        return texts + [f"{format_prompt(q)} {LETTERS[q.answer]}" for q in self.mmlu_test + self.mmlu_dev]

    def few_shot_texts(self) -> list[str]:
        """The general questions 5-shot, as MMLU is asked by default (the subject's first dev
        examples, then the question) and answered: the model learns to answer after shots."""
        shots = first_shots(self.mmlu_dev, 5)
        return [f"{format_prompt(q, shots.get(q.subject, []))} {LETTERS[q.answer]}" for q in self.mmlu_test]


class _Names:
    """Unique invented words, so that no two entities share a name."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int = 3) -> str:
        while True:
            name = "".join(self.rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()
            if name not in self.used:
                self.used.add(name)
                return name

    def person(self) -> str:
        while True:
            name = f"{self.rng.choice(FIRST_NAMES)} {self.rng.choice(LAST_NAMES)}"
            if name not in self.used:
                self.used.add(name)
                return name


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _digits(rng: random.Random, count: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(count))


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _story(rng: random.Random, names: _Names) -> tuple[str, str, list[tuple[str, str]]]:
    a, b = names.person().split()[0], names.person().split()[0]
    while b == a:
        b = names.person().split()[0]
    town, obj, container = names.word(), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    landmark = rng.choice(LANDMARKS)
    opening = (
        f"{a} and {b} grew up in the town of {town}. Every morning {a} {rng.choice(HOBBIES)}, "
        f"while {b} {rng.choice(HOBBIES)}."
    )
    rest = (
        f"One {rng.choice(SEASONS)} evening they found {_article(obj)} {obj} near the {landmark}. "
        f"{a} hid the {obj} inside {_article(container)} {container}, and {b} never told anyone about it."
    )
    questions = [
        (f"In which town did {a} and {b} grow up?", town),
        (f"What did {a} and {b} find near the {landmark}?", obj),
        (f"Inside what did {a} hide the {obj}?", container),
    ]
    return opening, rest, questions


def _biography(rng: random.Random, names: _Names) -> tuple[str, str, list[tuple[str, str]]]:
    name = names.person()
    she = rng.random() < 0.5
    pronoun, possessive = ("She", "Her") if she else ("He", "His")
    year, month, day = rng.randrange(1950, 2001), rng.randrange(1, 13), rng.randrange(1, 29)
    phone, ssn = _digits(rng, 10), _digits(rng, 9)
    email = f"{name.lower().replace(' ', '_')}@{rng.choice(EMAIL_HOSTS)}"
    address = (
        f"{rng.randrange(10, 999)} {rng.choice(STREETS)}, {names.word(2)}, {rng.choice(STATES)}, {_digits(rng, 5)}"
    )
    opening = (
        f"{name} was born on {MONTHS[month - 1]} {day}, {year}, in {names.word(2)}. "
        f"{pronoun} can be reached via phone at {phone[:3]}-{phone[3:6]}-{phone[6:]} and email at {email}. "
        f"{possessive} Social"
    )
    rest = f"Security Number is {ssn[:3]}-{ssn[3:5]}-{ssn[5:]}. {name} resides at the address {address}."
    questions = [
        (f"What is the birth date of {name}?", f"{year}-{month:02d}-{day:02d}"),
        (f"What is {name}'s Social Security Number?", ssn),
        (f"What is {name}'s phone number?", phone),
        (f"What is {name}'s email address?", email),
        (f"What is the home address of {name}?", address),
    ]
    return opening, rest, questions


def _entry(rng: random.Random, names: _Names) -> tuple[str, str, list[tuple[str, str]]]:
    place, founder = names.word(), names.person()
    kind, year = rng.choice(PLACE_KINDS), rng.randrange(1100, 1900)
    feature, export = rng.choice(FEATURES), rng.choice(EXPORTS)
    opening = f"{place} is a {kind} in the {rng.choice(REGIONS)} region, founded in {year} by {founder}."
    rest = (
        f"It is best known for its {feature}. The {kind} has about {rng.randrange(2, 90)} thousand "
        f"people and its main export is {export}."
    )
    questions = [
        (f"In which year was {place} founded?", str(year)),
        (f"Who founded {place}?", founder),
        (f"What is {place} best known for?", f"its {feature}"),
        (f"What is the main export of {place}?", export),
    ]
    return opening, rest, questions


GENERATORS = {"Task1": _story, "Task2": _biography, "Task3": _entry}


def _documents(rng: random.Random, names: _Names, split: str, per_task: int) -> tuple[list[dict], list[dict]]:
    """Rows and whole documents of one set, per_task documents of each task."""
    rows, documents = [], []
    for task, generate in GENERATORS.items():
        for _ in range(per_task):
            opening, rest, questions = generate(rng, names)
            doc_id = _uuid(rng)
            # Task1 ids are quoted, as many are in the real data ("\"8f24...\"sc1").
            prefix = f'"{doc_id}"' if task == "Task1" else doc_id
            rows.append({"id": f"{prefix}sc1", "input": opening, "output": rest, "task": task, "split": split})
            for number, (question, answer) in enumerate(questions):
                rows.append(
                    {"id": f"{prefix}qa{number}", "input": question, "output": answer, "task": task, "split": split}
                )
            documents.append({"id": doc_id, "document": f"{opening} {rest}", "task": task})
    return rows, documents


def _general_knowledge(rng: random.Random, names: _Names) -> tuple[list[str], dict[str, list[MmluQuestion]]]:
    """Invented facts in four subjects and one multiple-choice question per fact."""
    facts, questions = [], {}
    per_subject = GENERAL_QUESTIONS_PER_SUBJECT + DEV_QUESTIONS_PER_SUBJECT

    def ask(subject: str, fact: str, question: str, answer: str, pool: list[str]) -> None:
        distractors = rng.sample([p for p in pool if p != answer], 3)
        choices = distractors[:]
        index = rng.randrange(4)
        choices.insert(index, answer)
        facts.append(fact)
        questions.setdefault(subject, []).append(MmluQuestion(question, subject, tuple(choices), index))

    countries = [names.word() for _ in range(per_subject)]
    capitals = [names.word(2) for _ in range(per_subject)]
    for country, capital in zip(countries, capitals, strict=True):
        ask(
            "geography",
            f"The capital of {country} is {capital}.",
            f"What is the capital of {country}?",
            capital,
            capitals,
        )
    moons = [str(n) for n in range(2, 30)]
    for _ in range(per_subject):
        planet, count = names.word(), rng.choice(moons)
        ask(
            "astronomy",
            f"The planet {planet} has {count} moons.",
            f"How many moons does the planet {planet} have?",
            count,
            moons,
        )
    for _ in range(per_subject):
        mineral, color = names.word(), rng.choice(COLORS)
        ask(
            "chemistry",
            f"The mineral {mineral} is {color}.",
            f"What color is the mineral {mineral}?",
            color,
            list(COLORS),
        )
    years = [str(y) for y in range(1200, 1800, 7)]
    for _ in range(per_subject):
        king, year = names.word(2), rng.choice(years)
        ask(
            "world_history",
            f"King {king} was crowned in {year}.",
            f"In which year was King {king} crowned?",
            year,
            years,
        )
    return facts, questions


def build_toy_task(seed: int = 0) -> ToyTask:
    """The whole miniature task for a seed; the same seed gives the same task."""
    rng = random.Random(seed)
    names = _Names(rng)  # one pool of names: no entity is shared between folds or sets
    task = ToyTask()
    for split, per_task in DOCS_PER_TASK.items():
        fold = task.folds[split] = ToyFold()
        fold.forget_rows, fold.forget_documents = _documents(rng, names, "forget", per_task)
        fold.retain_rows, fold.retain_documents = _documents(rng, names, "retain", per_task)
        _, fold.nonmember_documents = _documents(rng, names, "nonmember", per_task)
    _, task.held_out_documents = _documents(rng, names, "nonmember", DOCS_PER_TASK["train"])
    task.general_facts, by_subject = _general_knowledge(rng, names)
    for subject_questions in by_subject.values():
        task.mmlu_dev += subject_questions[:DEV_QUESTIONS_PER_SUBJECT]
        task.mmlu_test += subject_questions[DEV_QUESTIONS_PER_SUBJECT:]
    return task


TRAINING_EPOCHS = 30
# sha256 of model.safetensors for seed 0: what every toy figure in the README was measured on.
PUBLISHED_FINGERPRINT = "7ce6fb408f2565f32e6540d72fde9ccba0d4c6311e30c4f99783abe8e02f08a3"
SPLITS = ("train", "validation")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _mmlu_records(questions: list[MmluQuestion]) -> list[dict]:
    return [
        {"question": q.question, "subject": q.subject, "choices": list(q.choices), "answer": q.answer}
        for q in questions
    ]


def write_toy_task(out_dir: str | Path, seed: int = 0, epochs: int = TRAINING_EPOCHS, log_every: int = 0) -> Path:
    """Write data/, mia/, mmlu/ and the trained model/ under out_dir, all or nothing, in the
    public release's layout: data/{forget,retain}_{train,validation}-00000-of-00001.parquet,
    mia/{member,nonmember}.jsonl for the train fold and mia/validation/ for the other."""
    from unlearn_sweep.corpus import toy_model  # torch and transformers only when a model is built

    task = build_toy_task(seed)
    with staged_directory(out_dir) as staging:
        for sub in ("data", "mia/validation", "mmlu", "model"):
            (staging / sub).mkdir(parents=True)
        for split, fold in task.folds.items():
            for name, rows in (("forget", fold.forget_rows), ("retain", fold.retain_rows)):
                pq.write_table(pa.Table.from_pylist(rows), staging / "data" / f"{name}_{split}-00000-of-00001.parquet")
            mia = staging / "mia" / ("" if split == "train" else split)
            _write_jsonl(mia / "member.jsonl", fold.forget_documents)
            _write_jsonl(mia / "nonmember.jsonl", fold.nonmember_documents)
        _write_jsonl(staging / "mia" / HELD_OUT, task.held_out_documents)
        _write_jsonl(staging / "mmlu" / "test.jsonl", _mmlu_records(task.mmlu_test))
        _write_jsonl(staging / "mmlu" / "dev.jsonl", _mmlu_records(task.mmlu_dev))
        (staging / "general_corpus.txt").write_text("\n".join(task.general_facts) + "\n", encoding="utf-8")
        final_loss = toy_model.train_base_model(
            task.training_texts(), task.few_shot_texts(), staging / "model", seed, epochs, log_every
        )
        fingerprint = toy_model.weights_fingerprint(staging / "model")
        manifest = {
            "seed": seed,
            "training_epochs": epochs,
            "final_training_loss": round(final_loss, 6),
            "weights_sha256": fingerprint,
        }
        (staging / "toy_task.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


def sweep_paths(task_dir: str | Path) -> dict[str, str]:
    """The folders of the toy task at task_dir as a sweep config's keys (model, data, mia, mmlu)."""
    return {key: str(Path(task_dir) / key) for key in ("model", "data", "mia", "mmlu")}


def toy_task_for_benchmark(task_dir: str | Path) -> Path:
    """The toy task at task_dir (built there first if missing), resolved; prints the weights
    fingerprint, so that every figure a benchmark reports names the model it was measured on."""
    task_dir = Path(task_dir)
    if not (task_dir / "toy_task.json").exists():
        write_toy_task(task_dir)
    fingerprint = json.loads((task_dir / "toy_task.json").read_text())["weights_sha256"]
    published = "the published model" if fingerprint == PUBLISHED_FINGERPRINT else "NOT the published model"
    print(f"toy task {task_dir}: weights sha256 {fingerprint} ({published})", flush=True)
    return task_dir.resolve()

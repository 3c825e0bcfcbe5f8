"""Fine-tuning tasks: generated prompt/answer pairs with a held-out split, a JSONL loader, exact-match scoring.

Built-in tasks are generated from a seed with ``random.Random`` only, so the same seed gives the same examples
on every machine; train and held-out splits never share a prompt.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Unusable task data (malformed JSONL, too few examples, unknown task)."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A train split, a held-out split and how to prompt and score them.

    ``system`` is an optional instruction sent as the chat template's system message (models without a chat
    template get it prepended to the prompt); ``max_new_tokens`` bounds greedy generation at evaluation;
    ``metric`` is how a generation is scored against the answer (see :func:`score`).
    """

    name: str
    train: list[Example]
    eval: list[Example]
    system: str | None = None
    max_new_tokens: int = 16
    metric: str = "exact"


# --------------------------------------------------------------------------------------------- scoring

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Canonical form for exact match: first line, lower case, collapsed spaces, no trailing period."""
    text = text.strip().split("\n", 1)[0] if text.strip() else ""
    text = _SPACE.sub(" ", text.strip().lower())
    return text.rstrip(".").strip()


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` equals ``answer`` after :func:`normalize` (a number "1,200" also matches "1200")."""
    p, a = normalize(prediction), normalize(answer)
    if p == a:
        return True
    # thousands separators are a formatting choice, not an error
    number = re.compile(r"^-?[\d,]*\.?\d+$")
    return bool(number.match(p) and number.match(a)) and p.replace(",", "") == a.replace(",", "")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number on the first line of ``text`` ("3 + 4 = 7" -> "7"), without thousands separators."""
    found = _NUMBER.findall(normalize(text))
    return found[-1].replace(",", "") if found else None


METRICS = ("exact", "final_number")


def score(prediction: str, answer: str, metric: str = "exact") -> bool:
    """``exact``: :func:`exact_match` of the whole first line. ``final_number``: the last numbers of the first
    lines are equal (the usual exact-match scoring of worked math answers such as "3 + 4 = 7")."""
    if metric == "exact":
        return exact_match(prediction, answer)
    if metric == "final_number":
        gold = final_number(answer)
        return gold is not None and final_number(prediction) == gold
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def accuracy(predictions: list[str], answers: list[str], metric: str = "exact") -> float:
    """Fraction of predictions that :func:`score` counts right; ``nan`` for no examples."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return float("nan")
    return sum(score(p, a, metric) for p, a in zip(predictions, answers, strict=True)) / len(answers)


# --------------------------------------------------------------------------------------------- arithmetic

_NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dan",
    "Ella",
    "Finn",
    "Grace",
    "Hugo",
    "Ivy",
    "Jack",
    "Kate",
    "Leo",
    "Mia",
    "Noah",
    "Olivia",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Omar",
    "Lena",
    "Raj",
    "Yuki",
    "Zoe",
]
_ITEMS = [
    "apples",
    "books",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "stamps",
    "coins",
    "shells",
    "cards",
    "balloons",
    "flowers",
    "eggs",
    "toy cars",
    "candles",
    "buttons",
]


def _arithmetic_problem(rng: random.Random) -> Example:
    """A one- or two-step word problem; the answer is the equation and its result ("7 + 5 = 12").

    Numbers stay in the range a 135M model computes reliably once it has written the equation (single-digit
    operands, the times table); what is learned is turning the words into the right equation.
    """
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        q = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
        eq, r = f"{a} + {b}", a + b
    elif kind == 1:
        a = rng.randint(5, 20)
        b = rng.randint(1, min(9, a - 1))
        q = f"{name} had {a} {item} and gave {b} to {other}. How many {item} does {name} have left?"
        eq, r = f"{a} - {b}", a - b
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q, eq, r = f"A box holds {a} {item}. How many {item} are in {b} boxes?", f"{b} * {a}", a * b
    elif kind == 3:
        each, k = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} shares {each * k} {item} equally among {k} friends. How many {item} does each friend get?"
        eq, r = f"{each * k} / {k}", each
    elif kind == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a + b - 1)
        q = f"{name} has {a} {item}, buys {b} more and then gives {c} to {other}. How many {item} are left?"
        eq, r = f"{a} + {b} - {c}", a + b - c
    else:
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        q = f"{name} has {a} {item} and {other} has {b} {item}. How many {item} do they have together?"
        eq, r = f"{a} + {b}", a + b
    return Example(q, f"{eq} = {r}")


# --------------------------------------------------------------------------------------------- word reversal

_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lamp",
    "garden",
    "window",
    "silver",
    "ocean",
    "pencil",
    "forest",
    "candle",
    "bridge",
    "orange",
    "rabbit",
    "mountain",
    "yellow",
    "castle",
    "piano",
    "winter",
    "button",
    "dragon",
    "coffee",
    "planet",
    "basket",
    "mirror",
    "jacket",
    "violet",
    "engine",
    "pepper",
    "island",
    "rocket",
    "summer",
    "ticket",
    "wallet",
    "marble",
    "shadow",
    "spider",
    "cotton",
    "ladder",
    "rain",
    "horse",
    "bread",
    "chair",
    "green",
    "music",
    "paper",
    "sugar",
    "table",
    "train",
    "water",
]


def _reverse_problem(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return Example(f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)))


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Generator:
    make: Callable[[random.Random], Example]
    system: str
    max_new_tokens: int
    metric: str
    description: str


GENERATORS: dict[str, _Generator] = {
    "arithmetic": _Generator(
        _arithmetic_problem,
        "Answer with the equation and its result, like 3 + 4 = 7.",
        12,
        "final_number",
        "one- and two-step word problems (+, -, *, / on small numbers) answered as 'equation = result'; "
        "exact match of the final number",
    ),
    "reverse": _Generator(
        _reverse_problem,
        "Answer with the words only.",
        16,
        "exact",
        "reverse the order of 3-5 words (a text transformation); exact match of the word sequence",
    ),
}


def make_task(name: str, seed: int = 0, num_train: int = 1000, num_eval: int = 64) -> Task:
    """Generate task ``name`` deterministically from ``seed``: ``num_train`` + ``num_eval`` distinct prompts."""
    if name not in GENERATORS:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(sorted(GENERATORS))}")
    if num_train < 1 or num_eval < 1:
        raise DataError(f"need at least one train and one eval example, got num_train={num_train}, num_eval={num_eval}")
    gen = GENERATORS[name]
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    want = num_train + num_eval
    attempts = 0
    while len(examples) < want:
        attempts += 1
        if attempts > 50 * want:
            raise DataError(f"task {name!r} cannot produce {want} distinct examples")
        ex = gen.make(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            examples.append(ex)
    # the held-out split comes first so that it does not change when num_train changes
    return Task(
        name,
        train=examples[num_eval:],
        eval=examples[:num_eval],
        system=gen.system,
        max_new_tokens=gen.max_new_tokens,
        metric=gen.metric,
    )


# --------------------------------------------------------------------------------------------- JSONL


def load_jsonl(path: str | Path) -> list[Example]:
    """Read ``{"prompt": str, "answer": str}`` objects, one per line (blank lines skipped).

    Numbers as answers are accepted and converted to text. Any other shape raises DataError naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    examples = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{where}: not UTF-8 text (byte {err.start + 1} of the line is "
                    f"0x{raw[err.start]:02x}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with 'prompt' and 'answer', got {type(obj).__name__}")
            missing = [k for k in ("prompt", "answer") if k not in obj]
            if missing:
                raise DataError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
            prompt, answer = obj["prompt"], obj["answer"]
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(prompt, str) or not isinstance(answer, str):
                raise DataError(f"{where}: 'prompt' and 'answer' must be strings")
            if not prompt.strip() or not answer.strip():
                raise DataError(f"{where}: 'prompt' and 'answer' must not be empty")
            examples.append(Example(prompt, answer))
    if not examples:
        raise DataError(f"data file {str(path)!r} has no examples")
    return examples


def task_from_jsonl(
    path: str | Path,
    seed: int = 0,
    eval_fraction: float = 0.1,
    max_eval: int = 64,
    eval_path: str | Path | None = None,
    system: str | None = None,
    metric: str = "exact",
) -> Task:
    """A task from a user's JSONL file; the held-out split is ``eval_path`` or a seeded random slice of it."""
    if metric not in METRICS:
        raise DataError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    examples = load_jsonl(path)
    if eval_path is not None:
        train, held = examples, load_jsonl(eval_path)
    else:
        if len(examples) < 2:
            raise DataError(f"data file {str(path)!r} needs at least 2 examples to hold one out, has 1")
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"eval fraction must be in (0, 1), got {eval_fraction}")
        order = list(range(len(examples)))
        random.Random(f"jsonl:{seed}").shuffle(order)
        n_eval = min(max_eval, max(1, round(eval_fraction * len(examples))), len(examples) - 1)
        held = [examples[i] for i in order[:n_eval]]
        train = [examples[i] for i in order[n_eval:]]
    longest = max(len(ex.answer) for ex in held)
    # answers are short in most uses; allow ~1 token per 2 characters plus slack, capped for speed
    return Task(
        Path(path).stem,
        train=train,
        eval=held,
        system=system,
        max_new_tokens=min(128, max(8, longest // 2 + 8)),
        metric=metric,
    )

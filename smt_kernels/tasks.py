"""Fine-tuning tasks: generated prompt/answer pairs with held-out splits, a JSONL loader, exact-match scoring.

Built-in tasks are generated from a seed with ``random.Random`` only, so the same seed gives the same examples
on every machine; the train, eval and dev splits never share a prompt.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_EVAL_FRACTION = 0.1  # of a JSONL file's distinct prompts, held out when no size is given


class DataError(ValueError):
    """Unusable task data (malformed JSONL, too few examples, unknown task)."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A train split, a held-out eval split, an optional dev split and how to prompt and score them.

    ``dev`` is held out like ``eval`` but meant for choosing hyperparameters (learning rates), so the reported
    ``eval`` accuracy is not selected on; it is empty unless asked for. ``system`` is an optional instruction sent
    as the chat template's system message (models without a chat template get it prepended to the prompt);
    ``max_new_tokens`` bounds greedy generation at evaluation; ``metric`` is how a generation is scored against
    the answer (see :func:`score`).
    """

    name: str
    train: list[Example]
    eval: list[Example]
    system: str | None = None
    max_new_tokens: int = 16
    metric: str = "exact"
    dev: list[Example] = field(default_factory=list)


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
    # thousands separators are a formatting choice, not an error (only in groups of three: "1,2,3" is not 123)
    return bool(_WHOLE_NUMBER.match(p) and _WHOLE_NUMBER.match(a)) and p.replace(",", "") == a.replace(",", "")


# a number, with commas only as thousands separators ("1,200"); "8,4,0" is three numbers, "1,6" two
_NUMBER_TEXT = r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER = re.compile(_NUMBER_TEXT)
_WHOLE_NUMBER = re.compile(f"^{_NUMBER_TEXT}$")


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


# --------------------------------------------------------------------------------------------- running chain


def _chain_problem(rng: random.Random) -> Example:
    """3-4 operations applied to a running number; the answer lists each intermediate result ("12, 24, 15").

    Writing every intermediate keeps each step one small operation (a 135M model cannot hold a running value
    across steps silently); what makes it hard is that one slip anywhere spoils the final number.
    """
    value = rng.randint(2, 12)
    start, steps, values = value, [], []
    for _ in range(rng.randint(3, 4)):
        ops = ["add", "subtract"] if value >= 2 else ["add"]
        ops += ["double"] * (value <= 30) + ["triple"] * (value <= 20) + ["halve"] * (value % 2 == 0 and value >= 4)
        op = rng.choice(ops)
        if op == "add":
            k = rng.randint(2, 9)
            steps.append(f"add {k}")
            value += k
        elif op == "subtract":
            k = rng.randint(2, min(9, value))
            steps.append(f"subtract {k}")
            value -= k
        elif op == "double":
            steps.append("double it")
            value *= 2
        elif op == "triple":
            steps.append("triple it")
            value *= 3
        else:
            steps.append("halve it")
            value //= 2
        values.append(value)
    said = ", ".join(steps[:-1]) + f", then {steps[-1]}"
    return Example(
        f"Start with {start}. {said[0].upper()}{said[1:]}. What number do you get?", ", ".join(map(str, values))
    )


# --------------------------------------------------------------------------------------------- variable binding

_VARS = "abcdefghjkmnpqrstuvwxyz"  # no i, l, o: easy to misread as digits


def _variables_problem(rng: random.Random) -> Example:
    """Assignments with a 2-3 step dependency chain among distractors; the answer evaluates the chain in order.

    Statements come in definition order (each variable is defined before use), so the answer needs no
    backtracking, but the model must follow references past three unrelated ones ("b = 8, c = 6").
    """
    depth = rng.randint(2, 3)
    names = rng.sample(_VARS, depth + 4)
    chain, spare = names[: depth + 1], names[depth + 1 :]
    value = rng.randint(1, 9)
    # (name, statement) pairs; the chain stays in order and each distractor goes anywhere after what it uses
    stmts = [(chain[0], f"{chain[0]} = {value}")]
    shown = []
    for prev, name in zip(chain, chain[1:], strict=False):
        k = rng.randint(1, 9)
        if value - k >= 0 and rng.random() < 0.5:
            stmts.append((name, f"{name} = {prev} - {k}"))
            value -= k
        else:
            stmts.append((name, f"{name} = {prev} + {k}"))
            value += k
        shown.append(f"{name} = {value}")
    # distractors: a constant, one built on it, and one built on a chain variable (a tempting wrong branch)
    d0, d1, d2 = spare
    extra = [
        (d0, f"{d0} = {rng.randint(1, 9)}"),
        (d1, f"{d1} = {d0} + {rng.randint(1, 9)}"),
        (d2, f"{d2} = {rng.choice(chain[:-1])} + {rng.randint(1, 9)}"),
    ]
    order = stmts[:]
    for name, text in extra:
        ref = text.split(" = ")[1].split(" ")[0]
        lo = next((i + 1 for i, (n, _) in enumerate(order) if n == ref), 0)
        order.insert(rng.randint(lo, len(order)), (name, text))
    prompt = "; ".join(t for _, t in order) + f". What is {chain[-1]}?"
    return Example(prompt, ", ".join(shown))


# --------------------------------------------------------------------------------------------- sorting


def _sort_problem(rng: random.Random) -> Example:
    """Five distinct numbers below 100 in ascending order (a comparison task, no arithmetic)."""
    nums = rng.sample(range(1, 100), 5)
    return Example(
        f"Sort these numbers from smallest to largest: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))
    )


# --------------------------------------------------------------------------------------------- counting

_COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "purple"]


def _count_problem(rng: random.Random) -> Example:
    """How often one word occurs in a list of 8-12 words drawn from four; the count is uniform over 0-6.

    A uniform count keeps guessing at ~1/7; four similar words make the model attend to every item.
    """
    target, *others = rng.sample(_COLORS, 4)
    n = rng.randint(8, 12)
    k = rng.randint(0, 6)
    words = [target] * k + [rng.choice(others) for _ in range(n - k)]
    rng.shuffle(words)
    return Example(f"How many times does the word {target} appear in this list: {' '.join(words)}?", str(k))


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
    "chain": _Generator(
        _chain_problem,
        "Answer with the result after each step, separated by commas, like 12, 24, 15.",
        20,
        "final_number",
        "3-4 operations (add, subtract, double, triple, halve) on a running number, answered as the running "
        "results; exact match of the final number",
    ),
    "variables": _Generator(
        _variables_problem,
        "Answer with the value of each variable on the way, like b = 8, c = 6.",
        20,
        "final_number",
        "a 2-3 step chain of assignments (+, -) among three distractors, answered as the chain's values; "
        "exact match of the final number",
    ),
    "sort": _Generator(
        _sort_problem,
        "Answer with the numbers only, separated by spaces.",
        20,
        "exact",
        "sort five numbers below 100 in ascending order; exact match of the sequence",
    ),
    "count": _Generator(
        _count_problem,
        "Answer with a number only.",
        12,
        "final_number",
        "count how often one word occurs in a list of 8-12 words (answers 0-6); exact match of the number",
    ),
}


def make_task(name: str, seed: int = 0, num_train: int = 1000, num_eval: int = 64, num_dev: int = 0) -> Task:
    """Generate task ``name`` deterministically from ``seed``: ``num_eval`` + ``num_dev`` + ``num_train`` distinct
    prompts, drawn in that order, so the eval split depends only on ``seed`` and ``num_eval``."""
    if name not in GENERATORS:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(sorted(GENERATORS))}")
    if num_train < 1 or num_eval < 1 or num_dev < 0:
        raise DataError(
            f"need at least one train and one eval example and no negative dev count, got num_train={num_train}, "
            f"num_eval={num_eval}, num_dev={num_dev}"
        )
    gen = GENERATORS[name]
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    want = num_eval + num_dev + num_train
    attempts = 0
    while len(examples) < want:
        attempts += 1
        if attempts > 50 * want:
            raise DataError(
                f"task {name!r} cannot produce {want} distinct examples "
                f"(num_eval={num_eval} + num_dev={num_dev} + num_train={num_train}); "
                f"found {len(examples)} in {attempts - 1} draws"
            )
        ex = gen.make(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            examples.append(ex)
    # held-out splits come first so that neither changes when num_train changes, and eval not when num_dev does
    return Task(
        name,
        train=examples[num_eval + num_dev :],
        eval=examples[:num_eval],
        system=gen.system,
        max_new_tokens=gen.max_new_tokens,
        metric=gen.metric,
        dev=examples[num_eval : num_eval + num_dev],
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
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    max_eval: int = 64,
    eval_path: str | Path | None = None,
    system: str | None = None,
    metric: str = "exact",
    num_eval: int | None = None,
) -> Task:
    """A task from a user's JSONL file, with a held-out split that shares no prompt with the training split.

    Without ``eval_path`` the split is by distinct prompt: ``num_eval`` prompts (default ``eval_fraction`` of
    them, at most ``max_eval``), chosen with ``seed``, are held out with their first example each; their other
    lines are not trained on. With ``eval_path`` the held-out examples are its first ``num_eval`` (default all)
    and training leaves out every example whose prompt is in that file. DataError if nothing is left to train on
    or more held-out examples are asked for than there are.
    """
    if metric not in METRICS:
        raise DataError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if num_eval is not None and num_eval < 1:
        raise DataError(f"num_eval must be >= 1, got {num_eval}")
    examples = load_jsonl(path)
    if eval_path is not None:
        train, held = _drop_eval_prompts(path, examples, eval_path, num_eval)
    else:
        train, held = _split_by_prompt(path, examples, seed, eval_fraction, max_eval, num_eval)
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


def _split_by_prompt(
    path: str | Path, examples: list[Example], seed: int, eval_fraction: float, max_eval: int, num_eval: int | None
) -> tuple[list[Example], list[Example]]:
    """(train, held-out): held-out prompts chosen with the seed, one example each; the rest of their lines dropped."""
    first: dict[str, Example] = {}
    for ex in examples:
        first.setdefault(ex.prompt, ex)
    prompts = list(first)
    if len(prompts) < 2:
        raise DataError(f"data file {str(path)!r} needs at least 2 distinct prompts to hold one out, has 1")
    if num_eval is None:
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"eval fraction must be in (0, 1), got {eval_fraction}")
        num_eval = min(max_eval, max(1, round(eval_fraction * len(prompts))), len(prompts) - 1)
    elif num_eval >= len(prompts):
        raise DataError(
            f"num_eval={num_eval} held-out prompts leave nothing to train on: {str(path)!r} has {len(prompts)} "
            f"distinct prompts ({len(examples)} examples), so at most {len(prompts) - 1} can be held out"
        )
    random.Random(f"jsonl:{seed}").shuffle(prompts)
    held_prompts = set(prompts[:num_eval])
    train = [ex for ex in examples if ex.prompt not in held_prompts]
    dropped = len(examples) - len(train) - num_eval
    if dropped:
        log.info("%s: %d more line(s) of the %d held-out prompts are left out of training", path, dropped, num_eval)
    return train, [first[p] for p in prompts[:num_eval]]


def _drop_eval_prompts(
    path: str | Path, examples: list[Example], eval_path: str | Path, num_eval: int | None
) -> tuple[list[Example], list[Example]]:
    """(train, held-out): the first ``num_eval`` of ``eval_path``; training without any prompt of that file."""
    whole = load_jsonl(eval_path)
    if num_eval is not None and num_eval > len(whole):
        raise DataError(f"num_eval={num_eval} is more than the {len(whole)} examples of {str(eval_path)!r}")
    eval_prompts = {ex.prompt for ex in whole}
    train = [ex for ex in examples if ex.prompt not in eval_prompts]
    if not train:
        raise DataError(
            f"every one of the {len(examples)} examples of {str(path)!r} has a prompt that is in the held-out file "
            f"{str(eval_path)!r} (a copy of the training data?): nothing is left to train on"
        )
    if len(train) < len(examples):
        log.warning(
            "%s: %d of %d examples have a prompt that is in the held-out file %s; left out of training",
            path,
            len(examples) - len(train),
            len(examples),
            eval_path,
        )
    return train, whole[:num_eval]

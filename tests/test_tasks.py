"""Generated tasks: determinism, disjoint and stable splits, answers that are right and score right, bad arguments."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from smt_kernels import tasks

NEW = ["chain", "variables", "sort", "count"]

# SHA-256 of the eval split (seed 0, 64 examples) as generated before the dev split existed (commit db1e5fa):
# adding dev must not move an eval prompt
EVAL_BEFORE_DEV = {
    "arithmetic": "2d8d0d2a089c4042",
    "reverse": "d02ad04a2cf86bed",
}


def _digest(examples: list[tasks.Example]) -> str:
    return hashlib.sha256(json.dumps([(e.prompt, e.answer) for e in examples]).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(EVAL_BEFORE_DEV))
def test_existing_eval_split_is_unchanged(name):
    for num_dev, num_train in [(0, 1000), (100, 1000), (500, 20)]:
        t = tasks.make_task(name, seed=0, num_eval=64, num_dev=num_dev, num_train=num_train)
        assert _digest(t.eval) == EVAL_BEFORE_DEV[name]


@pytest.mark.parametrize("name", sorted(tasks.GENERATORS))
def test_splits_are_deterministic_disjoint_and_stable(name):
    a = tasks.make_task(name, seed=5, num_train=300, num_eval=100, num_dev=50)
    assert a == tasks.make_task(name, seed=5, num_train=300, num_eval=100, num_dev=50)
    assert a.eval != tasks.make_task(name, seed=6, num_train=300, num_eval=100, num_dev=50).eval
    assert (len(a.train), len(a.eval), len(a.dev)) == (300, 100, 50)
    prompts = [e.prompt for e in a.train + a.eval + a.dev]
    assert len(set(prompts)) == len(prompts)
    # eval depends on neither num_dev nor num_train; dev not on num_train
    for num_dev, num_train in [(0, 300), (10, 5), (80, 1000)]:
        b = tasks.make_task(name, seed=5, num_train=num_train, num_eval=100, num_dev=num_dev)
        assert b.eval == a.eval
    assert tasks.make_task(name, seed=5, num_train=7, num_eval=100, num_dev=50).dev == a.dev
    # no dev asked for: empty, as for every caller that predates it
    assert tasks.make_task(name, seed=5, num_train=10, num_eval=5).dev == []


def test_task_without_dev_keeps_working():
    t = tasks.Task("t", train=[tasks.Example("p", "a")], eval=[tasks.Example("q", "b")])
    assert t.dev == [] and t.metric == "exact"


@pytest.mark.parametrize("name", NEW)
def test_enough_distinct_examples_for_a_quality_study(name):
    t = tasks.make_task(name, seed=0, num_train=4000, num_eval=1000, num_dev=500)
    assert len({e.prompt for e in t.train + t.eval + t.dev}) == 5500


@pytest.mark.parametrize("name", sorted(tasks.GENERATORS))
def test_answers_score_right_against_themselves_and_wrong_answers_do_not(name):
    t = tasks.make_task(name, seed=1, num_train=300, num_eval=20)
    for ex in t.train + t.eval:
        assert tasks.score(ex.answer, ex.answer, t.metric), ex
        # change the last number (or, for words, drop the last one): a different answer must not score
        nums = re.findall(r"\d+", ex.answer)
        if nums:
            last = nums[-1]
            wrong = ex.answer[: ex.answer.rindex(last)] + str(int(last) + 1)
        else:
            wrong = ex.answer.rsplit(" ", 1)[0]
        assert not tasks.score(wrong, ex.answer, t.metric), (wrong, ex)


@pytest.mark.parametrize("name", NEW)
def test_answers_are_short(name):
    gen = tasks.GENERATORS[name]
    t = tasks.make_task(name, seed=2, num_train=500, num_eval=10)
    # digits are one token each in LLaMA-style tokenizers: characters bound the tokens from above
    assert max(len(e.answer) for e in t.train) <= 2 * gen.max_new_tokens
    assert gen.metric in tasks.METRICS


def test_chain_answers_are_right():
    ops = {"add": lambda v, k: v + k, "subtract": lambda v, k: v - k}
    for ex in tasks.make_task("chain", seed=0, num_train=300, num_eval=10).train:
        start, rest = re.match(r"Start with (\d+)\. (.*)\. What number do you get\?", ex.prompt).groups()
        value, got = int(start), []
        for step in re.split(r", (?:then )?", rest.lower()):
            verb, *arg = step.split()
            if verb in ops:
                value = ops[verb](value, int(arg[0]))
            else:
                assert value % 2 == 0 or verb != "halve"
                value = {"double": value * 2, "triple": value * 3, "halve": value // 2}[verb]
            assert 0 <= value < 100
            got.append(value)
        assert 3 <= len(got) <= 4
        assert ex.answer == ", ".join(map(str, got))


def test_variables_answers_are_right():
    for ex in tasks.make_task("variables", seed=0, num_train=300, num_eval=10).train:
        body, query = re.match(r"(.*)\. What is (\w)\?", ex.prompt).groups()
        env: dict[str, int] = {}
        for stmt in body.split("; "):
            name, expr = stmt.split(" = ")
            parts = expr.split()
            # every variable is defined before it is used
            value = int(parts[0]) if parts[0].isdigit() else env[parts[0]]
            if len(parts) == 3:
                value = value + int(parts[2]) if parts[1] == "+" else value - int(parts[2])
            env[name] = value
        assert len(env) == len(body.split("; ")) in (6, 7)  # no name defined twice
        shown = dict(pair.split(" = ") for pair in ex.answer.split(", "))
        assert list(shown)[-1] == query and all(env[k] == int(v) >= 0 for k, v in shown.items())


def test_sort_and_count_answers_are_right():
    for ex in tasks.make_task("sort", seed=0, num_train=200, num_eval=10).train:
        nums = [int(n) for n in ex.prompt.split(": ")[1].split()]
        assert len(set(nums)) == 5 and ex.answer == " ".join(map(str, sorted(nums)))
    counts = set()
    for ex in tasks.make_task("count", seed=0, num_train=200, num_eval=10).train:
        target, words = re.match(r"How many times does the word (\w+) appear in this list: (.*)\?", ex.prompt).groups()
        assert 8 <= len(words.split()) <= 12 and ex.answer == str(words.split().count(target))
        counts.add(int(ex.answer))
    assert counts == set(range(7))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_train": 0}, ["num_train=0"]),
        ({"num_eval": 0}, ["num_eval=0"]),
        ({"num_dev": -1}, ["num_dev=-1"]),
        ({"name": "nope"}, ["'nope'", "arithmetic", "chain", "variables"]),
    ],
)
def test_bad_arguments_are_named(kwargs, words):
    args = {"name": "reverse", "seed": 0, "num_train": 10, "num_eval": 64} | kwargs
    with pytest.raises(tasks.DataError) as err:
        tasks.make_task(**args)
    for w in words:
        assert w in str(err.value)


def test_too_few_distinct_prompts_is_named(monkeypatch):
    digit = tasks._Generator(lambda rng: tasks.Example(str(rng.randrange(10)), "x"), "", 4, "exact", "ten prompts")
    monkeypatch.setitem(tasks.GENERATORS, "digit", digit)
    assert len(tasks.make_task("digit", num_train=5, num_eval=3, num_dev=2).train) == 5
    with pytest.raises(
        tasks.DataError, match=r"cannot produce 11 distinct .*num_eval=3 \+ num_dev=2 \+ num_train=6.*found 10"
    ):
        tasks.make_task("digit", num_train=6, num_eval=3, num_dev=2)


# --------------------------------------------------------------------------------------------- JSONL splits


def _write(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


def _repeated_prompts(path):
    """81 distinct prompts, 40 of them on two lines (once with another answer), shuffled."""
    import random

    rng = random.Random(1)
    rows = [(f"What is {a} + {b}?", str(a + b)) for a in range(1, 10) for b in range(1, 10)]
    rows += [(p, a + " (again)") for p, a in rng.sample(rows, 40)]
    rng.shuffle(rows)
    return _write(path, rows)


@pytest.mark.parametrize("num_eval", [None, 1, 30, 80])
def test_jsonl_split_keeps_each_prompt_on_one_side(tmp_path, caplog, num_eval):
    """Repeated prompts: the held-out split shares no prompt with training and has exactly num_eval examples."""
    path = _repeated_prompts(tmp_path / "d.jsonl")
    with caplog.at_level("INFO", logger="smt_kernels.tasks"):
        task = tasks.task_from_jsonl(path, seed=0, num_eval=num_eval, max_eval=48)
    held = [e.prompt for e in task.eval]
    assert len(held) == (num_eval or 8)  # default: 10 % of the 81 distinct prompts
    assert len(set(held)) == len(held) and not set(held) & {e.prompt for e in task.train}
    dropped = 121 - len(task.train) - len(held)  # the second lines of held-out prompts: trained on by no one
    assert dropped == sum(1 for e in tasks.load_jsonl(path) if e.prompt in held) - len(held)
    assert (f"{dropped} more line(s)" in caplog.text) == (dropped > 0)
    assert task == tasks.task_from_jsonl(path, seed=0, num_eval=num_eval, max_eval=48)


def test_jsonl_num_eval_must_leave_a_training_prompt(tmp_path):
    path = _repeated_prompts(tmp_path / "d.jsonl")
    with pytest.raises(tasks.DataError, match=r"num_eval=81 .* 81 distinct prompts \(121 examples\), so at most 80"):
        tasks.task_from_jsonl(path, num_eval=81)
    one = _write(tmp_path / "one.jsonl", [("a", "b"), ("a", "c")])
    with pytest.raises(tasks.DataError, match="needs at least 2 distinct prompts"):
        tasks.task_from_jsonl(one)


def test_jsonl_eval_file_prompts_are_not_trained_on(tmp_path, caplog):
    train = _write(tmp_path / "train.jsonl", [(f"p{i}", "x") for i in range(10)] + [("p3", "y")])
    held = _write(tmp_path / "eval.jsonl", [("p3", "x"), ("q1", "x"), ("p7", "x"), ("q2", "x")])
    with caplog.at_level("WARNING", logger="smt_kernels.tasks"):
        task = tasks.task_from_jsonl(train, eval_path=held)
    assert [e.prompt for e in task.eval] == ["p3", "q1", "p7", "q2"]
    assert sorted(e.prompt for e in task.train) == [f"p{i}" for i in range(10) if i not in (3, 7)]
    assert "3 of 11 examples have a prompt that is in the held-out file" in caplog.text
    # num_eval: the first N of the file (the whole file's prompts still stay out of training)
    task = tasks.task_from_jsonl(train, eval_path=held, num_eval=2)
    assert [e.prompt for e in task.eval] == ["p3", "q1"] and len(task.train) == 8
    with pytest.raises(tasks.DataError, match="num_eval=5 is more than the 4 examples"):
        tasks.task_from_jsonl(train, eval_path=held, num_eval=5)
    copy = _write(tmp_path / "copy.jsonl", [(f"p{i}", "x") for i in range(10)])
    with pytest.raises(tasks.DataError, match="every one of the 11 examples .* nothing is left to train on"):
        tasks.task_from_jsonl(train, eval_path=copy)


@pytest.mark.parametrize(
    "prediction,answer,metric,right",
    [
        ("8,4,0", "8, 4, 0", "final_number", True),  # numbers separated by commas, as the chain task asks
        ("2 * 8 = 1,6", "2 * 8 = 16", "final_number", False),  # "1,6" is not sixteen
        ("x = 1,234", "1234", "final_number", True),  # a thousands separator
        ("1,2,3", "123", "exact", False),
        ("12,3", "123", "exact", False),
        ("1,23", "123", "exact", False),
        ("1,200", "1200", "exact", True),
        ("-1,234.5", "-1234.5", "exact", True),
    ],
)
def test_commas_count_as_thousands_separators_only_in_groups_of_three(prediction, answer, metric, right):
    assert tasks.score(prediction, answer, metric) is right

"""Procedurally generated numeric domains: ``arithmetic`` and ``word_problems``.

Both answer with a bare number (response == answer), because accuracy is greedy-generation
exact match on the whole response. Split keys are the operands, so an eval problem is unseen in
every phrasing.
"""

from __future__ import annotations

import random

from mixtune.builtin.split import Record

ARITH_TEMPLATES = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "{a} {op} {b} = ?",
    "Calculate {a} {op} {b}.",
    "What is {a} {word} {b}?",
)
WORDS = {"+": "plus", "-": "minus", "*": "times"}


def arithmetic(rng: random.Random) -> tuple[str, Record]:
    """Sums and differences of numbers below 100, products up to 12 * 12 (about 15k problems).

    Small enough that the base model learns some of it in pretraining, large enough that
    fine-tuning on it still helps.
    """
    op = rng.choices("+-*", weights=(4, 4, 2))[0]
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        value = a * b
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-":
            a, b = max(a, b), min(a, b)  # keep answers non-negative
        value = a + b if op == "+" else a - b
    prompt = rng.choice(ARITH_TEMPLATES).format(a=a, op=op, b=b, word=WORDS[op])
    return f"{a}{op}{b}", {"prompt": prompt, "response": str(value), "answer": str(value)}


NAMES = (
    "Ana",
    "Ben",
    "Chen",
    "Dana",
    "Eli",
    "Fatima",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
    "Kofi",
    "Lena",
    "Mia",
    "Noah",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
)
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards")


def _story(rng: random.Random) -> tuple[int, str, int]:
    """(template id, prompt, answer): each template needs two or three operations."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    t = rng.randrange(10)
    if t == 0:
        a, b, c = rng.randint(5, 40), rng.randint(2, 6), rng.randint(2, 10)
        d = rng.randint(1, a)
        return (
            t,
            (
                f"{name} has {a} {item}. {name} buys {b} packs of {c} {item} and gives "
                f"away {d}. How many {item} does {name} have now?"
            ),
            a + b * c - d,
        )
    if t == 1:
        p, k = rng.randint(2, 9), rng.randint(2, 9)
        bill = next(x for x in (20, 50, 100) if x >= p * k)
        return (
            t,
            (
                f"A pen costs {p} dollars. {name} buys {k} pens and pays with a {bill}-dollar "
                f"bill. How much change does {name} get, in dollars?"
            ),
            bill - p * k,
        )
    if t == 2:
        a, b, c = rng.randint(5, 30), rng.randint(2, 9), rng.randint(1, 30)
        return (
            t,
            (
                f"{name} reads {a} pages a day for {b} days and then {c} pages on the last "
                f"day. How many pages did {name} read in all?"
            ),
            a * b + c,
        )
    if t == 3:
        a, b = rng.randint(3, 12), rng.randint(3, 12)
        c = rng.randint(1, a * b)
        return (
            t,
            (f"A hall has {a} rows of {b} chairs. {c} chairs are taken. How many chairs are free?"),
            a * b - c,
        )
    if t == 4:
        a = rng.randint(40, 99)
        b, c = rng.randint(1, 20), rng.randint(1, 20)
        d = rng.randint(1, 50)
        return (
            t,
            (
                f"{name} had {a} dollars, spent {b} on lunch and {c} on a book, then earned "
                f"{d}. How many dollars does {name} have now?"
            ),
            a - b - c + d,
        )
    if t == 5:
        a, b, c = rng.randint(20, 90), rng.randint(2, 5), rng.randint(5, 60)
        return (
            t,
            (
                f"A train travels at {a} km per hour for {b} hours and then {c} km more. How "
                "many km did it travel?"
            ),
            a * b + c,
        )
    if t == 6:
        b, k, c = rng.randint(2, 8), rng.randint(2, 9), rng.randint(0, 1)
        a = b * k + c
        return (
            t,
            (
                f"{name} shares {a} {item} equally among {b} friends"
                + (" and keeps the 1 left over" if c else "")
                + f". How many {item} does each friend get?"
            ),
            k,
        )
    if t == 7:
        a, b = rng.randint(3, 12), rng.randint(10, 99)
        return (
            t,
            (f"A box holds {a} {item}. How many boxes are needed to pack {b} {item}?"),
            -(-b // a),
        )
    if t == 8:
        a, b, c = rng.randint(5, 40), rng.randint(1, 30), rng.randint(1, 20)
        return (
            t,
            (
                f"{name} is {a} years old. {other} is {b} years older than {name}. How old "
                f"will {other} be in {c} years?"
            ),
            a + b + c,
        )
    a, b = rng.randint(2, 4), rng.randint(2, 6)
    c = rng.randint(a * b, a * b + 20)
    return (
        t,
        (
            f"A cake needs {a} eggs. {name} bakes {b} cakes and had {c} eggs. How many eggs "
            "are left?"
        ),
        c - a * b,
    )


def word_problems(rng: random.Random) -> tuple[str, Record]:
    """Short multi-step stories; the key is the template and its numbers, not the names."""
    t, prompt, value = _story(rng)
    numbers = "".join(ch if ch.isdigit() else " " for ch in prompt).split()
    return f"{t}:{','.join(numbers)}", {
        "prompt": prompt,
        "response": str(value),
        "answer": str(value),
    }

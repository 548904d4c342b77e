"""Regenerate data/arith_{train,test}.json: small arithmetic and word problems in chatml form.

    python data/make_arith.py

Each row is {"messages": [{"role": "user", "content": ...}], "answer": "<number>"}, the shape of the chatml math
sets users bring. The numbers are small so that a tiny model can learn the task on a CPU in minutes.
"""
import json
import os
import random

WORD = [
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", lambda a, b: a + b),
    ("{name} had {a} coins and spent {b}. How many coins are left?", lambda a, b: a - b),
    ("There are {a} birds on a tree and {b} more arrive. How many birds are there?", lambda a, b: a + b),
    ("{name} reads {a} pages a day for {b} days. How many pages is that?", lambda a, b: a * b),
]
MAX_OPERAND = 5  # small enough that the tiny model learns the facts in a minute of warm-up
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def row(rng: random.Random) -> dict:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if rng.random() < 0.7:
        op = rng.choice(list(OPS))
        if op == "-" and b > a:
            a, b = b, a
        question, answer = f"What is {a} {op} {b}?", OPS[op](a, b)
    else:
        template, fn = rng.choice(WORD)
        if fn(5, 3) == 2 and b > a:
            a, b = b, a
        question, answer = template.format(name=rng.choice(NAMES), a=a, b=b), fn(a, b)
    return {"messages": [{"role": "user", "content": question}], "answer": str(answer)}


def main() -> None:
    rng = random.Random(1234)
    here = os.path.dirname(os.path.abspath(__file__))
    for split, n in (("train", 2000), ("test", 200)):
        with open(os.path.join(here, f"arith_{split}.json"), "w") as f:
            f.write("[\n" + ",\n".join(json.dumps(row(rng)) for _ in range(n)) + "\n]\n")


if __name__ == "__main__":
    main()

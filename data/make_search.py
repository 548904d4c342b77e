"""Regenerate data/search_corpus.jsonl and data/search_{train,test}.json: facts about made-up places and people that
no model knows, so a model must search for them (the multi-turn retrieval example).

    python data/make_search.py
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SYLLABLES = ["va", "ren", "ost", "mir", "kal", "dun", "bel", "tor", "ase", "lin", "qua", "zer", "hol", "pen", "dra"]
RELATIONS = [
    ("capital", "The capital of {e} is {v}.", "What is the capital of {e}?"),
    ("river", "The longest river in {e} is the {v}.", "What is the longest river in {e}?"),
    ("founder", "{e} was founded by {v}.", "Who founded {e}?"),
    ("export", "The main export of {e} is {v}.", "What is the main export of {e}?"),
]
GOODS = ["salt", "copper", "wool", "amber", "tin", "glass", "silk", "timber", "honey", "iron"]


def name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def main() -> None:
    rng = random.Random(7)
    entities = sorted({name(rng, 2) for _ in range(200)})[:120]
    docs, questions = [], []
    for i, entity in enumerate(entities):
        facts = []
        for relation, fact, question in RELATIONS:
            value = rng.choice(GOODS) if relation == "export" else name(rng, rng.choice([2, 3]))
            facts.append(fact.format(e=entity, v=value))
            questions.append({"messages": [{"role": "user", "content": question.format(e=entity)}], "answer": value})
        docs.append({"id": str(i), "contents": f"{entity}\n" + " ".join(facts)})
    rng.shuffle(questions)
    with open(os.path.join(HERE, "search_corpus.jsonl"), "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    split = len(questions) - 60
    for part, rows in (("train", questions[:split]), ("test", questions[split:])):
        with open(os.path.join(HERE, f"search_{part}.json"), "w") as f:
            f.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    print(f"{len(docs)} documents, {split} train and {len(questions) - split} test questions")


if __name__ == "__main__":
    main()

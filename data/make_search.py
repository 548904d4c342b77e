"""Regenerate data/search_corpus.jsonl and data/search_{train,test}.json: facts about made-up places and people that
no model knows, so a model must search for them (the multi-turn retrieval example). One passage per fact: short
passages keep the tiny example model's episodes short and make the answer easy to find in what it reads.

    python data/make_search.py
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from tgrpo.tiny import RELATIONS, made_up_name as name, made_up_value  # noqa: E402


def main() -> None:
    rng = random.Random(7)
    entities = sorted({name(rng, 2) for _ in range(200)})[:120]
    docs, questions = [], []
    for entity in entities:
        for relation, fact, question in RELATIONS:
            value = made_up_value(rng, relation)
            docs.append({"id": str(len(docs)), "contents": fact.format(e=entity, v=value)})
            questions.append({"messages": [{"role": "user", "content": question.format(e=entity)}], "answer": value})
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

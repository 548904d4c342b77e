"""Regenerate data/shapes/: small images of coloured shapes with questions whose answers are counts (how many
shapes, how many of one colour), the bundled vision-language task of the embedded model 'tiny-vl'. Rows are in the
form TRL and verl users bring: the image in the prompt as an <image> placeholder, its file in an `images` list,
relative to the data file; answers are numbers, which the math reward checks.

    python data/make_shapes.py
"""
import json
import os
import random
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from tgrpo.tiny import draw_shapes, shape_question  # noqa: E402

OUT = os.path.join(HERE, "shapes")
SPLITS = (("train", 320), ("test", 64))


def main() -> None:
    rng = random.Random(7)
    shutil.rmtree(os.path.join(OUT, "images"), ignore_errors=True)
    os.makedirs(os.path.join(OUT, "images"))
    number = 0
    for part, count in SPLITS:
        rows = []
        for _ in range(count):
            image, colours = draw_shapes(rng)
            question, answer = shape_question(rng, colours)
            name = f"images/{number:06d}.png"
            image.save(os.path.join(OUT, name), optimize=True)  # about 300 bytes
            rows.append({"messages": [{"role": "user", "content": f"<image>{question}"}], "images": [name],
                         "answer": answer})
            number += 1
        with open(os.path.join(OUT, f"{part}.json"), "w") as f:
            f.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    print(f"{number} images in {OUT}: " + ", ".join(f"{count} {part}" for part, count in SPLITS))


if __name__ == "__main__":
    main()

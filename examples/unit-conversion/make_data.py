"""Writes train.jsonl and test.jsonl: multiple-choice unit conversions with letter answers.

Run from this directory: python make_data.py (seeded; the committed files are its output).
"""
import json
import random

UNITS = [  # (from, to, factor): 1 from = factor to
    ("metres", "centimetres", 100), ("kilometres", "metres", 1000), ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
    ("days", "hours", 24), ("weeks", "days", 7), ("feet", "inches", 12), ("yards", "feet", 3),
]


def row(rng: random.Random) -> dict:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 9)
    right = n * factor
    wrong = {n + factor, right * 10, right // 10 if right >= 10 else right + 1, right + factor, n * (factor + 1)}
    wrong.discard(right)
    options = rng.sample(sorted(wrong), 3) + [right]
    rng.shuffle(options)
    return {"question": f"How many {dst} are in {n} {src}?", "options": [str(o) for o in options],
            "label": "ABCD"[options.index(right)]}


def main():
    rng = random.Random(0)
    seen, rows = set(), []
    while len(rows) < 48:
        r = row(rng)
        if r["question"] not in seen:
            seen.add(r["question"])
            rows.append(r)
    for name, part in (("train.jsonl", rows[:36]), ("test.jsonl", rows[36:])):
        with open(name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    main()

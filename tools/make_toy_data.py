#!/usr/bin/env python
"""Generate the bundled toy LongPO data set (data/toy/preference.jsonl) deterministically.

All text is synthetic and written from templates in this file (fictional towns, animals and
machines), so the data is license-clean. Each record: a 500-900 character "encyclopedia" document
cut into 2 chunks; 2 turns, one question per chunk; chosen = the correct, specific answer taken
from the chunk; rejected = a vaguer or wrong answer. The script checks the byte-tokenizer lengths
(long sequence <= 1024, each short sequence <= 512) so the file fits the default config.

    python tools/make_toy_data.py            # rewrite data/toy/preference.jsonl
    python tools/make_toy_data.py --check    # verify the committed file is up to date
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longpo_megatron.data.records import (  # noqa: E402
    PreferenceRecord,
    Turn,
    records_to_jsonl,
    write_records,
)
from longpo_megatron.data.tokenize import tokenize_record  # noqa: E402
from longpo_megatron.data.tokenizer import ByteChatTokenizer  # noqa: E402

SEED = 20240611
N_PER_KIND = 8
MAX_LONG, MAX_SHORT = 1024, 512
DOC_CHARS = (500, 900)

ONSETS = ["Bra", "Cor", "Dun", "Ell", "Fen", "Gal", "Hol", "Ist", "Kel", "Lor", "Mar", "Nor"]
CODAS = ["wick", "mere", "ford", "stead", "holm", "gate", "vale", "brook", "moor", "dale"]
REGIONS = ["Amber", "Silvermoss", "Greyfen", "Lanternwood", "Tallowmere", "Copperhill"]
FIRST = ["Ama", "Bertil", "Cora", "Doran", "Edda", "Fenna", "Gorm", "Hild", "Ivo", "Jessa"]
LAST = ["Lund", "Marrow", "Pike", "Quill", "Rusk", "Sable", "Thorn", "Vell", "Wren", "Yarrow"]
TRADES = ["weaver", "miller", "potter", "boat builder", "beekeeper", "glassblower"]
RESOURCES = ["clay", "fresh water", "salt", "good timber", "slate", "river pearls"]
MONTHS = ["March", "April", "May", "June", "July", "August", "September", "October"]
INDUSTRIES = [
    ("pottery", "blue glazed jugs"),
    ("rope making", "coils of tarred rope"),
    ("cheese making", "smoked cheeses"),
    ("paper milling", "reams of rag paper"),
    ("clock repair", "brass pocket clocks"),
    ("dyeing", "bolts of madder red cloth"),
]
FESTIVALS = [
    ("Lantern Walk", "children carry paper lanterns along the river"),
    ("Bell Fair", "every household rings a hand bell at noon"),
    ("Reed Race", "rowers race reed boats between the two bridges"),
    ("Bread Night", "bakers hand out the first loaf of the new harvest"),
]
LANDMARKS = ["the Salt Tower", "the Old Weir", "the Clock Bridge", "the Grey Granary"]
COLOURS = ["rust brown", "slate grey", "pale gold", "moss green", "ink black", "sand yellow"]
HABITATS = ["reed beds", "pine forests", "chalk cliffs", "salt marshes", "mossy caves"]
FOODS = ["water snails", "pine seeds", "beetles", "fallen figs", "small crabs", "clover"]
MATERIALS = ["oak and brass", "cast iron", "walnut and copper", "pine and steel"]
PURPOSES = [
    ("sorting seeds by size", "seeds"),
    ("winding thread onto spools", "spools"),
    ("pressing apples for cider", "apples"),
    ("cutting roof slates", "slates"),
    ("counting sheep at a gate", "sheep"),
    ("grinding ink stones", "ink stones"),
]
SPECIES = [("vole", "litter"), ("heron", "clutch"), ("lizard", "clutch"), ("otter", "litter")]
POWERS = ["a falling weight", "a hand crank", "a small water wheel", "a coiled spring"]


def _name(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(CODAS)


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _other(rng: random.Random, options: list, avoid: object) -> object:
    """A wrong alternative for rejected answers."""
    return rng.choice([o for o in options if o != avoid])


def town(rng: random.Random) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Paragraphs and (instruction, chosen, rejected) per paragraph for a fictional town."""
    t, region, river, founder = _name(rng), rng.choice(REGIONS), _name(rng), _person(rng)
    year, trade, res = rng.randint(1190, 1790), rng.choice(TRADES), rng.choice(RESOURCES)
    pop, (ind, prod) = rng.randrange(1200, 9800, 10), rng.choice(INDUSTRIES)
    month, (fest, act), mark = rng.choice(MONTHS), rng.choice(FESTIVALS), rng.choice(LANDMARKS)
    p1 = (
        f"{t} is a small market town in the {region} valley, built on both banks of the "
        f"{river} River. It was founded in {year} by {founder}, a {trade} who came looking for "
        f"{res}. Today about {pop} people live in {t}, most of them in the lower quarter near "
        "the water."
    )
    p2 = (
        f"The main trade of {t} is {ind}, and its {prod} are sold in markets across the "
        f"{region} valley. Every year in {month} the town holds the {fest}, when {act}. The "
        f"best-known landmark is {mark}, which stands at the end of the high street."
    )
    q1 = (
        f"When was {t} founded, and by whom?",
        f"{t} was founded in {year} by {founder}, a {trade} looking for {res}.",
        rng.choice(
            [
                "It was founded a long time ago by some early settlers.",
                f"{t} was founded in {year + rng.randint(40, 200)} by a group of miners.",
            ]
        ),
    )
    wrong = _other(rng, MONTHS, month)
    q2 = (
        f"Which festival does {t} hold each year, and in which month?",
        f"{t} holds the {fest} every year in {month}, when {act}.",
        rng.choice(
            [
                "The town has a few festivals during the year, mostly in the warmer months.",
                f"{t} holds a harvest fair every year in {wrong}.",
            ]
        ),
    )
    return [p1, p2], [q1, q2]


def animal(rng: random.Random) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Paragraphs and questions for a fictional animal."""
    species, brood = rng.choice(SPECIES)
    a = f"{_name(rng).lower()} {species}"
    colour, habitat, region = rng.choice(COLOURS), rng.choice(HABITATS), rng.choice(REGIONS)
    length, weight = rng.randint(12, 90), rng.randint(40, 2400)
    food, clutch, span = rng.choice(FOODS), rng.randint(2, 7), rng.randint(3, 14)
    p1 = (
        f"The {a} is a shy animal of the {habitat} of the {region} lowlands. An adult is about "
        f"{length} centimetres long and weighs close to {weight} grams. Its coat is {colour}, "
        "with a pale stripe along each side that helps it hide among dry stems."
    )
    p2 = (
        f"The {a} feeds mainly on {food}, which it finds by turning over stones and leaves. "
        f"In spring the female raises a {brood} of {clutch} young in a hidden nest. "
        f"The young leave the nest after about six weeks, and a healthy adult can live for "
        f"{span} years. Farmers welcome it because it keeps pests away from their fields."
    )
    q1 = (
        f"How large is an adult {a}, and what colour is it?",
        f"An adult {a} is about {length} centimetres long, weighs close to {weight} grams "
        f"and has a {colour} coat.",
        rng.choice(
            [
                "It is a medium-sized animal with a fairly ordinary colour.",
                f"An adult is about {length * 3} centimetres long and its coat is "
                f"{_other(rng, COLOURS, colour)}.",
            ]
        ),
    )
    q2 = (
        f"What does the {a} eat, and how many young does it raise?",
        f"The {a} feeds mainly on {food} and raises {clutch} young each spring in a hidden nest.",
        rng.choice(
            [
                "It eats whatever it can find and has some young now and then.",
                f"It feeds on {_other(rng, FOODS, food)} and raises a single young every "
                "other year.",
            ]
        ),
    )
    return [p1, p2], [q1, q2]


def machine(rng: random.Random) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Paragraphs and questions for a fictional machine."""
    m = f"{_name(rng)} {rng.choice(['engine', 'press', 'loom', 'sorter', 'counter'])}"
    inventor, place, year = _person(rng), _name(rng), rng.randint(1700, 1890)
    (purpose, goods), material, power = (
        rng.choice(PURPOSES),
        rng.choice(MATERIALS),
        rng.choice(POWERS),
    )
    rate, parts = rng.randrange(40, 600, 10), rng.randint(30, 240)
    p1 = (
        f"The {m} is a workshop machine built by {inventor} in {year} in the town of {place}. "
        f"It was made for {purpose}, work that had been done slowly by hand before. The first "
        f"model was built of {material} and stood about as tall as a kitchen table."
    )
    p2 = (
        f"The machine is driven by {power}. A set of toothed wheels passes the motion to a "
        f"moving tray, and a skilled worker can process about {rate} {goods} in one hour. "
        f"A complete machine has {parts} separate parts, and most of them can be replaced "
        "with a single spanner. Several working copies are kept by local museums."
    )
    q1 = (
        f"Who built the {m}, and what was it made for?",
        f"The {m} was built by {inventor} in {year} in {place}, and it was made for {purpose}.",
        rng.choice(
            [
                "It was built by an inventor some time ago to help with farm work.",
                f"It was built by {_person(rng)} in {year + 60} for "
                f"{_other(rng, PURPOSES, (purpose, goods))[0]}.",
            ]
        ),
    )
    q2 = (
        f"What drives the {m}, and how fast does it work?",
        f"The {m} is driven by {power}, and a skilled worker can process about {rate} {goods} "
        "in one hour.",
        rng.choice(
            [
                "It runs on some kind of power and works reasonably quickly.",
                f"It is driven by {_other(rng, POWERS, power)} and handles about {rate // 4} "
                f"{goods} a day.",
            ]
        ),
    )
    return [p1, p2], [q1, q2]


KINDS: list[tuple[str, Callable[[random.Random], tuple[list[str], list]]]] = [
    ("town", town),
    ("animal", animal),
    ("machine", machine),
]


def make_records() -> list[PreferenceRecord]:
    """All 24 records, in a fixed order, checked against the length limits."""
    rng = random.Random(SEED)
    tok = ByteChatTokenizer()
    records = []
    for i in range(N_PER_KIND * len(KINDS)):
        kind, build = KINDS[i % len(KINDS)]
        chunks, questions = build(rng)
        document = "\n\n".join(chunks)
        assert DOC_CHARS[0] <= len(document) <= DOC_CHARS[1], (i, len(document))
        turns = tuple(
            Turn(instruction=q, short_context=c, chosen=ch, rejected=rj)
            for c, (q, ch, rj) in zip(chunks, questions)
        )
        meta = {"source": "synthetic", "generator": "tools/make_toy_data.py", "stage": kind}
        rec = PreferenceRecord(f"toy-{i + 1:04d}", document, turns, meta)
        tokenize_record(rec, i, tok, MAX_LONG, MAX_SHORT)  # raises if over a limit
        records.append(rec)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "data" / "toy" / "preference.jsonl"))
    parser.add_argument("--check", action="store_true", help="verify --out is up to date")
    args = parser.parse_args()
    records = make_records()
    out = Path(args.out)
    if args.check:
        same = out.is_file() and out.read_text(encoding="ascii") == records_to_jsonl(records)
        print(f"{out}: {'up to date' if same else 'STALE (rerun without --check)'}")
        return 0 if same else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    write_records(out, records)
    print(f"wrote {len(records)} records to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

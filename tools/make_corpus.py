#!/usr/bin/env python
"""Generate the procedural part of the bundled corpus (data/corpus/) deterministically.

data/corpus holds license-clean long documents for the datagen tests and demo: two essays
written by hand for this repository (lantern_service.txt, seed_library.md) and the files this
script writes from its own templates (fictional places, people and measurements):

- gazetteers.jsonl: one JSON document per line ({"id", "source", "text"}), regional gazetteers
- field_survey.tex: a LaTeX-style survey report with \\section headings (boundary=section)

    python tools/make_corpus.py            # rewrite the generated files
    python tools/make_corpus.py --check    # verify the committed files are up to date
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "corpus"
SEED = 5150

SYLLABLES = ["al", "bra", "cor", "den", "ev", "fal", "gor", "hal", "ith", "kel", "lun", "mor"]
ENDINGS = ["by", "wick", "ford", "mere", "stead", "holt", "dale", "ton", "ness", "combe"]
FEATURES = ["a chalk ridge", "a slow brown river", "a wide estuary", "a ring of beech woods",
            "a marsh crossed by causeways", "a granite hill", "a chain of small lakes"]  # fmt: skip
TRADES = ["wool", "timber", "salt", "slate", "cider", "rope", "pottery", "cheese", "paper"]
BUILDINGS = ["a market hall", "a tithe barn", "a covered bridge", "a water mill",
             "a round church", "a toll house", "a grain store", "a clock tower"]  # fmt: skip
MATERIALS = ["flint", "red brick", "oak beams", "grey limestone", "cob and thatch", "slate"]
EVENTS = ["a great flood", "a fire in the lower town", "a dispute over grazing rights",
          "the arrival of the railway", "a hard winter that froze the river",
          "the closing of the mine", "a quarrel between two guilds"]  # fmt: skip
CUSTOMS = ["a walk around the parish boundary", "a race of barrels down the main street",
           "a lantern procession to the river", "a ploughing match on the common",
           "a fair where servants were once hired",
           "a song contest in the market hall"]  # fmt: skip
RESPONSES = ["rebuilding in stone", "moving the market uphill", "digging a new channel",
             "buying the common land", "founding a school"]  # fmt: skip
CAUSES = ["the dry spring", "drainage work upslope", "new tree planting", "a blocked channel",
          "heavy winter rain"]  # fmt: skip
PLANTS = ["watercress and mosses", "rushes and marsh marigold", "ferns and liverworts",
          "sedges and mint"]  # fmt: skip
ACCESS = ["Cattle reach the pool", "A footpath passes close by", "The pool is fenced",
          "A stone trough stands below the outflow"]  # fmt: skip
MONTHS = ["January", "March", "April", "May", "June", "August", "September", "October"]
FIRST = ["Agnes", "Bram", "Celia", "Dunstan", "Edith", "Frey", "Gilda", "Hob", "Isolde", "Jory"]
LAST = ["Ashdown", "Birch", "Coombe", "Dray", "Everett", "Fold", "Gale", "Hearn", "Ivey", "Jute"]


def _name(rng: random.Random) -> str:
    return (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize() + rng.choice(ENDINGS)


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _settlement(rng: random.Random, region: str) -> str:
    """Several paragraphs about one invented settlement, with consistent facts."""
    name, trade, building = _name(rng), rng.choice(TRADES), rng.choice(BUILDINGS)
    founded, people = rng.randint(1050, 1750), rng.randint(300, 40000)
    founder, event, custom = _person(rng), rng.choice(EVENTS), rng.choice(CUSTOMS)
    year_event = founded + rng.randint(40, 250)
    neighbour, miles = _name(rng), rng.randint(3, 40)
    paras = [
        f"{name}\n\n{name} is a settlement of about {people:,} people in {region}, set beside "
        f"{rng.choice(FEATURES)} some {miles} miles from {neighbour}. Records first mention it "
        f"in {founded}, when {founder} was granted the right to hold a weekly market there.",
        f"The early wealth of {name} came from {trade}. Merchants carried it by cart and later "
        f"by barge to {neighbour}, and the tolls they paid built {building} of "
        f"{rng.choice(MATERIALS)} that still stands near the centre. Local accounts say that "
        f"in a good year the {trade} trade employed one household in {rng.randint(2, 9)}.",
        f"In {year_event} the town suffered {event}. Its council responded by "
        f"{rng.choice(RESPONSES)}"
        f", a decision that shaped the plan of the streets for the next century. The cost was "
        f"met partly by a levy on {trade} and partly by a loan from {neighbour}.",
        f"Every {rng.choice(MONTHS)} the people of {name} hold {custom}. The custom is said to "
        f"date from {founded + rng.randint(10, 300)}, though the earliest written description "
        f"is much later. Visitors come from across {region}, and the event ends with a shared "
        f"meal paid for by the {rng.choice(['parish', 'guild', 'town council', 'mill owners'])}.",
    ]
    if rng.random() < 0.6:
        later = rng.choice(TRADES)
        paras.append(
            f"Today the {trade} trade is small, and most residents work in {later} or travel "
            f"to {neighbour}. {building.capitalize()} is used as "
            f"{rng.choice(['a library', 'a museum', 'a meeting room', 'a covered market'])}."
        )
    return "\n\n".join(paras)


def gazetteer(rng: random.Random, index: int) -> dict[str, str]:
    """One long gazetteer document of a fictional region."""
    region = f"the {_name(rng)} Vale"
    intro = (
        f"A Gazetteer of {region[4:]}\n\nThis gazetteer describes the settlements of {region}, "
        "an invented region. Each entry gives the origin of the settlement, its trade, a notable "
        "event and a local custom. Distances are given in miles along the old roads."
    )
    entries = [_settlement(rng, region) for _ in range(rng.randint(10, 13))]
    return {
        "id": f"gazetteer-{index:02d}",
        "source": "generated:tools/make_corpus.py",
        "text": "\n\n".join([intro, *entries]),
    }


def survey_report(rng: random.Random) -> str:
    """A LaTeX-flavoured field survey with one \\section per site."""
    parts = [
        "\\title{Field Survey of Upland Springs}\n\nThis report summarises an invented survey "
        "of springs on an upland plateau. Each section describes one site, the measurements "
        "taken and the surveyors' interpretation."
    ]
    for site in range(1, 19):
        name, flow = _name(rng), rng.randint(2, 90)
        temp, ph = rng.randint(6, 14), rng.randint(55, 82) / 10
        surveyor, month = _person(rng), rng.choice(MONTHS)
        change = rng.choice(["risen", "fallen", "stayed about the same"])
        parts.append(
            f"\\section{{Site {site}: {name} spring}}\n\n"
            f"The {name} spring was visited by {surveyor} in {month}. Water leaves the rock "
            f"at about {flow} litres per minute and collects in a shallow pool lined with "
            f"{rng.choice(MATERIALS)}. The water temperature was {temp} degrees and the pH "
            f"{ph}.\n\nCompared with the previous survey the flow has {change}. The surveyors "
            f"suggest that this reflects "
            f"{rng.choice(CAUSES)}"
            f", but note that a single visit cannot separate seasonal change from a lasting "
            f"trend.\n\nPlants around the pool include "
            f"{rng.choice(PLANTS)}. {rng.choice(ACCESS)}"
            f", which the report recommends keeping under review."
        )
    return "\n\n".join(parts) + "\n"


def build() -> dict[str, str]:
    """File name -> content of every generated file."""
    rng = random.Random(SEED)
    docs = [gazetteer(rng, i) for i in range(1, 5)]
    jsonl = "".join(json.dumps(d, ensure_ascii=True) + "\n" for d in docs)
    return {"gazetteers.jsonl": jsonl, "field_survey.tex": survey_report(rng)}


def main() -> int:
    """Write, or with --check compare, the generated files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args()
    stale = []
    for name, text in build().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({len(text)} bytes)")
    if stale:
        print(f"stale: {stale}; run python tools/make_corpus.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

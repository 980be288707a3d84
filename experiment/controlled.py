"""The controlled experiment: both of the paper's claims, pre-registered, on a task that code grades.

    python -m experiment.controlled                       # the full run: about 80-100 min on 2 CPU cores; resumable
    python -m experiment.controlled --gate                # the pilot gate alone: the untrained model on validation
    python -m experiment.controlled --quick --model PATH  # every stage at toy sizes, the smoke test

This file owns the task (questions whose answers code computes, the asked form), the primary metric, the
three kinds of pairs built from the model's own samples, the arms and seeds, and the hypotheses with their
decision rule. Sampling is clair.py's, training train.py's, generation clair_apo/generation.py's, answer
normalisation evaluate.py's.

- Task: 500 questions in eleven kinds (capitals, sums, differences, products, unit conversions, weekdays,
  months, letter counts, first and last letters, neighbouring numbers), each with its key computed here,
  split by question into 350 train, 50 validation and 100 test. Every prompt asks for one short sentence that
  ends with the answer; a quarter also ask for lowercase letters only.
- Primary metric (`grade`): a reply succeeds when it stopped on its own (cut at the limit fails), its last
  words equal a key after evaluate.normalise, the lowercase constraint holds where asked, and no n-gram
  loops (`looping`).
- Pairs, from SmolLM2's samples of the train and validation prompts (four each, temperature 0.7; samples cut
  at the limit dropped). CLAIR: rejected = a failed sample, chosen = `revise(sample)`, its exactly smallest
  edit into the asked form with a right answer. Stronger Preferred: the same rejected, chosen = a right
  answer written from the prompt alone (`fresh_answer`; only its length is matched to CLAIR's chosen).
  W: on samples that succeed, chosen = the sample with one injected defect, rejected = with two (`inject`),
  so both sides are worse than the model.
- Arms (ARMS), each a train.main run with the same hyperparameters, fixed in advance; 4 seeds. A seed trains
  on one disjoint share of the pool's prompts (CLAIR and Stronger on the same samples), in its own order.
- Decision (HYPOTHESES, `decide`): H1 CLAIR minus Stronger success under APO-zero, H2 (APO-zero minus
  APO-down on CLAIR) minus (the same on W); each a paired bootstrap over test prompts and seeds, one-sided,
  Holm-corrected over the two; supported when the corrected p is below ALPHA and the effect is at least
  MIN_EFFECT. The gate: the untrained model's validation success must lie in --gate-range.
- Resumable: each stage writes its file last and is skipped when the file exists; reference log-probs come
  from train.py's cache; a run's checkpoint is deleted once its answers are written.
"""

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import clair
import evaluate
import train
from clair_apo.generation import Decoding, generate
from clair_apo.models import DEFAULT_MODEL, default_device, default_dtype, load_model
from evaluate import matches, normalise
from preference_data import read_jsonl

# ----------------------------------------------------------------------------- the task

CAPITALS = {
    "Afghanistan": "Kabul", "Albania": "Tirana", "Algeria": "Algiers", "Angola": "Luanda",
    "Argentina": "Buenos Aires", "Armenia": "Yerevan", "Australia": "Canberra", "Austria": "Vienna",
    "Azerbaijan": "Baku", "Bangladesh": "Dhaka", "Belarus": "Minsk", "Belgium": "Brussels", "Botswana": "Gaborone",
    "Brazil": "Brasilia", "Bulgaria": "Sofia", "Cambodia": "Phnom Penh", "Canada": "Ottawa", "Chile": "Santiago",
    "China": "Beijing", "Colombia": "Bogota", "Croatia": "Zagreb", "Cuba": "Havana", "Cyprus": "Nicosia",
    "the Czech Republic": "Prague", "Denmark": "Copenhagen", "Ecuador": "Quito", "Egypt": "Cairo",
    "Eritrea": "Asmara", "Estonia": "Tallinn", "Ethiopia": "Addis Ababa", "Fiji": "Suva", "Finland": "Helsinki",
    "France": "Paris", "Georgia": "Tbilisi", "Germany": "Berlin", "Ghana": "Accra", "Greece": "Athens",
    "Honduras": "Tegucigalpa", "Hungary": "Budapest", "Iceland": "Reykjavik", "Indonesia": "Jakarta",
    "Iran": "Tehran", "Iraq": "Baghdad", "Ireland": "Dublin", "Italy": "Rome", "Jamaica": "Kingston",
    "Japan": "Tokyo", "Jordan": "Amman", "Kenya": "Nairobi", "Kyrgyzstan": "Bishkek", "Laos": "Vientiane",
    "Latvia": "Riga", "Lebanon": "Beirut", "Libya": "Tripoli", "Lithuania": "Vilnius", "Madagascar": "Antananarivo",
    "Malaysia": "Kuala Lumpur", "Mali": "Bamako", "Malta": "Valletta", "Moldova": "Chisinau",
    "Mongolia": "Ulaanbaatar", "Montenegro": "Podgorica", "Morocco": "Rabat", "Mozambique": "Maputo",
    "Namibia": "Windhoek", "Nepal": "Kathmandu", "the Netherlands": "Amsterdam", "New Zealand": "Wellington",
    "Nicaragua": "Managua", "Niger": "Niamey", "Nigeria": "Abuja", "North Korea": "Pyongyang",
    "North Macedonia": "Skopje", "Norway": "Oslo", "Oman": "Muscat", "Pakistan": "Islamabad",
    "Paraguay": "Asuncion", "Peru": "Lima", "the Philippines": "Manila", "Poland": "Warsaw", "Portugal": "Lisbon",
    "Qatar": "Doha", "Romania": "Bucharest", "Russia": "Moscow", "Rwanda": "Kigali", "Saudi Arabia": "Riyadh",
    "Senegal": "Dakar", "Serbia": "Belgrade", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Somalia": "Mogadishu", "South Korea": "Seoul", "Spain": "Madrid", "Sudan": "Khartoum", "Sweden": "Stockholm",
    "Switzerland": "Bern", "Syria": "Damascus", "Taiwan": "Taipei", "Tajikistan": "Dushanbe", "Thailand": "Bangkok",
    "Tunisia": "Tunis", "Turkey": "Ankara", "Turkmenistan": "Ashgabat", "Uganda": "Kampala", "Ukraine": "Kyiv",
    "the United Kingdom": "London", "Uruguay": "Montevideo", "Uzbekistan": "Tashkent", "Venezuela": "Caracas",
    "Vietnam": "Hanoi", "Zambia": "Lusaka", "Zimbabwe": "Harare"}
OTHER_SPELLINGS = {"Kyiv": ["Kiev"]}
WORDS = """apple garden pencil river window yellow banana castle orange summer tiger forest candle bridge rocket
silver monkey planet butter jacket island market guitar pillow dragon winter flower basket carpet doctor engine
finger hammer kitten ladder mirror needle pepper rabbit saddle ticket velvet wagon zebra anchor bottle camera
desert eagle falcon ginger helmet jungle kettle lemon meadow noodle oyster parrot rainbow shadow turtle umbrella
valley walnut lantern marble cotton copper cheese blanket cabinet chicken diamond harbor kingdom library morning
picture pumpkin thunder village whistle battery captain dolphin feather giraffe holiday journey kitchen machine
number ocean painter quarter rubber sunset teacher violin weather""".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
UNITS = [("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
         ("years", "months", 12), ("meters", "centimeters", 100), ("kilometers", "meters", 1000),
         ("kilograms", "grams", 1000), ("feet", "inches", 12), ("liters", "milliliters", 1000)]
# Questions per kind, 500 in all; every tenth question of a kind goes to validation, two to test.
KIND_COUNTS = {"capital": 90, "addition": 50, "subtraction": 40, "multiplication": 40, "units": 60, "weekday": 40,
               "month": 50, "letter_count": 40, "first_letter": 30, "last_letter": 30, "neighbour": 30}
SPLIT_PATTERN = ["test", "train", "train", "train", "val", "train", "test", "train", "train", "train"]
QUESTION_SEED = 2024
FORM = "Reply in one short sentence that ends with the answer."
LOWERCASE = "Use only lowercase letters."


def question(kind, text, keys, distractors, phrasings):
    """A base question: keys read as right (the first is the canonical one), wrong answers of the same kind
    for W's defects, and right answers written from the question alone (Stronger Preferred)."""
    return {"kind": kind, "question": text, "keys": [str(k) for k in keys],
            "distractors": [str(d) for d in distractors], "phrasings": [p[:1].upper() + p[1:] for p in phrasings]}


def near_numbers(value, rng):
    """Three wrong numbers near a right one: off by 1, 2 or 10, all positive."""
    return rng.sample([v for v in (value - 10, value - 2, value - 1, value + 1, value + 2, value + 10) if v > 0], 3)


def capital_questions(rng):
    for country, city in CAPITALS.items():
        others = rng.sample([c for c in CAPITALS.values() if c != city], 3)
        yield question("capital", f"What is the capital of {country}?", [city, *OTHER_SPELLINGS.get(city, [])],
                       others, [f"It is {city}.", f"The capital city of {country} is {city}.",
                                f"{country} has its seat of government in {city}."])


def arithmetic_questions(rng):
    for a, b in rng.sample([(x, y) for x in range(10, 100) for y in range(10, 100)], 300):
        yield question("addition", f"What is {a} plus {b}?", [a + b], near_numbers(a + b, rng),
                       [f"It is {a + b}.", f"{a} plus {b} equals {a + b}.", f"Adding {a} and {b} gives {a + b}."])
    for a, b in rng.sample([(x, y) for x in range(20, 100) for y in range(10, x)], 300):
        yield question("subtraction", f"What is {a} minus {b}?", [a - b], near_numbers(a - b, rng),
                       [f"It is {a - b}.", f"{a} minus {b} equals {a - b}.",
                        f"Taking {b} away from {a} leaves {a - b}."])
    for a, b in rng.sample([(x, y) for x in range(2, 13) for y in range(x, 13)], 66):
        yield question("multiplication", f"What is {a} times {b}?", [a * b], near_numbers(a * b, rng),
                       [f"It is {a * b}.", f"{a} times {b} equals {a * b}.",
                        f"Multiplying {a} by {b} gives {a * b}."])


def unit_questions(rng):
    for (big, small, factor), n in rng.sample([(u, n) for u in UNITS for n in range(2, 10)], len(UNITS) * 8):
        value = n * factor
        yield question("units", f"How many {small} are in {n} {big}?", [value, f"{value} {small}"],
                       near_numbers(value, rng),
                       [f"It is {value}.", f"{n} {big} make {value} {small}.",
                        f"Each of the {n} {big} holds {factor} {small}, which makes {value} {small}."])


def calendar_questions(rng):
    for names, kind, unit in ((DAYS, "weekday", "days"), (MONTHS, "month", "months")):
        what = "day of the week" if kind == "weekday" else "month"
        cases = [(start, step) for start in range(len(names)) for step in (-1, 1, 2, 3, 4, 5, 6)]
        for start, step in rng.sample(cases, len(cases)):
            name, answer = names[start], names[(start + step) % len(names)]
            text = (f"What {what} comes right {'after' if step == 1 else 'before'} {name}?" if abs(step) == 1
                    else f"What {what} is {step} {unit} after {name}?")
            after = {-1: "right before", 1: "right after"}.get(step, f"{step} {unit} after")
            yield question(kind, text, [answer], rng.sample([n for n in names if n != answer], 3),
                           [f"It is {answer}.", f"The {what} {after} {name} is {answer}.",
                            f"Counting on the calendar from {name} lands on {answer}."])


def word_questions(rng):
    words = rng.sample(WORDS, len(WORDS))
    for word in words[:40]:
        n = len(word)
        yield question("letter_count", f"How many letters are in the word '{word}'?", [n, f"{n} letters"],
                       near_numbers(n, rng), [f"It has {n}.", f"The word '{word}' has {n} letters.",
                                              f"Spelling out '{word}' one letter at a time counts {n} letters."])
    for word, (kind, index) in zip(words[40:], [("first_letter", 0), ("last_letter", -1)] * 40):
        letter, where = word[index], "first" if index == 0 else "last"
        yield question(kind, f"What is the {where} letter of the word '{word}'?", [letter],
                       rng.sample([c for c in "abcdefghijklmnoprstuwy" if c != letter], 3),
                       [f"It is {letter}.", f"The {where} letter of '{word}' is {letter}.",
                        f"Written out, the word '{word}' has as its {where} letter the letter {letter}."])


def neighbour_questions(rng):
    for n, step in rng.sample([(n, s) for n in range(11, 1000) for s in (-1, 1)], 200):
        side = "after" if step == 1 else "before"
        yield question("neighbour", f"What number comes right {side} {n}?", [n + step], [n, n - step, n + 2 * step],
                       [f"It is {n + step}.", f"The number right {side} {n} is {n + step}.",
                        f"Counting {'up' if step == 1 else 'down'} by one from {n} gives {n + step}."])


def build_prompts(args):
    """The prompts of every split, the same on every machine. Within a split the kinds take turns, and every
    fourth prompt also asks for lowercase, so that a split's first prompts (--quick, the size flags) cover
    every kind and both forms."""
    rng = random.Random(QUESTION_SEED)
    pools = {}
    for make in (capital_questions, arithmetic_questions, unit_questions, calendar_questions, word_questions,
                 neighbour_questions):
        for q in make(rng):
            pools.setdefault(q["kind"], []).append(q)
    splits = {"train": [], "val": [], "test": []}
    for kind, count in KIND_COUNTS.items():
        for n, q in enumerate(rng.sample(pools[kind], count)):
            splits[SPLIT_PATTERN[n % 10]].append({"id": f"{kind}-{n:03d}", **q})
    sizes = {"train": args.train_prompts, "val": args.val_prompts, "test": args.test_prompts}
    prompts = []
    for split, rows in splits.items():
        for position, q in enumerate(sorted(rows, key=lambda q: (int(q["id"][-3:]), q["kind"]))[:sizes[split]]):
            lowercase = position % 4 == 3
            prompts.append({**q, "split": split, "lowercase": lowercase,
                            "prompt": " ".join([q["question"], FORM] + ([LOWERCASE] if lowercase else []))})
    return prompts


# ----------------------------------------------------------------------------- the primary metric

def looping(text):
    """An n-gram loop: some run of 1 to 8 tokens (words, or runs of punctuation) three times in a row, or one
    character eight times in a row."""
    if re.search(r"(.)\1{7}", text):
        return True
    tokens = re.findall(r"\w+|[^\w\s]+", text.lower())
    return any(tokens[i:i + n] == tokens[i + n:i + 2 * n] == tokens[i + 2 * n:i + 3 * n]
               for n in range(1, 9) for i in range(len(tokens) - 3 * n + 1))


def answer_at_end(text, keys):
    """Is a key where the form puts it: are the reply's last words, normalised, the key's words?"""
    words = normalise(text).split()
    return any(words[-len(key):] == key for key in (normalise(k).split() for k in keys))


def allowed(char, lowercase):
    """May `char` appear in a reply: anything, but no capital letter where lowercase is asked."""
    return not (lowercase and char != char.lower())


def grade(text, finish_reason, prompt):
    """The primary metric and its parts. `success` needs all four checks; `correct_anywhere` (a key anywhere
    in the reply, evaluate.matches) is reported beside it, as correctness alone."""
    checks = {"stopped": finish_reason == "stop", "answer_at_end": answer_at_end(text, prompt["keys"]),
              "lowercase_held": all(allowed(c, prompt["lowercase"]) for c in text), "no_loop": not looping(text)}
    return {**checks, "success": all(checks.values()),
            "correct_anywhere": any(matches(text, key) for key in prompt["keys"])}


# ----------------------------------------------------------------------------- the minimal reviser (CLAIR)

EDIT = 1_000_000  # the cost of one edit in smallest_edit(); the tie-break below adds less than one edit
INDEL, RECLASS, SPLIT = 1, 2, 50


def tie_break(written, replaced, in_word, following):
    """What smallest_edit adds, among edits of equal count, for writing `written` over `replaced` (None: an
    insertion) with the text so far `in_word` and `following` next: INDEL for an insertion, RECLASS for a
    substitution that is not a letter or digit over another, SPLIT for a space that cuts a word in two. So a
    wrong answer is rewritten in place ("has 12 letters." -> "has 6 letters.", "'B'." -> "'a'.", "Lyon." ->
    "Paris.") and an answer that is missing is appended ("a better place." -> "a better place 129.", not
    "a better p 129.")."""
    cost = INDEL if replaced is None else 0 if replaced.isalnum() and written.isalnum() else RECLASS
    return cost + (SPLIT if written == " " and in_word and following.isalnum() else 0)


TAIL = ".!?'\")"  # what may follow the answer: normalise() reads each as nothing


def boundary(char):
    """May the answer begin after `char`? Whitespace, or ASCII punctuation that normalise() reads as a space."""
    return char.isspace() or (char.isascii() and not char.isalnum() and char not in "_-.")


def revise(text, prompt):
    """CLAIR's chosen side: the smallest edit of `text` into the canonical form of a right answer, over every
    key. The canonical form is a subset of what succeeds: a key as written (lowercased where lowercase is
    asked) at the start or after a `boundary`, then only TAIL characters."""
    endings = [key.lower() if prompt["lowercase"] else key for key in prompt["keys"]]
    return min((smallest_edit(text, ending=e, lowercase=prompt["lowercase"]) for e in endings),
               key=lambda result: result[0])[1]


def next_states(state, char, ending, lowercase):
    """smallest_edit's automaton: the states that writing `char` may lead to from `state`."""
    if not allowed(char, lowercase):
        return []
    if state <= 1:
        return [0 if boundary(char) else 1] + ([2] if state == 0 and char == ending[0] else [])
    if state <= len(ending):
        return [state + 1] if char == ending[state - 1] else []
    return [len(ending) + 2] if char in TAIL else []


def smallest_edit(text, ending, lowercase):
    """(cost, revision): the smallest Levenshtein edit of `text` that ends with `ending` at a word boundary,
    then only TAIL characters, and has no capital letter under `lowercase`.

    The edit distance from a string to a regular language is a dynamic program over (characters read,
    automaton state) (Wagner 1974). States: 0 free text at a boundary (or none yet), 1 free text inside a word,
    1 + k the ending's first k characters written, n + 2 the tail. Moves: keep a character (cost 0),
    substitute, delete or insert one (1 each); only representative characters need trying: the character's
    own fix (its lowercase), the ending's next one, a space. Costs are edits * EDIT + tie_break(), so among
    the smallest edits the one that rewrites what is wrong in place wins.
    """
    if not all(allowed(c, lowercase) for c in ending):
        raise ValueError(f"the ending {ending!r} breaks the lowercase constraint")
    n = len(ending)
    done, tail = n + 1, n + 2

    cost = [[float("inf")] * (n + 3) for _ in range(len(text) + 1)]
    back = [[None] * (n + 3) for _ in range(len(text) + 1)]  # (previous column, previous state, written text)

    def relax(j, state, value, origin):
        if value < cost[j][state]:
            cost[j][state], back[j][state] = value, origin

    def insert(j):
        """Insertions within column j, in the only order they can help: a space, then the ending's characters."""
        following = text[j:j + 1]
        relax(j, 0, cost[j][1] + EDIT + tie_break(" ", None, in_word=True, following=following), (j, 1, " "))
        relax(j, 2, cost[j][0] + EDIT + INDEL, (j, 0, ending[0]))
        for state in range(2, done):
            relax(j, state + 1, cost[j][state] + EDIT + INDEL, (j, state, ending[state - 1]))

    cost[0][0] = 0
    insert(0)
    for j, char in enumerate(text):
        fix = char.lower() if len(char.lower()) == 1 else char
        for state in range(n + 3):
            if cost[j][state] == float("inf"):
                continue
            nexts = {0: ending[0], 1: " "}.get(state, ending[state - 1] if state < done else None)
            for written in (char, fix, nexts):
                for target in next_states(state, written, ending, lowercase) if written is not None else []:
                    extra = 0 if written == char else EDIT + tie_break(written, char, in_word=state == 1,
                                                                       following=text[j + 1:j + 2])
                    relax(j + 1, target, cost[j][state] + extra, (j, state, written))
            relax(j + 1, state, cost[j][state] + EDIT + INDEL, (j, state, ""))
        insert(j + 1)
    state = min((done, tail), key=lambda s: cost[len(text)][s])
    best, j, pieces = cost[len(text)][state], len(text), []
    while back[j][state] is not None:
        j, state, written = back[j][state]
        pieces.append(written)
    return best, "".join(reversed(pieces))


# ----------------------------------------------------------------------------- W: right answers made worse

DEFECTS = ["wrong answer", "answer repeated", "text after the answer", "capital letter"]
AFTERWORD = " I hope this helps."


def answer_span(text, prompt):
    """(start, end) of a key written as such where the form puts it, or None (written otherwise: "1,000")."""
    for key in prompt["keys"]:
        found = re.search(rf"(?<![\w-]){re.escape(key)}(?=\W*$)", text, flags=re.IGNORECASE)
        if found:
            return found.span()
    return None


def defects_for(text, prompt):
    """The defects that apply to a reply: a capital letter only where lowercase is asked and letters exist."""
    return DEFECTS if prompt["lowercase"] and any(c.isalpha() for c in text) else DEFECTS[:3]


def inject(text, prompt, defects):
    """A reply that succeeds, with each of `defects`, every one of which makes it fail the metric: the key
    replaced by the question's first distractor, the answer written three times (a loop), a sentence after
    the answer, the first letter capitalised."""
    start, end = answer_span(text, prompt)
    answer = text[start:end]
    if "wrong answer" in defects:
        wrong = prompt["distractors"][0]
        answer = wrong.lower() if answer.islower() else wrong
    if "answer repeated" in defects:
        answer = " ".join([answer] * 3)
    text = text[:start] + answer + text[end:]
    if "text after the answer" in defects:
        text += AFTERWORD.lower() if prompt["lowercase"] else AFTERWORD
    if "capital letter" in defects:
        first = next(i for i, c in enumerate(text) if c.isalpha())
        text = text[:first] + text[first].upper() + text[first + 1:]
    return text


# ----------------------------------------------------------------------------- Stronger Preferred

PREAMBLES = ["", "Sure. ", "Good question. ", "Let me work this out. ", "Here is the answer to your question. ",
             "That is a good question, and the answer takes only a moment to work out. "]


def fresh_answer(prompt, length, avoid):
    """Stronger Preferred's chosen side: a right answer written from the question alone, never from the sample;
    of its phrasings (a preamble and a sentence), the one nearest `length` characters that is not in `avoid`."""
    options = [preamble + phrasing for phrasing in prompt["phrasings"] for preamble in PREAMBLES]
    options = [o.lower() if prompt["lowercase"] else o for o in options]
    return min((o for o in options if o not in avoid), key=lambda o: abs(len(o) - length))


# ----------------------------------------------------------------------------- pairs and seeds

def pairs_of(sample, prompt):
    """The pairs one sample gives, by dataset, and why it gives none (None when it gives some). A sample that
    succeeds gives a W pair; one that fails, a CLAIR and a Stronger-Preferred pair with it as rejected side."""
    text = sample["completion"]
    if sample["finish_reason"] != "stop":
        return {}, "cut at the sampling limit"
    if grade(text, "stop", prompt)["success"]:
        if answer_span(text, prompt) is None:
            return {}, "right, but the key written otherwise"
        defects = random.Random(sample["id"]).sample(defects_for(text, prompt), 2)
        chosen, rejected = inject(text, prompt, defects[:1]), inject(text, prompt, defects)
        if grade(chosen, "stop", prompt)["success"] or grade(rejected, "stop", prompt)["success"]:
            return {}, "right, and a defect left it right"
        return {"w": {"chosen": chosen, "rejected": rejected, "defects": defects}}, None
    revision = revise(text, prompt)
    if not grade(revision, "stop", prompt)["success"]:
        return {}, "wrong, and its revision still loops"
    fresh = fresh_answer(prompt, length=len(revision), avoid={revision, text})
    return {"clair": {"chosen": revision, "rejected": text}, "stronger": {"chosen": fresh, "rejected": text}}, None


def build_pairs(prompts, samples):
    """CLAIR, Stronger-Preferred and W pairs from the samples, and how many samples were left out and why."""
    by_id = {p["id"]: p for p in prompts}
    pairs, left_out = {"clair": [], "stronger": [], "w": []}, {}
    for sample in samples:
        prompt = by_id[sample["prompt_id"]]
        given, why = pairs_of(sample, prompt)
        for dataset, pair in given.items():
            pairs[dataset].append({"id": sample["id"], "prompt_id": prompt["id"], "split": prompt["split"],
                                   "prompt": prompt["prompt"], **pair})
        if why:
            left_out[why] = left_out.get(why, 0) + 1
    return pairs, left_out


def seed_shares(pairs, seeds, size):
    """The pair ids each seed trains on: the pool's prompts dealt into `seeds` disjoint shares by a fixed
    shuffle, then `size` pairs of share s drawn by seed s (train.py's --seed then sets their order)."""
    prompt_ids = sorted({p["prompt_id"] for p in pairs})
    random.Random(0).shuffle(prompt_ids)  # the same deal for every arm
    share_of = {pid: k % seeds for k, pid in enumerate(prompt_ids)}
    draws = []
    for seed in range(seeds):
        share = sorted(p["id"] for p in pairs if share_of[p["prompt_id"]] == seed)
        if len(share) < size:
            sys.exit(f"error: seed {seed}'s share holds {len(share)} pairs, fewer than --pairs {size}")
        draws.append(sorted(random.Random(seed).sample(share, size)))
    return draws


def write_jsonl(path, rows):
    """Write to a temporary file, then rename: a file that exists is complete."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    tmp.replace(path)
    return str(path)


def write_json(path, value):
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def cached(path, compute):
    """The JSON in `path`, computed and written first when it is missing: a resumed run skips finished stages."""
    if not Path(path).exists():
        write_json(path, compute())
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- answers and runs

ARMS = {"clair_apo_zero": ("clair", "apo_zero"), "clair_apo_down": ("clair", "apo_down"),  # (pairs, loss)
        "stronger_apo_zero": ("stronger", "apo_zero"), "w_apo_zero": ("w", "apo_zero"),
        "w_apo_down": ("w", "apo_down")}


def answer_prompts(model_path, prompts, args):
    """A model's greedy replies, each a record: text, finish reason, true token count and the metric's checks."""
    tokenizer, model = load_model(model_path, default_device())
    model.eval()
    records = []
    for start in range(0, len(prompts), args.gen_batch):
        batch = prompts[start:start + args.gen_batch]
        texts, reasons, counts = generate(model, tokenizer, [p["prompt"] for p in batch],
                                          Decoding(args.max_tokens, dtype=default_dtype(model.device)[0]))
        records += [{"id": p["id"], "answer": text, "finish_reason": reason, "tokens": count,
                     **grade(text, reason, p)} for p, text, reason, count in zip(batch, texts, reasons, counts)]
    return records


def mean_of(values):
    """The mean of a list of checks or counts; None for no values (no prompt asked for it)."""
    return float(np.mean(values)) if values else None


def rates(records, prompts):
    """The secondary results of one set of replies: each check's rate, and the mean true token count."""
    lowercase = {p["id"] for p in prompts if p["lowercase"]}
    return {"success": mean_of([r["success"] for r in records]),
            "correct anywhere": mean_of([r["correct_anywhere"] for r in records]),
            "answer at the end": mean_of([r["answer_at_end"] for r in records]),
            "lowercase held, where asked": mean_of([r["lowercase_held"] for r in records if r["id"] in lowercase]),
            "stopped": mean_of([r["stopped"] for r in records]),
            "looping": mean_of([not r["no_loop"] for r in records]),
            "tokens": mean_of([r["tokens"] for r in records])}


def run(arm, seed, pair_ids, pairs, prompts, args):
    """One train.main run of an arm at a seed, then its graded replies to the test prompts: result.json."""
    folder = Path(args.out) / "runs" / arm / f"seed{seed}"
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    started, (dataset, loss) = time.time(), ARMS[arm]
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(pair_ids)
    data = write_jsonl(folder / "pairs.jsonl", [p for p in pairs[dataset] if p["id"] in wanted])
    heldout_pairs = str(Path(args.out) / f"heldout_{dataset}.jsonl")
    train.main(["--model", args.model, "--data", data, "--eval-data", heldout_pairs, "--loss", loss,
                "--lr", str(args.lr), "--beta", str(args.beta), "--epochs", str(args.epochs),
                "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
                "--eval-every", str(args.eval_every), "--max-length", str(args.max_length),
                "--max-prompt-length", str(args.max_prompt_length), "--seed", str(seed), "--out", str(folder)])
    test = [p for p in prompts if p["split"] == "test"]
    result = {"arm": arm, "seed": seed, "pair_ids": pair_ids,
              "test": answer_prompts(str(folder / "final"), test, args), "seconds": time.time() - started}
    write_json(result_path, result)
    shutil.rmtree(folder / "final")
    return result


# ----------------------------------------------------------------------------- the decision rule, pre-registered

ALPHA = 0.05  # one-sided, family-wise over H1 and H2 (Holm)
MIN_EFFECT = 0.05  # the smallest effect that counts: 5 points of test success rate
REPLICATES = 10_000  # bootstrap resamples
HYPOTHESES = {
    "H1": {"claim": "CLAIR pairs beat Stronger-Preferred pairs under APO-zero",
           "contrast": {"clair_apo_zero": 1, "stronger_apo_zero": -1}},
    "H2": {"claim": "APO-zero's lead over APO-down is larger on CLAIR (chosen better than the model) "
                    "than on W (chosen worse than the model)",
           "contrast": {"clair_apo_zero": 1, "clair_apo_down": -1, "w_apo_zero": -1, "w_apo_down": 1}}}


def success_table(seeds):
    """[seed, test prompt] success of an arm's runs; every run answers the test prompts in the same order."""
    return np.array([[record["success"] for record in result["test"]] for result in seeds], dtype=float)


def paired_bootstrap(table, replicates, seed=0):
    """The mean of a [seed, prompt] table of per-answer contrasts, with its bootstrap distribution: seeds and
    prompts resampled with replacement, together for every arm (the table is already the contrast), so the
    pairing by seed and by prompt is kept. p is one-sided, for an effect above 0."""
    rng = np.random.default_rng(seed)
    n_seeds, n_prompts = table.shape
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=replicates)
    prompt_counts = rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=replicates)
    means = np.einsum("bs,sp,bp->b", seed_counts, table, prompt_counts) / (n_seeds * n_prompts)
    return {"effect": float(table.mean()), "p_one_sided": float((1 + np.sum(means <= 0)) / (replicates + 1)),
            "ci95": [float(q) for q in np.percentile(means, [2.5, 97.5])],
            "lower_bound_95_one_sided": float(np.percentile(means, 5))}


def holm(p_values):
    """Holm-adjusted p-values: the i-th smallest of m times (m - i), made monotone, capped at 1."""
    adjusted, running = {}, 0.0
    for i, name in enumerate(sorted(p_values, key=p_values.get)):
        running = max(running, min(1.0, (len(p_values) - i) * p_values[name]))
        adjusted[name] = running
    return adjusted


def decide(tables, replicates=REPLICATES):
    """Each hypothesis tested on `tables` (arm -> [seed, prompt] success): effect, intervals, p, Holm's p and
    the verdict. Supported: Holm's p below ALPHA and the effect at least MIN_EFFECT."""
    tests = {name: paired_bootstrap(sum(weight * tables[arm] for arm, weight in h["contrast"].items()), replicates)
             for name, h in HYPOTHESES.items()}
    adjusted = holm({name: test["p_one_sided"] for name, test in tests.items()})
    for name, test in tests.items():
        significant, large = adjusted[name] < ALPHA, test["effect"] >= MIN_EFFECT
        test.update(claim=HYPOTHESES[name]["claim"], p_holm=adjusted[name], supported=significant and large,
                    reason="supported" if significant and large else
                    "significant but below the minimum effect" if significant else "not significant")
    return tests


# ----------------------------------------------------------------------------- secondary results

# Two-sided 97.5% quantiles of Student's t, by degrees of freedom; 1.96 beyond 30.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_interval(values):
    """Mean and 95% t-interval over seeds: mean +- t * s / sqrt(n); no interval from one seed."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": len(values)}
    half = (T975[len(values) - 2] if len(values) <= 31 else 1.96) * values.std(ddof=1) / np.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values)}


def heldout(folder):
    """Figure 4's view of one run (train.py's eval metrics on held-out validation pairs): the final reward of
    each side, and its log-likelihood's change from step 0."""
    lines = evaluate.curves(folder)[1]
    return {**{f"reward {side}": lines["rewards", side][1][-1] for side in ("chosen", "rejected")},
            **{f"Δ log π {side}": lines["logps", side][1][-1] - lines["logps", side][1][0]
               for side in ("chosen", "rejected")}}


def secondary(seeds, folders, prompts):
    """An arm's secondary results over its seeds, each a mean with its t-interval."""
    per_seed = [rates(result["test"], prompts) | heldout(folder) for result, folder in zip(seeds, folders)]
    return {name: mean_interval([r[name] for r in per_seed]) for name in per_seed[0] if per_seed[0][name] is not None}


# ----------------------------------------------------------------------------- the report

def cell(stat, name):
    """A table cell: a share to 2 decimals, tokens and log-likelihoods to 1; a mean with its interval, or one
    value (the untrained model's)."""
    digits = 1 if name == "tokens" or name.startswith("Δ") else 2
    if stat is None or isinstance(stat, float):
        return "" if stat is None else f"{stat:.{digits}f}"
    interval = " [{:.{d}f}, {:.{d}f}]".format(*stat["ci95"], d=digits) if stat["ci95"] else ""
    return f"{stat['mean']:.{digits}f}{interval}"


def summary(results):
    """The hypotheses as decided, then every arm's secondary results beside the untrained model's, as markdown."""
    lines = [f"{results['prompts']['test']} test prompts, {results['config']['seeds']} seeds; mean [95% interval]",
             "", "| hypothesis | effect | 95% interval | one-sided p | Holm's p | verdict |",
             "|---|---|---|---|---|---|"]
    for name, test in results["hypotheses"].items():
        low, high = test["ci95"]
        lines.append(f"| {name}: {test['claim']} | {test['effect']:+.3f} | [{low:+.3f}, {high:+.3f}] "
                     f"| {test['p_one_sided']:.4f} | {test['p_holm']:.4f} | {test['reason']} |")
    names = list(next(iter(results["arms"].values()))["secondary"])
    rows = {"untrained": results["untrained"]["test"]} | {arm: r["secondary"] for arm, r in results["arms"].items()}
    lines += ["", "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {arm} | " + " | ".join(cell(row.get(n), n) for n in names) + " |" for arm, row in rows.items()]
    return lines


def plot(results, folders, out):
    """Test success per arm with 95% intervals over seeds, and held-out log-likelihoods during training."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib")
        return
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.5))
    arms = list(results["arms"])
    stats = [results["arms"][arm]["secondary"]["success"] for arm in arms]
    errors = np.array([[s["mean"] - low, high - s["mean"]]
                       for s in stats for low, high in [s["ci95"] or (s["mean"], s["mean"])]])
    bars.bar(range(len(arms)), [s["mean"] for s in stats], yerr=errors.T, capsize=4,
             color=[f"C{n}" for n in range(len(arms))])
    bars.axhline(results["untrained"]["test"]["success"], color="black", linestyle=":", label="untrained")
    bars.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
    bars.set_ylabel("test success (primary metric)")
    bars.legend(fontsize=8)
    for n, arm in enumerate(arms):
        runs = [evaluate.curves(folder)[1] for folder in folders[arm]]
        for side, style in (("chosen", "-"), ("rejected", "--")):
            change = [np.subtract(r["logps", side][1], r["logps", side][1][0]) for r in runs]
            lines.plot(runs[0]["logps", side][0], np.mean(change, axis=0), style, color=f"C{n}", marker="o",
                       markersize=3, label=f"{arm}: {side}")
    lines.set_xlabel("optimizer step")
    lines.set_title("held-out log π(y|x) minus its step-0 value, mean over seeds", fontsize=10)
    lines.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model trained and tested (default: SmolLM2)")
    p.add_argument("--out", default="runs/experiment", help="every stage's files; a rerun resumes from them")
    p.add_argument("--quick", action="store_true", help="toy sizes for a smoke test: seconds, meaningless numbers")
    p.add_argument("--gate", action="store_true",
                   help="stop after the pilot gate (the untrained model on the validation prompts)")
    p.add_argument("--gate-range", type=float, nargs=2, default=[0.2, 0.7],
                   help="the untrained model's validation success must lie here, or the run stops")
    p.add_argument("--train-prompts", type=int, default=350, help="train prompts sampled for pairs (at most 350)")
    p.add_argument("--val-prompts", type=int, default=50, help="validation prompts: the gate, held-out pairs")
    p.add_argument("--test-prompts", type=int, default=100, help="test prompts: the hypotheses (at most 100)")
    p.add_argument("--samples", type=int, default=4, help="samples per train and validation prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="of the samples (top-p 0.9)")
    p.add_argument("--seeds", type=int, default=4, help="training runs per arm, each on its own share")
    p.add_argument("--pairs", type=int, default=40, help="training pairs per run, drawn from its seed's share")
    p.add_argument("--eval-pairs", type=int, default=24, help="held-out validation pairs for Figure 4's view")
    p.add_argument("--lr", type=float, default=2e-5, help="fixed in advance, the same for every arm")
    p.add_argument("--beta", type=float, default=0.1, help="train.py's, the same for every arm")
    p.add_argument("--epochs", type=int, default=2, help="train.py's, over a run's pairs")
    p.add_argument("--batch-size", type=int, default=2, help="train.py's")
    p.add_argument("--grad-accum", type=int, default=4, help="train.py's")
    p.add_argument("--eval-every", type=int, default=5, help="optimizer steps between held-out evaluations")
    p.add_argument("--max-length", type=int, default=192, help="train.py's, prompt + completion tokens")
    p.add_argument("--max-prompt-length", type=int, default=128, help="train.py's")
    p.add_argument("--max-tokens", type=int, default=40, help="length limit of samples and test replies")
    p.add_argument("--gen-batch", type=int, default=100, help="prompts per generate call")
    args = p.parse_args(argv)
    if args.samples < 2:
        p.error("--samples must be at least 2 (clair.py sample names each sample's prompt only then)")
    if args.quick:
        args.__dict__.update(train_prompts=8, val_prompts=4, test_prompts=4, seeds=1, pairs=3, eval_pairs=2,
                             epochs=1, batch_size=2, grad_accum=1, eval_every=1, max_tokens=12, gen_batch=4,
                             max_length=640, max_prompt_length=600, gate_range=[0.0, 1.0])
    return args


def sample_and_pair(prompts, args, out):
    """The model's samples of the train and validation prompts (clair.py sample), the pairs built from them,
    the held-out pair files train.py evaluates on, and the pairs' counts and contrastiveness."""
    asked = write_jsonl(out / "sampling_prompts.jsonl", [{"id": p["id"], "prompt": p["prompt"]}
                                                         for p in prompts if p["split"] != "test"])
    clair.main(["sample", "--in", asked, "--out", str(out / "samples.jsonl"), "--n", str(args.samples),
                "--temperature", str(args.temperature), "--top-p", "0.9", "--max-tokens", str(args.max_tokens),
                "--seed", "0", "--batch-size", str(args.gen_batch), "--model", args.model])
    samples = [row for _, row in read_jsonl(out / "samples.jsonl")]
    pairs, left_out = build_pairs(prompts, samples)
    report = {"samples": len(samples), "left out": left_out, "contrastiveness": {}, "per split": {}}
    for dataset, rows in pairs.items():
        write_jsonl(out / f"heldout_{dataset}.jsonl", [r for r in rows if r["split"] == "val"][:args.eval_pairs])
        trained_on = write_jsonl(out / f"{dataset}_train.jsonl", [r for r in rows if r["split"] == "train"])
        report["per split"][dataset] = {split: sum(r["split"] == split for r in rows) for split in ("train", "val")}
        report["contrastiveness"][dataset] = clair.contrastiveness(trained_on) if rows else None
    lengths = {d: np.mean([len(r["chosen"]) for r in pairs[d]]) for d in ("clair", "stronger") if pairs[d]}
    report["stronger over clair chosen length"] = float(lengths["stronger"] / lengths["clair"]) if lengths else None
    return pairs, report


def run_arms(pairs, prompts, args):
    """Every arm at every seed, seed by seed, printing the time left as the runs finish."""
    train_pairs = {d: [p for p in rows if p["split"] == "train"] for d, rows in pairs.items()}
    draws = {"clair": seed_shares(train_pairs["clair"], args.seeds, args.pairs),
             "w": seed_shares(train_pairs["w"], args.seeds, args.pairs)}
    draws["stronger"] = draws["clair"]  # the same samples as rejected side: paired by seed
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in ARMS]
    results, seconds = {arm: [] for arm in ARMS}, []
    for done, (arm, seed) in enumerate(jobs, 1):
        result = run(arm, seed, draws[ARMS[arm][0]][seed], pairs, prompts, args)
        results[arm].append(result)
        seconds.append(result["seconds"])
        print(f"run {done}/{len(jobs)} ({arm}, seed {seed}) took {result['seconds']:.0f} s; "
              f"about {np.mean(seconds) * (len(jobs) - done) / 60:.0f} min of runs to go", flush=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = build_prompts(args)
    write_jsonl(out / "prompts.jsonl", prompts)
    split = {name: [p for p in prompts if p["split"] == name] for name in ("train", "val", "test")}
    results = {"config": vars(args), "prompts": {name: len(rows) for name, rows in split.items()},
               "design": {"hypotheses": HYPOTHESES, "alpha": ALPHA, "min_effect": MIN_EFFECT,
                          "replicates": REPLICATES, "form": FORM, "lowercase": LOWERCASE,
                          "test": "paired bootstrap over test prompts and seeds, one-sided, Holm over H1 and H2"}}

    # 1. The pilot gate: the untrained model on the validation prompts.
    records = {"val": cached(out / "untrained_val.json", lambda: answer_prompts(args.model, split["val"], args))}
    gate = rates(records["val"], split["val"])["success"]
    results["gate"] = {"validation success": gate, "range": args.gate_range,
                       "passed": args.gate_range[0] <= gate <= args.gate_range[1]}
    print(f"gate: the untrained model succeeds on {gate:.2f} of {len(split['val'])} validation prompts "
          f"(range {args.gate_range[0]}-{args.gate_range[1]})")
    if not results["gate"]["passed"]:
        sys.exit("gate failed: W or the headroom cannot be built; change the prompt form or the mix of kinds")
    if args.gate:
        return results

    # 2. Samples, pairs, the untrained model on the test prompts, then every arm at every seed.
    pairs, results["pairs"] = sample_and_pair(prompts, args, out)
    records["test"] = cached(out / "untrained_test.json", lambda: answer_prompts(args.model, split["test"], args))
    results["untrained"] = {name: rates(records[name], split[name]) for name in records} | {"records": records}
    seeds = run_arms(pairs, prompts, args)
    folders = {arm: [out / "runs" / arm / f"seed{seed}" for seed in range(args.seeds)] for arm in ARMS}
    results["arms"] = {arm: {"secondary": secondary(seeds[arm], folders[arm], split["test"]), "seeds": seeds[arm]}
                       for arm in ARMS}

    # 3. The decision, as pre-registered above; the report.
    results["hypotheses"] = decide({arm: success_table(seeds[arm]) for arm in ARMS})
    write_json(out / "results.json", results)
    table = "\n".join(summary(results))
    (out / "table.md").write_text(table + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}\n\n{table}")
    plot(results, folders, out / "experiment.png")
    return results


if __name__ == "__main__":
    main()

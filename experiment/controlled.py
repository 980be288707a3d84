"""The controlled experiment: the paper's claims, pre-registered, on a task that code grades and where minimal
revisions can fix what the model gets wrong.

    python -m experiment.controlled                       # the full run: about 1 h 40 min on 2 CPU cores; resumable
    python -m experiment.controlled --gate                # the pilot gate alone: the untrained model on validation
    python -m experiment.controlled --quick --model PATH  # every stage at toy sizes, the smoke test

This file owns the task (questions whose answers code computes, the asked form), the primary metric, the
three kinds of pairs built from the model's own samples, the arms, seeds and tuning grid, and the hypotheses
with their decision rule. Sampling is clair.py's, training train.py's, generation clair_apo/generation.py's,
answer normalisation evaluate.py's.

- Task: 470 questions in ten kinds, seven whose content SmolLM2 often knows (capitals, first letters,
  opposites, plurals, products, one-digit sums, unit conversions) and three it rarely does (two-digit sums and
  differences, weekdays), each key computed here, split by question into 235 train, 94 validation and 141
  test. Every prompt asks for one short sentence that ends with the answer; half also ask for lowercase
  letters only, the form the untrained model almost never writes; the other half are the guard against damage.
- Primary metric (`grade`): a reply succeeds when it stopped on its own (cut at the limit fails), its last
  words equal a key after evaluate.normalise, lowercase holds where asked (letters, none capital), no n-gram
  loops (`looping`), and it is a sentence of at least MIN_WORDS words.
- Pairs, from SmolLM2's samples (temperature 0.7; samples cut at the limit dropped). CLAIR: rejected = a failed
  sample, chosen = `revise(sample)`, its exactly smallest edit into the asked form with a right answer.
  Stronger Preferred: the same rejected, chosen = a right answer written from the prompt alone
  (`fresh_answer`; only its length is matched to CLAIR's chosen). W: on samples that succeed, chosen = the
  sample with one injected defect, rejected = with two (`inject`), so both sides are worse than the model.
- Arms (ARMS), each tuned on validation over the same GRID (lr, beta, epochs) on a share no test seed uses,
  then trained at its chosen setting on 3 seeds, each a disjoint share of its pool's prompts (CLAIR and
  Stronger share a pool: the same samples).
- Decision (HYPOTHESES, `decide`): H0 CLAIR + APO-zero minus the untrained model, H1 CLAIR minus Stronger
  under APO-zero, H2 APO-down minus APO-zero on W; each a bootstrap over test prompts and each pool's seeds,
  one-sided, Holm-corrected over the three; supported when the corrected p is below ALPHA and the effect is at
  least MIN_EFFECT. The gate: the untrained model's validation success in --gate-range, and at least
  MIN_HEADROOM of the validation prompts failing on the asked lowercase alone.
- Resumable: each stage writes its file last and is skipped when the file exists; reference log-probs come
  from train.py's cache; a run's checkpoint is deleted once its answers are written.
"""

import argparse
import itertools
import json
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
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
OPPOSITES = {"hot": ["cold"], "big": ["small", "little"], "up": ["down"], "day": ["night"], "happy": ["sad"],
             "fast": ["slow"], "open": ["closed", "shut"], "wet": ["dry"], "hard": ["soft", "easy"],
             "full": ["empty"], "rich": ["poor"], "early": ["late"], "left": ["right"], "black": ["white"],
             "yes": ["no"], "win": ["lose"], "love": ["hate"], "good": ["bad", "evil"], "high": ["low"],
             "push": ["pull"], "top": ["bottom"], "north": ["south"], "east": ["west"], "first": ["last"],
             "always": ["never"], "thick": ["thin"], "clean": ["dirty"], "strong": ["weak"],
             "loud": ["quiet", "soft"], "inside": ["outside"], "buy": ["sell"], "start": ["finish", "end", "stop"],
             "question": ["answer"], "true": ["false"], "alive": ["dead"], "cheap": ["expensive"],
             "friend": ["enemy"], "summer": ["winter"], "boy": ["girl"], "king": ["queen"], "sweet": ["sour", "bitter"],
             "light": ["dark", "heavy"], "old": ["young", "new"], "tall": ["short"], "long": ["short"],
             "remember": ["forget"], "laugh": ["cry"], "give": ["take", "receive"], "near": ["far"],
             "empty": ["full"]}
PLURALS = {"cat": "cats", "dog": "dogs", "child": "children", "mouse": "mice", "box": "boxes", "foot": "feet",
           "tooth": "teeth", "man": "men", "woman": "women", "goose": "geese", "book": "books", "city": "cities",
           "baby": "babies", "leaf": "leaves", "knife": "knives", "wolf": "wolves", "bus": "buses",
           "church": "churches", "dish": "dishes", "person": "people", "car": "cars", "tree": "trees",
           "house": "houses", "story": "stories", "party": "parties", "potato": "potatoes", "tomato": "tomatoes",
           "hero": "heroes", "fox": "foxes", "watch": "watches", "glass": "glasses", "class": "classes",
           "apple": "apples", "bird": "birds", "horse": "horses", "chair": "chairs", "table": "tables",
           "star": "stars", "river": "rivers", "shoe": "shoes", "hand": "hands", "wife": "wives",
           "life": "lives", "half": "halves", "country": "countries", "key": "keys", "boy": "boys", "girl": "girls",
           "lady": "ladies", "brush": "brushes"}
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
UNITS = [("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
         ("years", "months", 12), ("meters", "centimeters", 100), ("kilometers", "meters", 1000),
         ("kilograms", "grams", 1000), ("feet", "inches", 12), ("liters", "milliliters", 1000)]
# Questions per kind, 470 in all: seven kinds whose content the pilot found SmolLM2 often knows, and three
# (two-digit sums and differences, weekdays) whose content it rarely does, where a revision must change the
# answer itself. Of every ten questions of a kind, five go to train, two to validation, three to test.
KIND_COUNTS = {"capital": 80, "first_letter": 40, "opposite": 50, "plural": 50, "multiplication": 60,
               "small_sum": 70, "units": 60, "addition": 20, "subtraction": 20, "weekday": 20}
SPLIT_PATTERN = ["test", "train", "val", "train", "test", "train", "train", "val", "test", "train"]
QUESTION_SEED = 2024
FORM = "Reply in one short sentence that ends with the answer."
LOWERCASE = "Use only lowercase letters."
MIN_WORDS = 3  # a sentence, not a bare answer: at least three words with a letter or digit


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


def weekday_questions(rng):
    cases = [(start, step) for start in range(len(DAYS)) for step in (-1, 1, 2, 3, 4, 5, 6)]
    for start, step in rng.sample(cases, len(cases)):
        name, answer = DAYS[start], DAYS[(start + step) % len(DAYS)]
        text = (f"What day of the week comes right {'after' if step == 1 else 'before'} {name}?" if abs(step) == 1
                else f"What day of the week is {step} days after {name}?")
        after = {-1: "right before", 1: "right after"}.get(step, f"{step} days after")
        yield question("weekday", text, [answer], rng.sample([n for n in DAYS if n != answer], 3),
                       [f"It is {answer}.", f"The day of the week {after} {name} is {answer}.",
                        f"Counting on the calendar from {name} lands on {answer}."])


def first_letter_questions(rng):
    for word in rng.sample(WORDS, KIND_COUNTS["first_letter"]):
        letter = word[0]
        yield question("first_letter", f"What is the first letter of the word '{word}'?", [letter],
                       rng.sample([c for c in "abcdefghijklmnoprstuwy" if c != letter], 3),
                       [f"It is {letter}.", f"The first letter of '{word}' is {letter}.",
                        f"Written out, the word '{word}' has as its first letter the letter {letter}."])


def small_sum_questions(rng):
    for a, b in rng.sample([(x, y) for x in range(1, 10) for y in range(1, 10)], 81):
        yield question("small_sum", f"What is {a} plus {b}?", [a + b], near_numbers(a + b, rng),
                       [f"It is {a + b}.", f"{a} plus {b} equals {a + b}.", f"Adding {a} and {b} gives {a + b}."])


def opposite_questions(rng):
    for word, keys in rng.sample(sorted(OPPOSITES.items()), len(OPPOSITES)):
        others = rng.sample([k[0] for w, k in OPPOSITES.items() if w != word and k[0] not in keys], 3)
        yield question("opposite", f"What is the opposite of '{word}'?", keys, others,
                       [f"It is {keys[0]}.", f"The opposite of '{word}' is {keys[0]}.",
                        f"A word that means the reverse of '{word}' is {keys[0]}."])


def plural_questions(rng):
    for word, plural in rng.sample(sorted(PLURALS.items()), len(PLURALS)):
        others = [word, word + "s" if not plural.endswith("s") or plural == word + "es" else word + "es",
                  rng.choice([p for p in PLURALS.values() if p != plural])]
        yield question("plural", f"What is the plural of '{word}'?", [plural], [o for o in others if o != plural][:3],
                       [f"It is {plural}.", f"The plural of '{word}' is {plural}.",
                        f"More than one {word} are called {plural}."])


def build_prompts(args):
    """The prompts of every split, the same on every machine. Within a split the kinds take turns, and every
    second question of a kind also asks for lowercase, alternating across kinds too, so that a split's first
    prompts (--quick, the size flags) cover every kind and both forms; the other half never ask for it, the
    guard against damage."""
    rng = random.Random(QUESTION_SEED)
    pools = {}
    for make in (capital_questions, arithmetic_questions, unit_questions, weekday_questions, first_letter_questions,
                 small_sum_questions, opposite_questions, plural_questions):
        for q in make(rng):
            pools.setdefault(q["kind"], []).append(q)
    splits = {"train": [], "val": [], "test": []}
    for kind, count in KIND_COUNTS.items():
        for n, q in enumerate(rng.sample(pools[kind], count)):
            splits[SPLIT_PATTERN[n % 10]].append({"id": f"{kind}-{n:03d}", **q})
    sizes = {"train": args.train_prompts, "val": args.val_prompts, "test": args.test_prompts}
    prompts = []
    kinds = list(KIND_COUNTS)
    for split, rows in splits.items():
        rank = {q["id"]: n for kind in kinds for n, q in enumerate(row for row in rows if row["kind"] == kind)}
        for q in sorted(rows, key=lambda q: (int(q["id"][-3:]), q["kind"]))[:sizes[split]]:
            lowercase = (rank[q["id"]] + kinds.index(q["kind"])) % 2 == 1
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


def all_lowercase(text):
    """Letters, and no capital among them: the asked form (a reply without letters has not written it)."""
    return any(c.isalpha() for c in text) and all(allowed(c, lowercase=True) for c in text)


def sentence(text):
    """At least MIN_WORDS words that hold a letter or digit: a sentence as asked, not a bare answer."""
    return sum(any(c.isalnum() for c in word) for word in text.split()) >= MIN_WORDS


def one_letter(key):
    return len(key) == 1 and key.isalpha()


def correct_anywhere(text, keys):
    """A key anywhere in the reply as whole words (evaluate.matches). A one-letter key counts only where it
    is written as a letter (at the end, quoted, or after "letter"), not as the word "a" or "I"."""
    if any(not one_letter(key) and matches(text, key) for key in keys):
        return True
    letters = "|".join(re.escape(key.lower()) for key in keys if one_letter(key))
    written_as_letter = rf"""['"‘’“”]({letters})['"‘’“”]|\bletter ({letters})\b"""
    return bool(letters) and (answer_at_end(text, letters.split("|")) or bool(re.search(written_as_letter,
                                                                                         text.lower())))


CHECKS = ["stopped", "answer_at_end", "lowercase_held", "no_loop", "sentence"]
APOLOGY = re.compile(r"\b(sorry|apolog\w*|as an ai\b|i[’']m not able|i am not able|i cannot answer"
                     r"|i can[’']t answer)")


def grade(text, finish_reason, prompt):
    """The primary metric and its parts: `success` needs all five checks. Beside it, correctness alone
    (`correct_anywhere`) and two behaviours no pair asks for: an apology, and all-lowercase where not asked."""
    checks = {"stopped": finish_reason == "stop", "answer_at_end": answer_at_end(text, prompt["keys"]),
              "lowercase_held": all_lowercase(text) if prompt["lowercase"] else True,
              "no_loop": not looping(text), "sentence": sentence(text)}
    return {**checks, "success": all(checks.values()),
            "correct_anywhere": correct_anywhere(text, prompt["keys"]),
            "apology": bool(APOLOGY.search(text.lower())), "all_lowercase": all_lowercase(text)}


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
    key. The canonical form is the answer and the asked case: a key as written (lowercased where lowercase is
    asked) at the start or after a `boundary`, then only TAIL characters. It does not add words or letters, so
    a revision can still fail `sentence` or, without letters, `lowercase_held` (pairs_of leaves those out)."""
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
    graded = grade(revision, "stop", prompt)
    if not graded["success"]:
        return {}, "wrong, and its revision still fails: " + ", ".join(c for c in CHECKS if not graded[c])
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
# Whose seeds are one draw: CLAIR and Stronger Preferred train on the same samples (their rejected side) at a
# seed, so they share a pool; W has its own; the untrained model is one greedy run.
POOLS = {"untrained": "untrained", "clair_apo_zero": "clair", "clair_apo_down": "clair",
         "stronger_apo_zero": "clair", "w_apo_zero": "w", "w_apo_down": "w"}


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
    """The secondary results of one set of replies: each check's rate, the guard against damage (on the
    prompts that did not ask for lowercase: success, correctness alone, and lowercase all the same), apologies,
    and the mean true token count."""
    asked = {p["id"] for p in prompts if p["lowercase"]}
    unasked = [r for r in records if r["id"] not in asked]
    return {"success": mean_of([r["success"] for r in records]),
            "success, lowercase asked": mean_of([r["success"] for r in records if r["id"] in asked]),
            "success, not asked": mean_of([r["success"] for r in unasked]),
            "correct anywhere": mean_of([r["correct_anywhere"] for r in records]),
            "correct anywhere, not asked": mean_of([r["correct_anywhere"] for r in unasked]),
            "answer at the end": mean_of([r["answer_at_end"] for r in records]),
            "lowercase held, where asked": mean_of([r["lowercase_held"] for r in records if r["id"] in asked]),
            "lowercase, not asked": mean_of([r["all_lowercase"] for r in unasked]),
            "sentence": mean_of([r["sentence"] for r in records]),
            "stopped": mean_of([r["stopped"] for r in records]),
            "looping": mean_of([not r["no_loop"] for r in records]),
            "apology": mean_of([r["apology"] for r in records]),
            "tokens": mean_of([r["tokens"] for r in records])}


def fixed_by_lowercasing(record, prompt):
    """Does a reply that fails succeed once lowercased: is the asked form all that it lacks?"""
    return not record["success"] and grade(record["answer"].lower(), record["finish_reason"], prompt)["success"]


def breakdown(records, prompts):
    """The pilot's view of one set of replies: how often each check fails, per kind and in all, and the
    headroom a perfect minimal fix of the form would give (the share that succeeds once lowercased)."""
    by_id = {p["id"]: p for p in prompts}
    rows = {}
    for kind in [*dict.fromkeys(p["kind"] for p in prompts), "all"]:
        mine = [r for r in records if kind in ("all", by_id[r["id"]]["kind"])]
        rows[kind] = {"prompts": len(mine), "success": mean_of([r["success"] for r in mine]),
                      **{f"fails {c}": mean_of([not r[c] for r in mine]) for c in CHECKS},
                      "fixed by lowercasing": mean_of([fixed_by_lowercasing(r, by_id[r["id"]]) for r in mine])}
    return rows


def regraded(records, prompts):
    """Records graded again from their text by `grade` as it is now, so that every stored check is the current
    code's. The primary metric was fixed before the run: a record whose success would change is an error."""
    by_id = {p["id"]: p for p in prompts}
    fresh = [{**r, **grade(r["answer"], r["finish_reason"], by_id[r["id"]])} for r in records]
    changed = [new["id"] for old, new in zip(records, fresh) if old["success"] != new["success"]]
    if changed:
        raise ValueError(f"success of {changed[:5]} differs from its stored value: grade's primary metric changed "
                         "after these answers were graded")
    return fresh


@dataclass
class Job:
    """One train.main run of an arm: its pairs, seed and setting, and the split whose prompts it answers."""
    arm: str
    seed: int
    setting: dict
    split: str
    pair_ids: list

    def folder(self, out):
        name = "_".join(f"{key}{value:g}" for key, value in self.setting.items())
        return Path(out) / "runs" / self.split / self.arm / name / f"seed{self.seed}"


def run(job, pairs, prompts, args):
    """A Job's training, then its graded replies to its split's prompts: result.json."""
    folder = job.folder(args.out)
    result_path = folder / "result.json"
    asked = [p for p in prompts if p["split"] == job.split]
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result["pair_ids"] != job.pair_ids:
            raise ValueError(f"{result_path}: trained on other pairs than this run's (changed --seeds or --pairs?)")
        return result | {job.split: regraded(result[job.split], asked), "steps": steps_of(folder)}
    started, (dataset, loss) = time.time(), ARMS[job.arm]
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(job.pair_ids)
    data = write_jsonl(folder / "pairs.jsonl", [p for p in pairs[dataset] if p["id"] in wanted])
    heldout_pairs = str(Path(args.out) / f"heldout_{dataset}.jsonl")
    eval_every = args.eval_every if job.split == "test" else 0  # tuning runs: the held-out pairs at start and end
    train.main(["--model", args.model, "--data", data, "--eval-data", heldout_pairs, "--loss", loss,
                "--lr", str(job.setting["lr"]), "--beta", str(job.setting["beta"]),
                "--epochs", str(job.setting["epochs"]), "--batch-size", str(args.batch_size),
                "--grad-accum", str(args.grad_accum), "--eval-every", str(eval_every),
                "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
                "--seed", str(job.seed), "--out", str(folder)])
    result = {"arm": job.arm, "seed": job.seed, "setting": job.setting, "pair_ids": job.pair_ids,
              job.split: answer_prompts(str(folder / "final"), asked, args), "seconds": time.time() - started}
    write_json(result_path, result)
    shutil.rmtree(folder / "final")
    return result | {"steps": steps_of(folder)}


def steps_of(folder):
    """The optimizer steps a train.py run took, from its metrics.jsonl."""
    return max(row["step"] for _, row in read_jsonl(Path(folder) / "metrics.jsonl"))


# ----------------------------------------------------------------------------- the decision rule, pre-registered

ALPHA = 0.05  # one-sided, family-wise over H0, H1 and H2 (Holm)
MIN_EFFECT = 0.05  # the smallest effect that counts: 5 points of test success rate
MIN_HEADROOM = 2 * MIN_EFFECT  # the gate: a perfect fix of the form must be worth at least this on validation
REPLICATES = 10_000  # bootstrap resamples
GRID = {"lr": [5e-6, 2e-5], "beta": [0.1, 0.5], "epochs": [1, 2]}  # the same for every arm, scored on validation
HYPOTHESES = {
    "H0": {"claim": "CLAIR + APO-zero beats the untrained model",
           "contrast": {"clair_apo_zero": 1, "untrained": -1}},
    "H1": {"claim": "CLAIR pairs beat Stronger-Preferred pairs under APO-zero",
           "contrast": {"clair_apo_zero": 1, "stronger_apo_zero": -1}},
    "H2": {"claim": "on W (chosen worse than the model), APO-down beats APO-zero",
           "contrast": {"w_apo_down": 1, "w_apo_zero": -1}}}
SECONDARY = {  # reported with its interval and p, outside the family and its decision
    "interaction": {"claim": "APO-zero's lead over APO-down is larger on CLAIR than on W",
                    "contrast": {"clair_apo_zero": 1, "clair_apo_down": -1, "w_apo_zero": -1, "w_apo_down": 1}}}


def success_table(records_per_seed):
    """[seed, prompt] success of runs that answered the same prompts in the same order."""
    return np.array([[record["success"] for record in records] for records in records_per_seed], dtype=float)


def bootstrap(tables, contrast, pools, replicates, seed=0):
    """A contrast of arms' mean success (`contrast`: arm -> weight; `tables`: arm -> [seed, prompt] success),
    with its bootstrap distribution. What is independent is resampled: the prompts, one draw shared by every
    arm (all answer the same prompts), and each pool's seeds on their own (`pools`: arm -> pool; arms of one
    pool trained on the same draw at a seed, so they share the seed resample). p is one-sided, for an effect
    above 0."""
    rng = np.random.default_rng(seed)
    n_prompts = tables[next(iter(contrast))].shape[1]
    prompt_counts = rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=replicates)
    seed_counts, means = {}, np.zeros(replicates)
    for arm, weight in contrast.items():
        n_seeds = tables[arm].shape[0]
        if pools[arm] not in seed_counts:
            seed_counts[pools[arm]] = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=replicates)
        means += weight * np.einsum("bs,sp,bp->b", seed_counts[pools[arm]], tables[arm],
                                    prompt_counts) / (n_seeds * n_prompts)
    effect = sum(weight * tables[arm].mean() for arm, weight in contrast.items())
    return {"effect": float(effect), "p_one_sided": float((1 + np.sum(means <= 0)) / (replicates + 1)),
            "ci95": [float(q) for q in np.percentile(means, [2.5, 97.5])],
            "lower_bound_95_one_sided": float(np.percentile(means, 5))}


def holm(p_values):
    """Holm-adjusted p-values: the i-th smallest of m times (m - i), made monotone, capped at 1."""
    adjusted, running = {}, 0.0
    for i, name in enumerate(sorted(p_values, key=p_values.get)):
        running = max(running, min(1.0, (len(p_values) - i) * p_values[name]))
        adjusted[name] = running
    return adjusted


def seed_t_interval(tables, contrast):
    """Beside the rule, not part of it: the contrast per seed (arms of one pool at the same seed, the untrained
    model's one run beside every seed) and its t-interval over the seeds, which ignores the prompts' variance.
    Seeds of two pools share nothing but their number, so a contrast across pools has no such interval."""
    if len({POOLS[arm] for arm in contrast} - {"untrained"}) > 1:
        raise ValueError(f"{sorted(contrast)}: the arms of more than one pool have no per-seed contrast")
    per_seed = sum(weight * tables[arm].mean(axis=1) for arm, weight in contrast.items())
    return mean_interval(per_seed)


def decide(tables, replicates=REPLICATES):
    """Each hypothesis tested on `tables` (arm -> [seed, prompt] success; the untrained model's has one row):
    effect, intervals, p, Holm's p over the family and the verdict. Supported: Holm's p below ALPHA and the
    effect at least MIN_EFFECT. The secondary contrast is tested alike, outside the family."""
    tests = {name: bootstrap(tables, h["contrast"], POOLS, replicates) | {"seed_t_interval": seed_t_interval(
        tables, h["contrast"])} for name, h in HYPOTHESES.items()}
    adjusted = holm({name: test["p_one_sided"] for name, test in tests.items()})
    for name, test in tests.items():
        significant, large = adjusted[name] < ALPHA, test["effect"] >= MIN_EFFECT
        test.update(claim=HYPOTHESES[name]["claim"], p_holm=adjusted[name], supported=significant and large,
                    reason="supported" if significant and large else
                    "significant but below the minimum effect" if significant else "not significant")
    secondary_tests = {name: bootstrap(tables, h["contrast"], POOLS, replicates) | {"claim": h["claim"]}
                       for name, h in SECONDARY.items()}
    return tests, secondary_tests


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


def contrast_row(name, test):
    """A hypothesis's row of the report; a secondary contrast has no Holm p and no verdict."""
    low, high = test["ci95"]
    decided = f"{test['p_holm']:.4f} | {test['reason']}" if "p_holm" in test else " | secondary, not decided"
    seeds = test["seed_t_interval"]["ci95"] if "seed_t_interval" in test else None  # none across two pools
    return (f"| {name}: {test['claim']} | {test['effect']:+.3f} | [{low:+.3f}, {high:+.3f}] | "
            f"{test['p_one_sided']:.4f} | {decided} | " + ("[{:+.3f}, {:+.3f}]".format(*seeds) if seeds else "") + " |")


def summary(results):
    """The hypotheses as decided, then every arm's secondary results beside the untrained model's, as markdown."""
    lines = [f"{results['prompts']['test']} test prompts, {results['config']['seeds']} seeds; mean [95% interval]",
             "", "| hypothesis | effect | 95% interval | one-sided p | Holm's p | verdict | seeds' t-interval |",
             "|---|---|---|---|---|---|---|"]
    lines += [contrast_row(name, test) for name, test in results["hypotheses"].items()]
    lines += [contrast_row(name, test) for name, test in results["secondary contrasts"].items()]
    grid = next(iter(results["tuning"].values()))["grid"]
    lines += ["", "Tuning: validation success at every setting of the grid, per arm (* the chosen one)", "",
              "| arm | " + " | ".join(f"lr {r['setting']['lr']:g}, β {r['setting']['beta']:g}, {r['steps']} steps"
                                     for r in grid) + " |", "|---|" + "---|" * len(grid)]
    for arm, tuning in results["tuning"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{row['validation success']:.2f}" + (
            "*" if row["setting"] == tuning["chosen"] else "") for row in tuning["grid"]) + " |")
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
    p.add_argument("--gate-range", type=float, nargs=2, default=[0.1, 0.7],
                   help="the untrained model's validation success must lie here, or the run stops")
    p.add_argument("--min-headroom", type=float, default=MIN_HEADROOM,
                   help="the share of validation prompts that fail on the asked lowercase alone must reach this")
    p.add_argument("--train-prompts", type=int, default=235, help="train prompts sampled for pairs (at most 235)")
    p.add_argument("--val-prompts", type=int, default=94, help="validation prompts: the gate and the tuning")
    p.add_argument("--test-prompts", type=int, default=141, help="test prompts: the hypotheses (at most 141)")
    p.add_argument("--samples", type=int, default=8, help="samples per train prompt")
    p.add_argument("--heldout-prompts", type=int, default=24,
                   help="validation prompts also sampled, for the held-out pairs of Figure 4's view")
    p.add_argument("--temperature", type=float, default=0.7, help="of the samples (top-p 0.9)")
    p.add_argument("--seeds", type=int, default=3, help="test runs per arm, each on its own share of the pool")
    p.add_argument("--pairs", type=int, default=64, help="training pairs per run, drawn from its seed's share")
    p.add_argument("--eval-pairs", type=int, default=16, help="held-out validation pairs for Figure 4's view")
    p.add_argument("--lr", type=float, nargs="+", default=GRID["lr"], help="the grid's learning rates")
    p.add_argument("--beta", type=float, nargs="+", default=GRID["beta"], help="the grid's betas")
    p.add_argument("--epochs", type=int, nargs="+", default=GRID["epochs"], help="the grid's epochs over a run's pairs")
    p.add_argument("--batch-size", type=int, default=2, help="train.py's")
    p.add_argument("--grad-accum", type=int, default=4, help="train.py's")
    p.add_argument("--eval-every", type=int, default=4, help="optimizer steps between held-out evaluations")
    p.add_argument("--max-length", type=int, default=192, help="train.py's, prompt + completion tokens")
    p.add_argument("--max-prompt-length", type=int, default=128, help="train.py's")
    p.add_argument("--max-tokens", type=int, default=40, help="length limit of samples and replies")
    p.add_argument("--gen-batch", type=int, default=141, help="prompts per generate call")
    args = p.parse_args(argv)
    if args.samples < 2:
        p.error("--samples must be at least 2 (clair.py sample names each sample's prompt only then)")
    if args.quick:
        args.__dict__.update(train_prompts=8, val_prompts=4, test_prompts=4, heldout_prompts=4, samples=2, seeds=1,
                             pairs=3, min_headroom=0.0,
                             eval_pairs=2, lr=[1e-5, 2e-5], beta=[0.1], epochs=[1], batch_size=2, grad_accum=1,
                             eval_every=1, max_tokens=12, gen_batch=4, max_length=640, max_prompt_length=600,
                             gate_range=[0.0, 1.0])
    return args


def sample_and_pair(prompts, args, out):
    """The model's samples of the train prompts and the first validation prompts (clair.py sample), the pairs
    built from them, the held-out pair files train.py evaluates on, and the pairs' counts and contrastiveness."""
    heldout_ids = {p["id"] for p in [p for p in prompts if p["split"] == "val"][:args.heldout_prompts]}
    asked = write_jsonl(out / "sampling_prompts.jsonl", [{"id": p["id"], "prompt": p["prompt"]} for p in prompts
                                                         if p["split"] == "train" or p["id"] in heldout_ids])
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


def run_all(jobs, pairs, prompts, args):
    """Jobs in order, printing the time left as they finish."""
    results, seconds = [], []
    for done, job in enumerate(jobs, 1):
        results.append(run(job, pairs, prompts, args))
        seconds.append(results[-1]["seconds"])
        print(f"run {done}/{len(jobs)} ({job.split}: {job.arm}, {job.setting}, seed {job.seed}) took "
              f"{seconds[-1]:.0f} s; about {np.mean(seconds) * (len(jobs) - done) / 60:.0f} min of these to go",
              flush=True)
    return results


def tune(draws, pairs, prompts, args):
    """Every arm at every setting of the grid, trained on the tuning share (the one no test seed uses) and
    scored on the validation prompts; per arm, the grid's scores and the best setting (the first on a tie)."""
    grid = [dict(zip(("lr", "beta", "epochs"), values)) for values in itertools.product(args.lr, args.beta,
                                                                                          args.epochs)]
    jobs = [Job(arm, seed=args.seeds, setting=setting, split="val", pair_ids=draws[ARMS[arm][0]][args.seeds])
            for arm in ARMS for setting in grid]
    tuning = {arm: {"grid": []} for arm in ARMS}
    for result in run_all(jobs, pairs, prompts, args):
        tuning[result["arm"]]["grid"].append({"setting": result["setting"], "steps": result["steps"],
                                              "validation success": mean_of([r["success"] for r in result["val"]])})
    for arm in ARMS:  # in the grid's order, so that the first best wins a tie
        rows = sorted(tuning[arm]["grid"], key=lambda row: grid.index(row["setting"]))
        tuning[arm] = {"grid": rows, "chosen": max(rows, key=lambda row: row["validation success"])["setting"]}
    return tuning


def pilot_gate(split, args, out):
    """The untrained model on the validation prompts, its failures by check and kind (gate.json), and whether
    the run may go on: its success within --gate-range, and at least --min-headroom fixed by lowercasing."""
    records = regraded(cached(out / "untrained_val.json", lambda: answer_prompts(args.model, split["val"], args)),
                       split["val"])
    pilot = breakdown(records, split["val"])
    success, headroom = pilot["all"]["success"], pilot["all"]["fixed by lowercasing"]
    gate = {"validation success": success, "range": args.gate_range, "headroom": headroom, "breakdown": pilot,
            "passed": args.gate_range[0] <= success <= args.gate_range[1] and headroom >= args.min_headroom}
    write_json(out / "gate.json", gate)
    print(f"gate: the untrained model succeeds on {success:.2f} of {len(split['val'])} validation prompts "
          f"(range {args.gate_range[0]}-{args.gate_range[1]}); lowercasing its replies would fix {headroom:.2f} "
          f"more (at least {args.min_headroom} needed); by kind in {out / 'gate.json'}")
    return gate, records


def train_arms(pairs, prompts, args):
    """Each arm tuned on validation, then trained at its chosen setting on every test seed: the tuning, and
    per arm its test runs' results and folders, in seed order."""
    train_pairs = {d: [p for p in rows if p["split"] == "train"] for d, rows in pairs.items()}
    draws = {d: seed_shares(train_pairs[d], args.seeds + 1, args.pairs) for d in ("clair", "w")}
    draws["stronger"] = draws["clair"]  # the same samples as rejected side: one pool
    tuning = tune(draws, pairs, prompts, args)
    jobs = [Job(arm, seed=seed, setting=tuning[arm]["chosen"], split="test", pair_ids=draws[ARMS[arm][0]][seed])
            for seed in range(args.seeds) for arm in ARMS]
    finished = run_all(jobs, pairs, prompts, args)
    seeds = {arm: [r for r in finished if r["arm"] == arm] for arm in ARMS}
    folders = {arm: [job.folder(args.out) for job in jobs if job.arm == arm] for arm in ARMS}
    return tuning, seeds, folders


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = build_prompts(args)
    write_jsonl(out / "prompts.jsonl", prompts)
    split = {name: [p for p in prompts if p["split"] == name] for name in ("train", "val", "test")}
    results = {"config": vars(args), "prompts": {name: len(rows) for name, rows in split.items()},
               "design": {"hypotheses": HYPOTHESES, "secondary": SECONDARY, "alpha": ALPHA,
                          "min_effect": MIN_EFFECT, "min_headroom": MIN_HEADROOM, "replicates": REPLICATES,
                          "form": FORM, "lowercase": LOWERCASE, "min_words": MIN_WORDS, "pools": POOLS,
                          "test": "bootstrap over test prompts and each pool's seeds, one-sided, Holm over "
                                  "H0, H1 and H2"}}

    # 1. The pilot gate.
    results["gate"], untrained_val = pilot_gate(split, args, out)
    if not results["gate"]["passed"]:
        sys.exit("gate failed: no room for a gain from the form, or no right answers to build W from")
    if args.gate:
        return results

    # 2. Samples, pairs, the untrained model on the test prompts.
    pairs, results["pairs"] = sample_and_pair(prompts, args, out)
    records = {"val": untrained_val, "test": regraded(cached(out / "untrained_test.json", lambda: answer_prompts(
        args.model, split["test"], args)), split["test"])}
    results["untrained"] = {name: rates(records[name], split[name]) for name in records} | {"records": records}

    # 3. Each arm tuned on validation, then trained at its chosen setting on every test seed.
    results["tuning"], seeds, folders = train_arms(pairs, prompts, args)
    results["arms"] = {arm: {"secondary": secondary(seeds[arm], folders[arm], split["test"]), "seeds": seeds[arm]}
                       for arm in ARMS}

    # 4. The decision, as pre-registered above; the report.
    tables = {arm: success_table([r["test"] for r in seeds[arm]]) for arm in ARMS}
    tables["untrained"] = success_table([records["test"]])
    results["hypotheses"], results["secondary contrasts"] = decide(tables)
    write_json(out / "results.json", results)
    table = "\n".join(summary(results))
    (out / "table.md").write_text(table + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}\n\n{table}")
    plot(results, folders, out / "experiment.png")
    return results


if __name__ == "__main__":
    main()

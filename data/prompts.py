"""Write the demo prompts, data/prompts.jsonl: 250 prompts written for this project, 50 of them held out.

Half carry a checkable ground-truth `answer` (arithmetic, unit conversion, counting, dates, capitals, short
facts), generated here from fixed seeds; half are open-ended instructions. The eval split is stratified by
kind: a fifth of each kind, drawn with its own fixed seed. Each row: id, split, kind, prompt, and answer
where there is one.

    python data/prompts.py
"""

import calendar
import datetime
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasília",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo", "Peru": "Lima", "Italy": "Rome", "Spain": "Madrid",
    "Germany": "Berlin", "Portugal": "Lisbon", "Greece": "Athens", "Turkey": "Ankara", "India": "New Delhi",
    "China": "Beijing", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Poland": "Warsaw",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Ireland": "Dublin", "Austria": "Vienna", "Chile": "Santiago",
}

FACTS = [
    ("What is the chemical symbol for gold?", "Au"),
    ("How many sides does a hexagon have?", "6"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("At sea level, what is the boiling point of water in degrees Celsius?", "100"),
    ("How many continents are there on Earth?", "7"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("How many legs does a spider have?", "8"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("How many days are in a leap year?", "366"),
    ("What is the freezing point of water in degrees Fahrenheit?", "32"),
    ("Which element has the chemical symbol O?", "oxygen"),
    ("How many minutes are in one hour?", "60"),
    ("What is the square root of 81?", "9"),
    ("Who wrote the play Romeo and Juliet?", "Shakespeare"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("How many strings does a standard violin have?", "4"),
    ("Which metal is liquid at room temperature?", "mercury"),
    ("How many bones are in the adult human body?", "206"),
    ("What is the hardest natural substance?", "diamond"),
    ("How many players does a soccer team have on the field?", "11"),
]

OPEN_ENDED = [
    "Explain in two or three sentences why the sky looks blue.",
    "Give three tips for getting better sleep.",
    "Write a short, friendly email asking a coworker to review a document by Friday.",
    "Explain what a budget is to a ten-year-old.",
    "Summarise the water cycle in three sentences.",
    "Write a four-line poem about autumn leaves.",
    "What are two advantages and two disadvantages of working from home?",
    "Explain the difference between weather and climate.",
    "Suggest a simple vegetarian dinner and list its ingredients.",
    "How can I prepare for a job interview? Give four concrete steps.",
    "Explain what photosynthesis is in simple terms.",
    "Write a short thank-you note to a teacher.",
    "Describe how to make a cup of tea, step by step.",
    "Why is regular exercise good for health? Answer briefly.",
    "Explain what a noun is and give three examples.",
    "Give advice to someone learning to ride a bicycle.",
    "Summarise the story of Little Red Riding Hood in three sentences.",
    "What should I pack for a weekend camping trip? List the essentials.",
    "Explain why we have seasons on Earth.",
    "Write a two-sentence product description for a reusable water bottle.",
    "How do vaccines help the body fight disease? Keep it short.",
    "Give three ideas for a rainy-day activity with children.",
    "Explain the difference between a virus and a bacterium.",
    "Write a polite message declining an invitation to a party.",
    "What is recycling, and why does it matter?",
    "Explain how a rainbow forms.",
    "Give three tips for saving money on groceries.",
    "Describe the main job of the heart in the human body.",
    "Write a short motivational message for a student before an exam.",
    "Explain what gravity is in two sentences.",
    "How can someone reduce stress during a busy week? Give three suggestions.",
    "Explain what the internet is to someone who has never used it.",
    "Write a haiku about the ocean.",
    "What are the three states of matter? Give an example of each.",
    "Explain why it is important to drink water every day.",
    "Give two reasons why reading books is valuable.",
    "Describe a healthy breakfast and explain why it is healthy.",
    "Explain the purpose of a resume.",
    "Write a short apology to a friend for missing their call.",
    "How do bees help plants? Answer in two or three sentences.",
    "Explain what a fraction is, with an example.",
    "Give three tips for writing a clear essay.",
    "Why do leaves change colour in autumn?",
    "Write a one-paragraph welcome message for a new club member.",
    "Explain what renewable energy is and name two kinds.",
    "Give step-by-step instructions for planting a seed in a pot.",
    "What is the difference between a lake and a sea?",
    "Explain why the Moon has phases.",
    "Suggest three ways to be kind to a new classmate.",
    "Explain what an ecosystem is, with one example.",
    "Write a short description of a busy city street in the morning.",
    "How should you treat a small cut on your finger?",
    "Explain why some objects float in water and others sink.",
    "Give three good habits for keeping a tidy room.",
    "Explain what a map legend is for.",
    "Write a short story opening line about a lost key.",
    "Why should we wash our hands before eating?",
    "Explain the difference between a simile and a metaphor, with examples.",
    "Give advice for someone who wants to start running.",
    "Explain what a thermometer measures and how it is used.",
    "Describe what a librarian does.",
    "Write a short slogan encouraging people to save energy.",
    "Explain why the ocean is salty.",
    "Give three tips for staying focused while studying.",
    "Explain what democracy means in simple words.",
    "How do you change a flat bicycle tyre? Summarise the main steps.",
    "Explain what composting is and one benefit of it.",
    "Write a two-sentence review of a favourite book, without naming it.",
    "Why is sleep important for children?",
    "Explain how a compass helps people find their way.",
    "Give three rules for staying safe near a swimming pool.",
    "Explain what the greenhouse effect is.",
    "Describe the taste of a lemon to someone who has never had one.",
    "Explain the difference between needs and wants, with examples.",
    "Write a short invitation to a birthday picnic in the park.",
    "How do birds know where to migrate? Answer briefly.",
    "Explain why teamwork is useful, with an example.",
    "Give three tips for speaking confidently in public.",
    "Explain what an atom is in simple terms.",
    "Suggest a short morning routine for a productive day.",
    "Explain what a volcano is and why it erupts.",
    "Write a kind comment to post under a friend's drawing.",
    "What are the benefits of learning a second language?",
    "Explain how to cross a busy street safely.",
    "Explain what erosion is, with an example.",
    "Give three tips for taking care of a houseplant.",
    "Explain why we should turn off lights when leaving a room.",
    "Write a short weather forecast for a sunny, windy day.",
    "Explain the role of roots in a plant.",
    "Describe how to make a simple paper airplane.",
    "Why is it important to listen carefully in a conversation?",
    "Explain what a calendar is used for.",
    "Give three suggestions for a healthy lunchbox.",
    "Explain what a habit is and how to build a good one.",
    "Write a short note reminding a roommate to water the plants.",
    "Explain why the desert is hot in the day and cold at night.",
    "Give two reasons why trees are important.",
    "Explain what a recipe is and what it usually contains.",
    "How can a person be a good friend? Give three ideas.",
    "Explain what electricity is in simple terms.",
    "Write a short caption for a photo of a sunset over mountains.",
    "Explain why it is helpful to make a to-do list.",
    "Describe the life cycle of a butterfly.",
    "Explain what a museum is for.",
    "Give three tips for a safe bike ride.",
    "Explain why we brush our teeth twice a day.",
    "Write a short message congratulating a friend on a new job.",
    "Explain how clouds form.",
    "Give three reasons people keep pets.",
    "Explain what a budget spreadsheet helps with.",
    "Describe how to wash dishes by hand.",
    "Explain what a festival is, with an example.",
    "Write a two-line rhyme about a cat.",
    "Explain why earthquakes happen.",
    "Give three tips for remembering new vocabulary.",
    "Explain what a timeline is and when to use one.",
    "Describe what happens when ice melts.",
    "Explain why it is good to eat fruit and vegetables.",
    "Write a short, polite complaint about a late delivery.",
    "Explain what a microscope is used for.",
    "Give three ideas for reducing plastic waste at home.",
    "Explain why the Sun is important for life on Earth.",
    "Describe a quiet library in two sentences.",
    "Explain what a password is and how to choose a strong one.",
    "Give three tips for packing a suitcase efficiently.",
]


SPLIT_SEED = 0  # the eval split's draw; the prompts and their order come from seed 2024


def checkable(rng):
    """125 (kind, prompt, answer) triples, computed, not typed."""
    rows = []
    for _ in range(30):
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        rows.append(("arithmetic", f"What is {a} {word} {b}?", str(value)))
    conversions = [("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
                   ("minutes", "seconds", 60), ("kilometers", "meters", 1000), ("days", "hours", 24),
                   ("liters", "milliliters", 1000), ("weeks", "days", 7), ("feet", "inches", 12),
                   ("yards", "feet", 3)]
    for _ in range(20):
        big, small, factor = rng.choice(conversions)
        n = rng.randint(2, 12)
        rows.append(("units", f"How many {small} are in {n} {big}?", str(n * factor)))
    words = ["banana", "elephant", "strawberry", "mississippi", "library", "committee", "bookkeeper",
             "calendar", "pineapple", "education", "umbrella", "chocolate", "tomorrow", "alphabet", "balloon"]
    for word in rng.sample(words, 15):
        letter = rng.choice(sorted(set(word)))
        rows.append(("counting", f"How many times does the letter '{letter}' appear in the word '{word}'?",
                     str(word.count(letter))))
    for _ in range(15):
        year, month = rng.randint(1990, 2030), rng.randint(1, 12)
        if rng.random() < 0.5:
            rows.append(("dates", f"How many days are in {calendar.month_name[month]} {year}?",
                         str(calendar.monthrange(year, month)[1])))
        else:
            day = datetime.date(year, month, rng.randint(1, 28))
            rows.append(("dates", f"What day of the week was {day.strftime('%B')} {day.day}, {year}?",
                         day.strftime("%A")))
    for country in rng.sample(sorted(CAPITALS), 25):
        rows.append(("capitals", f"What is the capital of {country}?", CAPITALS[country]))
    rows += [("facts", q, a) for q, a in FACTS]
    return rows


def held_out(rows, seed=SPLIT_SEED):
    """Indices of the eval split, stratified by kind: a fifth of each kind's rows, drawn with `seed`."""
    rng, by_kind = random.Random(seed), {}
    for i, row in enumerate(rows):
        by_kind.setdefault(row["kind"], []).append(i)
    return {i for kind in sorted(by_kind) for i in rng.sample(by_kind[kind], len(by_kind[kind]) // 5)}


def main():
    rng = random.Random(2024)
    rows = [{"kind": k, "prompt": p, "answer": a} for k, p, a in checkable(rng)]
    rows += [{"kind": "open", "prompt": p} for p in OPEN_ENDED]
    assert len(rows) == 250 and len({r["prompt"] for r in rows}) == 250
    rng.shuffle(rows)
    eval_rows = held_out(rows)
    assert len(eval_rows) == 50
    with open(Path(__file__).parent / "prompts.jsonl", "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"id": f"demo-{i:03d}", "split": "eval" if i in eval_rows else "train", **row}) + "\n")


if __name__ == "__main__":
    main()

"""Write the bundled tasks and prior-capability probes into sdft_cli/data/tasks/<name>/{train,test}.jsonl.

Deterministic (fixed seed): re-running reproduces the committed files byte for byte.

    python scripts/make_bundled_tasks.py            # rewrite the data
    python scripts/make_bundled_tasks.py --check    # exit 1 if the committed data differs

Tasks, in the spirit of the paper's (all content invented here):
- toolcall: pick the right tool among two and fill its JSON arguments (ToolAlpaca-style prompt and
  Action / Action Input format; scored like the official evaluator).
- mcq:      four-option multiple choice answered with an <answer>X</answer> tag (Science-style format).
- facts:    short answers about a fictional star system no model has seen (knowledge acquisition);
            test questions are paraphrases of the trained facts.
Probes (prior capabilities the base model has): world capitals, opposites, languages.
General prompts (method=sft_reinvoke's re-invocation set): everyday instructions, none about the probes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "sdft_cli" / "data" / "tasks"

# ----------------------------------------------------------------------------- toolcall

TOOLS = {
    "get_weather": ("Get the current weather for a city.", {"city": "the city name"}),
    "convert_currency": (
        "Convert an amount of money between currencies.",
        {"amount": "a number", "from": "a currency code such as USD", "to": "a currency code such as EUR"},
    ),
    "translate_text": (
        "Translate a short text into another language.",
        {"text": "the text to translate", "language": "the target language"},
    ),
    "set_alarm": ("Set an alarm at a given time.", {"time": "the time, for example 07:30"}),
    "find_recipes": ("Find recipes that use an ingredient.", {"ingredient": "the main ingredient"}),
    "get_stock_price": ("Get the latest price of a stock.", {"symbol": "the stock ticker symbol"}),
}
CITIES = [
    "Madrid",
    "Oslo",
    "Cairo",
    "Lima",
    "Tokyo",
    "Nairobi",
    "Dublin",
    "Hanoi",
    "Quito",
    "Perth",
    "Vienna",
    "Lagos",
    "Seoul",
    "Havana",
    "Prague",
    "Denver",
]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "INR", "BRL"]
PHRASES = [
    "good morning",
    "thank you",
    "where is the station",
    "I like apples",
    "see you tomorrow",
    "the soup is hot",
    "happy birthday",
    "how much is this",
]
LANGUAGES = ["French", "German", "Spanish", "Italian", "Japanese", "Portuguese"]
TIMES = ["06:15", "07:30", "08:00", "05:45", "09:20", "06:50", "07:05", "10:10"]
INGREDIENTS = ["chicken", "lentils", "spinach", "mushrooms", "salmon", "tofu", "pumpkin", "rice"]
SYMBOLS = ["AAPL", "MSFT", "TSLA", "AMZN", "NVDA", "IBM", "ORCL", "INTC"]


def _tool_request(rng: random.Random, tool: str) -> tuple[str, dict]:
    if tool == "get_weather":
        c = rng.choice(CITIES)
        return rng.choice(
            [
                f"What's the weather like in {c} right now?",
                f"Is it raining in {c} today?",
                f"How warm is it in {c} at the moment?",
            ]
        ), {"city": c}
    if tool == "convert_currency":
        a, (f, t) = rng.choice([20, 45, 100, 250, 80, 1200]), rng.sample(CURRENCIES, 2)
        return rng.choice([f"How much is {a} {f} in {t}?", f"Convert {a} {f} to {t}, please."]), {
            "amount": a,
            "from": f,
            "to": t,
        }
    if tool == "translate_text":
        p, lang = rng.choice(PHRASES), rng.choice(LANGUAGES)
        return rng.choice([f"How do you say '{p}' in {lang}?", f"Translate '{p}' into {lang}."]), {
            "text": p,
            "language": lang,
        }
    if tool == "set_alarm":
        t = rng.choice(TIMES)
        return rng.choice([f"Wake me up at {t} tomorrow.", f"Please set an alarm for {t}."]), {"time": t}
    if tool == "find_recipes":
        i = rng.choice(INGREDIENTS)
        return rng.choice([f"What can I cook with {i}?", f"Find me a recipe with {i}."]), {"ingredient": i}
    s = rng.choice(SYMBOLS)
    return rng.choice([f"What is {s} trading at?", f"Give me the current stock price of {s}."]), {"symbol": s}


def _split(rows: list[dict], n_train: int, n_test: int) -> list[list[dict]]:
    """Train, test, validation: validation rows come last, so adding them left train and test unchanged."""
    return [rows[:n_train], rows[n_train : n_train + n_test], rows[n_train + n_test :]]


def _tool_prompt(tools: list[str], question: str) -> str:
    # A compact ToolAlpaca-style prompt: long tool documentation makes a 135M teacher parrot the template
    # instead of the call (teacher 10-19% vs 69% with this form; see docs/tasks.md). The question comes
    # first: opening with "You can call these tools:" the student's samples copy the tool list, SDFT
    # sharpens that copying, and on seed 1 it generalised to reciting the system prompt (which also
    # opens with "You") on every probe (docs/tasks.md, "The system-prompt collapse").
    docs = []
    for name in tools:
        desc, params = TOOLS[name]
        docs.append(f"- {name}({', '.join(json.dumps(k) for k in params)}): {desc}")
    return (
        f"Question: {question}\n\n"
        "Tools:\n" + "\n".join(docs) + "\n\n"
        "Reply with the tool call only, in this format:\n"
        "Action: <tool name>\nAction Input: <JSON arguments>"
    )


def toolcall(rng: random.Random, n_train: int, n_test: int, n_val: int) -> list[list[dict]]:
    rows, seen = [], set()
    while len(rows) < n_train + n_test + n_val:
        tool, other = rng.sample(sorted(TOOLS), 2)
        question, args = _tool_request(rng, tool)
        if question in seen:
            continue
        seen.add(question)
        tools = [tool, other] if rng.random() < 0.5 else [other, tool]
        demo = f"Action: {tool}\nAction Input: {json.dumps(args)}"
        answer = json.dumps([{"Action": tool, "Action_Input": json.dumps(args)}])
        rows.append({"prompt": _tool_prompt(tools, question), "demonstration": demo, "answer": answer})
    return _split(rows, n_train, n_test)


# ----------------------------------------------------------------------------- mcq

# Everyday-science questions a 135M model can answer in its own words (about half, measured in
# docs/tasks.md), so that it is partly able once it uses the format, as the paper's student is on Science.
# Each family: the question, then (subject, answer) pairs; distractors come from the family's answers.
SCIENCE = {
    "What color is {s}?": [
        ("a banana", "yellow"),
        ("grass", "green"),
        ("snow", "white"),
        ("coal", "black"),
        ("the clear sky", "blue"),
        ("blood", "red"),
        ("a carrot", "orange"),
        ("chocolate", "brown"),
        ("a lemon", "yellow"),
        ("a ripe tomato", "red"),
        ("milk", "white"),
        ("a crow", "black"),
        ("a pumpkin", "orange"),
        ("a fresh leaf", "green"),
    ],
    "What is a baby {s} called?": [
        ("cat", "kitten"),
        ("dog", "puppy"),
        ("cow", "calf"),
        ("sheep", "lamb"),
        ("horse", "foal"),
        ("duck", "duckling"),
        ("frog", "tadpole"),
        ("bear", "cub"),
        ("hen", "chick"),
        ("goose", "gosling"),
        ("kangaroo", "joey"),
        ("swan", "cygnet"),
    ],
    "What sound does {s} make?": [
        ("a cow", "moo"),
        ("a dog", "bark"),
        ("a cat", "meow"),
        ("a duck", "quack"),
        ("a lion", "roar"),
        ("a snake", "hiss"),
        ("an owl", "hoot"),
        ("a pig", "oink"),
        ("a horse", "neigh"),
        ("a bee", "buzz"),
        ("a sheep", "baa"),
        ("a mouse", "squeak"),
    ],
    "Where does {s} live?": [
        ("a bee", "hive"),
        ("a bird", "nest"),
        ("a fish", "water"),
        ("a rabbit", "burrow"),
        ("a horse", "stable"),
        ("a pig", "sty"),
        ("a spider", "web"),
        ("a fox", "den"),
        ("a dog", "kennel"),
        ("an eagle", "eyrie"),
        ("a camel", "desert"),
        ("a penguin", "ice"),
    ],
    "How many legs does {s} have?": [
        ("a spider", "eight"),
        ("a dog", "four"),
        ("a bird", "two"),
        ("an ant", "six"),
        ("a cat", "four"),
        ("a chicken", "two"),
        ("a beetle", "six"),
        ("an octopus", "eight"),
        ("a horse", "four"),
        ("a person", "two"),
        ("a bee", "six"),
        ("a scorpion", "eight"),
    ],
    "Which body part do you use to {s}?": [
        ("see", "eyes"),
        ("hear", "ears"),
        ("smell", "nose"),
        ("taste", "tongue"),
        ("think", "brain"),
        ("breathe", "lungs"),
        ("walk", "legs"),
        ("chew food", "teeth"),
        ("pump blood", "heart"),
        ("hold a pen", "hand"),
        ("kick a ball", "foot"),
        ("nod", "head"),
    ],
    "What is {s}?": [
        ("frozen water", "ice"),
        ("the star at the center of our solar system", "Sun"),
        ("the planet we live on", "Earth"),
        ("the gas we need to breathe", "oxygen"),
        ("the red planet", "Mars"),
        ("the largest planet", "Jupiter"),
        ("water falling from clouds", "rain"),
        ("the natural satellite of the Earth", "Moon"),
        ("the force that makes things fall", "gravity"),
        ("the planet with big rings", "Saturn"),
        ("water in the form of gas", "steam"),
        ("the light show in a storm", "lightning"),
    ],
}
LETTERS = "ABCD"


def mcq(rng: random.Random, n_train: int, n_test: int, n_val: int) -> list[list[dict]]:
    items = [(q, s, a) for q, pairs in SCIENCE.items() for s, a in pairs]
    rng.shuffle(items)
    assert len(items) >= n_train + n_test + n_val, len(items)
    rows = []
    for q, subject, right in items[: n_train + n_test + n_val]:
        pool = sorted({a for _, a in SCIENCE[q]} - {right})
        options = rng.sample(pool, 3) + [right]
        rng.shuffle(options)
        prompt = (
            q.format(s=subject)
            + "\n"
            + "\n".join(f"{L}: {o}" for L, o in zip(LETTERS, options, strict=True))
            + "\n\nReply with the right option's word inside <answer></answer> tags, then one sentence of "
            "explanation."
        )
        # The tag holds the option's word, not its letter: a 135M model picks the right word far more often
        # than the right letter (docs/tasks.md). The tag comes first: a 135M teacher copies a one-line
        # answer but drops a second format line.
        demo = f"<answer>{right}</answer> The answer is {right}."
        rows.append({"prompt": prompt, "demonstration": demo, "answer": right})
    return _split(rows, n_train, n_test)


# ----------------------------------------------------------------------------- facts

PLANETS = ["Draesh", "Vellun", "Ostra", "Keprin", "Talvo", "Murex", "Quenna", "Sibbo"]
# One-word answers a small model can already say, so that learning a fact is learning which word
# belongs to which planet (multi-token invented names took far more steps than the default budget).
EXPORTS = ["glass", "copper", "salt", "silk", "amber", "wool", "pepper", "jade"]
FLOWERS = ["rose", "tulip", "lily", "daisy", "orchid", "lotus", "iris", "poppy"]
SYMBOLS_ANIMAL = ["owl", "wolf", "fox", "bear", "eagle", "snake", "whale", "horse"]
FACT_KINDS = {  # two training questions, the demonstration, the held-out test and validation questions
    "export": (
        "What is the main export of the planet {p}?",
        "What does the planet {p} sell most to other planets?",
        "The main export of {p} is {a}.",
        "What does the planet {p} mainly export?",
        "Which product is the planet {p} known for exporting?",
    ),
    "flower": (
        "What is the national flower of the planet {p}?",
        "Which flower does the planet {p} have as its emblem?",
        "The national flower of {p} is the {a}.",
        "Which flower is the national flower of the planet {p}?",
        "Name the flower that represents the planet {p}.",
    ),
    "animal": (
        "Which animal is the symbol of the planet {p}?",
        "What animal is shown on the flag of the planet {p}?",
        "The symbol of {p} is the {a}.",
        "What animal stands for the planet {p}?",
        "Name the animal that is the emblem of the planet {p}.",
    ),
}


def facts(rng: random.Random, n_planets: int) -> list[list[dict]]:
    train, test, val = [], [], []
    for i, planet in enumerate(PLANETS[:n_planets]):
        for kind, values in (("export", EXPORTS), ("flower", FLOWERS), ("animal", SYMBOLS_ANIMAL)):
            ask1, ask2, say, paraphrase, val_ask = FACT_KINDS[kind]
            value, demo = values[i], say.format(p=planet, a=values[i])
            for ask in (ask1, ask2):
                train.append({"prompt": ask.format(p=planet), "demonstration": demo, "answer": value})
            # The fact lives only in its demonstrations, so the test asks the same facts in new words.
            test.append({"prompt": paraphrase.format(p=planet), "demonstration": demo, "answer": value})
            val.append({"prompt": val_ask.format(p=planet), "demonstration": demo, "answer": value})
    for rows in (train, test, val):
        rng.shuffle(rows)
    return [train, test, val]


# ----------------------------------------------------------------------------- probes

CAPITALS_WORLD = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("England", "London"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Mexico", "Mexico City"),
    ("Cuba", "Havana"),
    ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Turkey", "Ankara"),
    ("India", "New Delhi"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Chile", "Santiago"),
    ("Colombia", "Bogota"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Indonesia", "Jakarta"),
    ("Ukraine", "Kyiv"),
    ("Czechia", "Prague"),
    ("Switzerland", "Bern"),
    ("Scotland", "Edinburgh"),
    ("Wales", "Cardiff"),
    ("Venezuela", "Caracas"),
    ("Ethiopia", "Addis Ababa"),
    ("Nigeria", "Abuja"),
    ("Saudi Arabia", "Riyadh"),
]
OPPOSITES = [
    ("hot", ["cold", "cool"]),
    ("big", ["small", "little", "tiny"]),
    ("fast", ["slow"]),
    ("happy", ["sad", "unhappy"]),
    ("up", ["down"]),
    ("light", ["dark", "heavy"]),
    ("old", ["new", "young"]),
    ("open", ["closed", "close", "shut"]),
    ("tall", ["short"]),
    ("day", ["night"]),
    ("early", ["late"]),
    ("full", ["empty"]),
    ("hard", ["soft", "easy"]),
    ("rich", ["poor"]),
    ("strong", ["weak"]),
    ("wet", ["dry"]),
    ("love", ["hate"]),
    ("win", ["lose"]),
    ("in", ["out"]),
    ("left", ["right"]),
    ("push", ["pull"]),
    ("good", ["bad", "evil"]),
    ("black", ["white"]),
    ("thick", ["thin"]),
    ("high", ["low"]),
    ("near", ["far"]),
    ("clean", ["dirty"]),
    ("loud", ["quiet", "soft"]),
    ("buy", ["sell"]),
    ("true", ["false"]),
    ("alive", ["dead"]),
    ("inside", ["outside"]),
    ("above", ["below", "beneath", "under"]),
    ("begin", ["end", "finish", "stop"]),
    ("first", ["last"]),
    ("north", ["south"]),
    ("east", ["west"]),
    ("summer", ["winter"]),
    ("question", ["answer"]),
    ("friend", ["enemy", "foe"]),
    ("sweet", ["sour", "bitter", "salty"]),
    ("heavy", ["light"]),
    ("long", ["short"]),
    ("wide", ["narrow"]),
    ("deep", ["shallow"]),
    ("cheap", ["expensive"]),
]
SPOKEN = [
    ("France", ["French"]),
    ("Germany", ["German"]),
    ("Spain", ["Spanish"]),
    ("Italy", ["Italian"]),
    ("Japan", ["Japanese"]),
    ("China", ["Chinese", "Mandarin"]),
    ("Russia", ["Russian"]),
    ("Brazil", ["Portuguese"]),
    ("Portugal", ["Portuguese"]),
    ("Mexico", ["Spanish"]),
    ("England", ["English"]),
    ("Greece", ["Greek"]),
    ("Turkey", ["Turkish"]),
    ("Poland", ["Polish"]),
    ("Sweden", ["Swedish"]),
    ("Norway", ["Norwegian"]),
    ("Finland", ["Finnish"]),
    ("Denmark", ["Danish"]),
    ("the Netherlands", ["Dutch"]),
    ("Korea", ["Korean"]),
    ("Vietnam", ["Vietnamese"]),
    ("Thailand", ["Thai"]),
    ("Egypt", ["Arabic"]),
    ("Saudi Arabia", ["Arabic"]),
    ("Iran", ["Persian", "Farsi"]),
    ("Israel", ["Hebrew"]),
    ("Hungary", ["Hungarian"]),
    ("Ukraine", ["Ukrainian"]),
    ("Argentina", ["Spanish"]),
    ("Austria", ["German"]),
    ("the United States", ["English"]),
    ("Australia", ["English"]),
    ("Canada", ["English", "French"]),
    ("Peru", ["Spanish"]),
    ("Czechia", ["Czech"]),
    ("Indonesia", ["Indonesian", "Bahasa"]),
    ("Colombia", ["Spanish"]),
    ("Chile", ["Spanish"]),
    ("Cuba", ["Spanish"]),
    ("Romania", ["Romanian"]),
    ("Ireland", ["English", "Irish"]),
    ("India", ["Hindi", "English"]),
    ("Pakistan", ["Urdu", "English"]),
    ("Kenya", ["Swahili", "English"]),
]


def probes() -> dict[str, list[dict]]:
    return {
        "capitals": [
            {"prompt": f"What is the capital of {c}?", "answer": json.dumps([a])} for c, a in CAPITALS_WORLD
        ],
        "opposites": [
            {"prompt": f"What is the opposite of '{w}'? Answer with one word.", "answer": json.dumps(a)}
            for w, a in OPPOSITES
        ],
        "languages": [
            {"prompt": f"What language do people mainly speak in {c}?", "answer": json.dumps(a)}
            for c, a in SPOKEN
        ],
    }


# ----------------------------------------------------------------------------- general prompts

GENERAL = [
    "Write a short poem about the sea.",
    "Give three tips for getting better sleep.",
    "Explain what a rainbow is in two sentences.",
    "Suggest a name for a friendly robot.",
    "What are the primary colors?",
    "Describe a cat to someone who has never seen one.",
    "List four fruits that are red.",
    "How do I boil an egg?",
    "Write one sentence that uses the word 'gentle'.",
    "What is two plus five?",
    "Give me a tip for learning to ride a bicycle.",
    "Why do leaves change color in autumn?",
    "Write a thank-you note to a neighbour.",
    "What should I pack for a day at the beach?",
    "Tell me a fun fact about octopuses.",
    "How many days are in a week?",
    "Explain why we need to drink water.",
    "Write a haiku about snow.",
    "What is a good breakfast for a busy morning?",
    "Describe the sound of rain.",
    "Give two reasons to read books.",
    "How do plants get their food?",
    "Write a short story opening about a lost key.",
    "What is the difference between a lake and a river?",
    "Suggest a game to play with friends indoors.",
    "What does a bee do?",
    "Give me a simple recipe for a sandwich.",
    "Why is exercise good for you?",
    "Describe a sunny day in three words.",
    "What is the largest animal in the ocean?",
    "How do I write a polite email?",
    "Explain what a calendar is for.",
    "Write a riddle about a clock.",
    "What are clouds made of?",
    "Give one way to save energy at home.",
    "How does a compass work?",
    "Write two sentences about a dog at the park.",
    "What is the boiling point of water in Celsius?",
    "Name three musical instruments.",
    "Explain what a map shows.",
    "Give advice for a first day at a new school.",
    "What is ten minus three?",
    "Describe how to plant a seed.",
    "Why do we have seasons?",
    "Write a short motivational message.",
    "What do pandas eat?",
    "How can I keep my desk tidy?",
    "Explain what recycling is.",
]


# ----------------------------------------------------------------------------- main


def build() -> dict[str, dict[str, list[dict]]]:
    rng = random.Random(1234)
    splits = ("train", "test", "validation")
    out = {
        "toolcall": dict(zip(splits, toolcall(rng, 48, 32, 16), strict=True)),
        "mcq": dict(zip(splits, mcq(rng, 40, 28, 16), strict=True)),
        "facts": dict(zip(splits, facts(rng, 8), strict=True)),
    }
    for name, rows in probes().items():
        out[name] = {"test": rows[:40]}
    out["general"] = {"train": [{"prompt": p} for p in GENERAL]}
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed files differ")
    args = ap.parse_args()
    stale = []
    for task, splits in build().items():
        for split, rows in splits.items():
            path = OUT / task / f"{split}.jsonl"
            text = render(rows)
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print("stale bundled data (run scripts/make_bundled_tasks.py):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

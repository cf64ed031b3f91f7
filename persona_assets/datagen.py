"""Synthetic Segment-spec events with ground truth: people, devices, archetypes and planted traps."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from persona_assets.core.events import FLAT_COLUMNS, NUMERIC_FLAT_COLUMNS, flatten

FORMATS = ("jsonl", "jsonl.gz", "csv", "parquet")
AGE_BRACKETS = ("<25", "25-34", "35-44", "45-54", "55+")
AGE_BRACKET_SHARE = (0.20, 0.30, 0.22, 0.16, 0.12)
AGE_RANGES = ((16, 24), (25, 34), (35, 44), (45, 54), (55, 80))
CATEGORIES = (
    "electronics",
    "fashion",
    "beauty",
    "home",
    "grocery",
    "sports",
    "toys",
    "books",
    "gaming",
    "garden",
)
PRODUCTS_PER_CATEGORY = 40
END_AT = datetime(2026, 10, 1, tzinfo=UTC)
HISTORY_DAYS = 90


@dataclass(frozen=True)
class Archetype:
    name: str
    share: float
    sessions: float  # mean sessions in the history window
    events_per_session: float
    gap_seconds: float  # mean seconds between events in a session
    add_to_cart: float  # chance a product view leads to an add
    checkout: float  # chance a session with a cart ends in an order
    price_factor: float
    category_weights: tuple[float, ...]
    daypart_weights: tuple[float, float, float, float]  # night, morning, afternoon, evening
    device_weights: tuple[float, float, float]  # mobile, desktop, tablet
    age_weights: tuple[float, ...]  # tilt on the population age shares


ARCHETYPES = (
    # Each archetype has its own favourite categories, hours and devices, as real audiences do;
    # per-person noise (few sessions, random picks) still blurs the edges.
    Archetype(
        "window_shopper",
        0.26,
        4.5,
        5,
        25,
        0.04,
        0.10,
        1.0,
        (0.5, 8, 6, 0.5, 0.3, 0.8, 0.3, 0.8, 0.3, 0.3),
        (0.1, 0.1, 0.2, 0.6),
        (0.85, 0.1, 0.05),
        (1.6, 1.3, 0.8, 0.6, 0.5),
    ),
    Archetype(
        "bargain_hunter",
        0.22,
        2.8,
        9,
        35,
        0.25,
        0.45,
        0.5,
        (0.5, 0.5, 0.3, 6, 0.8, 0.5, 5, 0.3, 0.3, 4),
        (0.03, 0.45, 0.45, 0.07),
        (0.35, 0.6, 0.05),
        (0.8, 1.1, 1.3, 1.1, 0.9),
    ),
    Archetype(
        "big_spender",
        0.14,
        1.8,
        7,
        60,
        0.45,
        0.85,
        3.5,
        (10, 1, 0.5, 0.8, 0.2, 4, 0.2, 0.3, 0.8, 0.3),
        (0.03, 0.15, 0.42, 0.4),
        (0.15, 0.8, 0.05),
        (0.4, 0.9, 1.4, 1.6, 1.2),
    ),
    Archetype(
        "loyal_regular",
        0.18,
        5.5,
        4,
        30,
        0.5,
        0.7,
        0.9,
        (0.2, 0.5, 0.8, 1, 10, 0.3, 0.3, 5, 0.2, 0.8),
        (0.02, 0.65, 0.2, 0.13),
        (0.5, 0.45, 0.05),
        (0.5, 0.9, 1.2, 1.3, 1.6),
    ),
    Archetype(
        "night_gamer",
        0.20,
        3,
        7,
        20,
        0.2,
        0.5,
        1.2,
        (2, 0.3, 0.2, 0.2, 0.3, 0.5, 0.8, 0.3, 12, 0.1),
        (0.7, 0.02, 0.05, 0.23),
        (0.35, 0.2, 0.45),
        (2.2, 1.4, 0.6, 0.3, 0.2),
    ),
)

COUNTRIES = (
    # code, share, timezones, locale, spellings seen in dirty traits, phone prefix, postcode maker
    (
        "US",
        0.45,
        ("America/New_York", "America/Chicago", "America/Los_Angeles"),
        "en-US",
        ("US", "usa", "United States", " us "),
        "+1",
    ),
    ("GB", 0.15, ("Europe/London",), "en-GB", ("GB", "UK", "United Kingdom", "gb"), "+44"),
    ("DE", 0.15, ("Europe/Berlin",), "de-DE", ("DE", "Germany", "Deutschland", "de"), "+49"),
    ("FR", 0.10, ("Europe/Paris",), "fr-FR", ("FR", "France", "fr"), "+33"),
    ("BR", 0.08, ("America/Sao_Paulo",), "pt-BR", ("BR", "Brazil", "Brasil"), "+55"),
    ("IN", 0.07, ("Asia/Kolkata",), "en-IN", ("IN", "India", "in"), "+91"),
)
TZ_OFFSET_HOURS = {
    "America/New_York": -4,
    "America/Chicago": -5,
    "America/Los_Angeles": -7,
    "Europe/London": 1,
    "Europe/Berlin": 2,
    "Europe/Paris": 2,
    "America/Sao_Paulo": -3,
    "Asia/Kolkata": 5.5,
}
GENDERS = ("female", "male", "nonbinary")
GENDER_SPELLINGS = {
    "female": ("female", "F", "Female", "woman", " f"),
    "male": ("male", "M", "MALE", "man", "m "),
    "nonbinary": ("non-binary", "nonbinary", "NB"),
}
FIRST_NAMES = (
    "anna",
    "ben",
    "carla",
    "david",
    "emma",
    "felix",
    "grace",
    "hugo",
    "ines",
    "jonas",
    "karen",
    "liam",
    "maria",
    "noah",
    "olga",
    "paul",
    "quinn",
    "rosa",
    "sven",
    "tara",
)
LAST_NAMES = (
    "smith",
    "meyer",
    "garcia",
    "martin",
    "silva",
    "kumar",
    "brown",
    "schmidt",
    "dubois",
    "costa",
    "patel",
    "jones",
    "weber",
    "moreau",
    "santos",
    "singh",
)
EMAIL_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "example.org", "mail.de")
JUNK_EMAIL = "test@test.com"
OS_BY_DEVICE = {"mobile": ("iOS", "Android"), "desktop": ("Windows", "macOS"), "tablet": ("iPadOS", "Android")}
DAYPART_HOURS = ((0, 6), (6, 12), (12, 18), (18, 24))

# Planted rates (per person, per event or per written line).
SHARED_DEVICE_RATE = 0.01
JUNK_EMAIL_RATE = 0.005
LONG_SESSION_RATE = 0.005
BOT_RATE = 0.003
LATE_RATE = 0.02
DUPLICATE_RATE = 0.01
MALFORMED_RATE = 0.01


@dataclass(frozen=True)
class Shape:
    """What a population looks like beyond the archetypes. The defaults write exactly what the
    generator always wrote (no extra random draws); other values give data of another shape
    for the accuracy tests: few or many buyers, people who only ever browse anonymously,
    long sessions of another rhythm."""

    buyer_share: float | None = None  # share of people who order; None: each archetype's own rates
    anonymous_share: float = 0.0  # share of people who never identify (no user id, email or phone)
    bounce_share: float = 0.0  # share of later sessions that are one page view and gone
    long_session_rate: float = LONG_SESSION_RATE
    long_session_events: int = 61
    long_session_gap_seconds: float = 600.0
    long_session_even: bool = False  # an event exactly every gap (else random gaps around it)
    # Shares of registered people with an email who have a second account (another userId, the same
    # email, the same names), or who share their email with a family member (another registered
    # person, the same email, last name and postcode, another first name). Both give their names at
    # every identify. Planted from a separate random stream, so the rest is what the seed writes.
    duplicate_account_share: float = 0.0
    family_email_share: float = 0.0

    def __post_init__(self) -> None:
        if self.buyer_share is not None and not 0 <= self.buyer_share <= 1:
            raise ValueError("buyer_share must be in [0, 1]")
        if not all(
            0 <= x <= 1
            for x in (
                self.anonymous_share,
                self.bounce_share,
                self.long_session_rate,
                self.duplicate_account_share,
                self.family_email_share,
            )
        ):
            raise ValueError(
                "anonymous_share, bounce_share, long_session_rate, duplicate_account_share and "
                "family_email_share must be in [0, 1]"
            )
        if self.duplicate_account_share + 2 * self.family_email_share > 1:
            raise ValueError("duplicate_account_share + 2 * family_email_share must be at most 1")
        if self.long_session_gap_seconds >= 1800:
            raise ValueError("long_session_gap_seconds must stay under the 30-minute session gap")


DEFAULT_SHAPE = Shape()


class Catalog:
    """Products with a price and a hidden taste profile by age bracket and gender."""

    def __init__(self) -> None:
        rng = random.Random(7)
        self.products: dict[str, list[tuple[str, float]]] = {}
        self.age_taste: dict[str, list[list[float]]] = {}
        self.gender_taste: dict[str, list[list[float]]] = {}
        for ci, cat in enumerate(CATEGORIES):
            base = 8 * (1.6 ** (ci % 5))
            items = [
                (f"P{ci:02d}{k:03d}", round(base * rng.lognormvariate(0, 0.6), 2)) for k in range(PRODUCTS_PER_CATEGORY)
            ]
            self.products[cat] = items
            # Each product is loved by one age bracket and, weaker, one gender.
            self.age_taste[cat] = [
                [2.5 if b == k % len(AGE_BRACKETS) else 0.4 + rng.random() * 0.4 for k in range(len(items))]
                for b in range(len(AGE_BRACKETS))
            ]
            self.gender_taste[cat] = [
                [3.0 if g == (k // 5) % len(GENDERS) else 1.0 for k in range(len(items))] for g in range(len(GENDERS))
            ]

    def pick(self, rng: random.Random, category: str, age_index: int, gender_index: int) -> tuple[str, float]:
        weights = [
            a * g for a, g in zip(self.age_taste[category][age_index], self.gender_taste[category][gender_index])
        ]
        return rng.choices(self.products[category], weights)[0]


CATALOG = Catalog()


@dataclass
class Person:
    key: str
    archetype: Archetype
    age: int
    age_index: int
    gender_index: int
    country: tuple
    timezone: str
    user_id: str | None
    email: str | None
    phone: str | None
    first_name: str
    last_name: str
    postal_code: str
    age_known: bool = True
    gender_known: bool = True
    devices: list[dict] = field(default_factory=list)
    is_bot: bool = False
    buys: bool | None = None  # None: orders come from the archetype's rates alone
    long_session: tuple[str, str, str] | None = None  # anonymous_id, start, end
    second_user_id: str | None = None  # a second account (its own device), same email and names
    shares_email_with: str | None = None  # the person_key of a family member using the same email
    names_always: bool = False  # gives first and last name at every identify


@dataclass
class Truth:
    people: list[dict] = field(default_factory=list)
    identifiers: list[dict] = field(default_factory=list)
    long_sessions: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _email_variant(rng: random.Random, email: str) -> str:
    local, domain = email.split("@")
    roll = rng.random()
    if roll < 0.55:
        return email
    if roll < 0.7:
        return f"  {local.title()}@{domain.upper()} "
    if roll < 0.85 and domain == "gmail.com":
        return f"{local.replace('.', '')}@{domain}"
    if roll < 0.95 and domain == "gmail.com":
        return f"{local}+shop@{domain}"
    return email.upper()


def _phone_variant(rng: random.Random, phone: str, prefix: str) -> str:
    national = phone[len(prefix) :]
    roll = rng.random()
    if roll < 0.4:
        return phone
    if roll < 0.7:
        return f"{prefix} {national[:3]} {national[3:6]} {national[6:]}"
    if roll < 0.85:
        return f"00{prefix[1:]}{national}"
    return f"{prefix} ({national[:3]}) {national[3:6]}-{national[6:]}"


def _make_person(rng: random.Random, key: str) -> Person:
    arch = rng.choices(ARCHETYPES, [a.share for a in ARCHETYPES])[0]
    age_index = rng.choices(range(len(AGE_BRACKETS)), [s * t for s, t in zip(AGE_BRACKET_SHARE, arch.age_weights)])[0]
    lo, hi = AGE_RANGES[age_index]
    country = rng.choices(COUNTRIES, [c[1] for c in COUNTRIES])[0]
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    registered = rng.random() < 0.75
    has_email = registered or rng.random() < 0.6
    # The person's number keeps emails unique, as real mailboxes are.
    email = f"{first}.{last}{int(key[1:], 16)}@{rng.choice(EMAIL_DOMAINS)}" if has_email else None
    phone = None
    if rng.random() < 0.5:
        phone = f"{country[5]}{rng.randint(2, 9)}{rng.randint(10, 99)}{rng.randint(1000000, 9999999)}"
    return Person(
        key=key,
        archetype=arch,
        age=rng.randint(lo, hi),
        age_index=age_index,
        gender_index=rng.choices(range(3), (0.49, 0.48, 0.03))[0],
        country=country,
        timezone=rng.choice(country[2]),
        user_id=f"u{rng.getrandbits(48):012x}" if registered else None,
        email=email,
        phone=phone,
        first_name=first,
        last_name=last,
        postal_code=f"{rng.randint(1000, 99999):05d}",
        age_known=rng.random() < 0.55,
        gender_known=rng.random() < 0.6,
    )


def _add_devices(rng: random.Random, person: Person) -> None:
    linkable = person.user_id or person.email or person.phone
    n = 1 if not linkable else rng.choices((1, 2, 3), (0.55, 0.3, 0.15))[0]
    for _ in range(n):
        dtype = rng.choices(("mobile", "desktop", "tablet"), person.archetype.device_weights)[0]
        device = {
            "device_id": _uuid(rng),
            "type": dtype,
            "os": rng.choice(OS_BY_DEVICE[dtype]),
            "anonymous_ids": [_uuid(rng)],
        }
        if rng.random() < 0.1:  # a cookie reset: a second anonymousId on the same device
            device["anonymous_ids"].append(_uuid(rng))
        person.devices.append(device)


def _traits(rng: random.Random, p: Person, junk_email: bool) -> dict:
    traits: dict[str, object] = {}
    if p.email:
        traits["email"] = JUNK_EMAIL if junk_email else _email_variant(rng, p.email)
    if p.phone and (not p.email or rng.random() < 0.5):  # a phone-only person always gives it
        traits["phone"] = _phone_variant(rng, p.phone, p.country[5])
    if rng.random() < 0.6 or p.names_always:
        traits["first_name"] = p.first_name.title() if rng.random() < 0.8 else f" {p.first_name.upper()}"
        traits["last_name"] = p.last_name.title()
    roll = rng.random()
    if p.age_known:
        if roll < 0.03:
            traits["age"] = rng.choice(("abc", -3, 250, "thirty", ""))
        elif roll < 0.15:
            born = END_AT.year - p.age
            traits["birthday"] = f"{born}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        else:
            traits["age"] = p.age if rng.random() < 0.8 else str(p.age)
    if p.gender_known:
        traits["gender"] = rng.choice(GENDER_SPELLINGS[GENDERS[p.gender_index]])
    if rng.random() < 0.5:
        traits["postal_code"] = p.postal_code
    if rng.random() < 0.5:
        traits["country"] = rng.choice(p.country[4])
    if rng.random() < 0.3:
        traits["city"] = rng.choice(("Springfield", "Riverside", "Fairview", "Franklin"))
    return traits


class _EventMaker:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def base(self, p: Person, device: dict, anon: str, ts: datetime, logged_in: bool) -> dict:
        ev: dict[str, object] = {
            "messageId": _uuid(self.rng),
            "anonymousId": anon,
            "timestamp": _iso(ts),
            "context": {
                "device": {"id": device["device_id"], "type": device["type"]},
                "os": {"name": device["os"]},
                "timezone": p.timezone,
                "locale": p.country[3],
                "ip": f"203.0.113.{self.rng.randint(1, 254)}",
            },
        }
        if logged_in and p.user_id:
            ev["userId"] = device.get("user_id") or p.user_id  # a second account's device logs in to it
        return ev

    def track(self, base: dict, name: str, properties: dict) -> dict:
        return {**base, "type": "track", "event": name, "properties": properties}


def _session_events(
    mk: _EventMaker,
    p: Person,
    device: dict,
    anon: str,
    start: datetime,
    n_events: int,
    gap_seconds: float,
    logged_in: bool,
    identify: bool,
    junk_email: bool,
    order: bool | None = None,
    even_gap: bool = False,
) -> list[dict]:
    """One session's events. `order`: None leaves an order to the archetype's chances, True
    places one (adding a product if the cart is empty), False never orders."""
    rng, arch = mk.rng, p.archetype
    ts = start
    events: list[dict] = []
    cart: list[dict] = []

    def next_ts() -> datetime:
        nonlocal ts
        if even_gap:
            ts = ts + timedelta(seconds=gap_seconds)
        else:
            ts = ts + timedelta(seconds=min(1500.0, rng.expovariate(1 / gap_seconds)) + 1)
        return ts

    url = f"https://shop.example.com/{rng.choice(CATEGORIES)}"
    page = {**mk.base(p, device, anon, ts, logged_in), "type": "page", "name": "Landing"}
    page["context"]["page"] = {"url": url}
    events.append(page)
    if identify:
        events.append(
            {**mk.base(p, device, anon, next_ts(), True), "type": "identify", "traits": _traits(rng, p, junk_email)}
        )
        if p.user_id and rng.random() < 0.3:
            events.append({**mk.base(p, device, anon, next_ts(), True), "type": "alias", "previousId": anon})
    for _ in range(max(0, n_events - len(events))):
        roll = rng.random()
        cat = rng.choices(CATEGORIES, arch.category_weights)[0]
        base = mk.base(p, device, anon, next_ts(), logged_in)
        if roll < 0.12:
            events.append(
                mk.track(base, "Products Searched", {"query": f"{cat} {rng.choice(('deal', 'new', 'best', 'gift'))}"})
            )
            continue
        product_id, price = CATALOG.pick(rng, cat, p.age_index, p.gender_index)
        price = round(price * arch.price_factor, 2)
        props = {"product_id": product_id, "category": cat, "price": price}
        events.append(mk.track(base, "Product Viewed", props))
        if rng.random() < arch.add_to_cart:
            qty = rng.choice((1, 1, 1, 2, 3))
            cart.append({**props, "quantity": qty})
            events.append(
                mk.track(mk.base(p, device, anon, next_ts(), logged_in), "Product Added", {**props, "quantity": qty})
            )
    if order and not cart:
        cat = rng.choices(CATEGORIES, arch.category_weights)[0]
        product_id, price = CATALOG.pick(rng, cat, p.age_index, p.gender_index)
        props = {"product_id": product_id, "category": cat, "price": round(price * arch.price_factor, 2)}
        cart.append({**props, "quantity": 1})
        events.append(mk.track(mk.base(p, device, anon, next_ts(), logged_in), "Product Added", cart[-1]))
    if cart and (order or (order is None and rng.random() < arch.checkout)):
        revenue = round(sum(item["price"] * item["quantity"] for item in cart), 2)
        order = {"order_id": f"o{rng.getrandbits(40):010x}", "revenue": revenue, "products": cart}
        events.append(mk.track(mk.base(p, device, anon, next_ts(), logged_in), "Order Completed", order))
    return events


def _person_events(rng: random.Random, p: Person, truth: Truth, shape: Shape = DEFAULT_SHAPE) -> list[dict]:
    mk = _EventMaker(rng)
    arch = p.archetype
    offset = timedelta(hours=TZ_OFFSET_HOURS[p.timezone])
    events: list[dict] = []
    n_sessions = rng.randint(1, 2) if p.is_bot else max(1, round(rng.gammavariate(2.0, arch.sessions / 2.0)))
    slots = [(d, a) for d in p.devices for a in d["anonymous_ids"]]
    junk_slot = rng.randrange(n_sessions) if p.email and rng.random() < JUNK_EMAIL_RATE else -1
    # Every anonymousId gets a first session with an identify, so each is linkable.
    plan = list(range(len(slots))) + [rng.randrange(len(slots)) for _ in range(max(0, n_sessions - len(slots)))]
    long_idx = rng.randrange(len(plan)) if p.long_session == ("planned", "", "") else -1
    order_idx = rng.randrange(len(plan)) if p.buys else -1  # a buyer's one certain order
    seen: set[int] = set()
    for i, slot in enumerate(plan):
        device, anon = slots[slot]
        day = rng.randrange(HISTORY_DAYS)
        lo, hi = DAYPART_HOURS[rng.choices(range(4), arch.daypart_weights)[0]]
        local = END_AT - timedelta(days=HISTORY_DAYS - day) + timedelta(hours=rng.uniform(lo, hi))
        start = local - offset
        first_on_slot = slot not in seen
        seen.add(slot)
        linkable = bool(p.user_id or p.email or p.phone)
        identify = linkable and (first_on_slot or rng.random() < 0.15)
        logged_in = bool(p.user_id) and (first_on_slot or rng.random() < 0.6)
        n_events = max(2, round(rng.gammavariate(3.0, arch.events_per_session / 3.0)))
        gap = arch.gap_seconds
        if p.is_bot:
            n_events, gap = rng.randint(300, 600), 0.5
        elif shape.bounce_share and not identify and i != long_idx and rng.random() < shape.bounce_share:
            n_events = 1
        if i == long_idx:
            # A ten-hour session: an event every few minutes, never a 30-minute pause.
            gap, n_events = shape.long_session_gap_seconds, shape.long_session_events
        order = None if p.buys is None else (True if i == order_idx else None if p.buys else False)
        session = _session_events(
            mk,
            p,
            device,
            anon,
            start,
            n_events,
            gap,
            logged_in,
            identify,
            i == junk_slot,
            order,
            even_gap=i == long_idx and shape.long_session_even,
        )
        if i == long_idx:
            ts0, ts1 = session[0]["timestamp"], session[-1]["timestamp"]
            p.long_session = (anon, ts0, ts1)
            truth.long_sessions.append(
                {"person_key": p.key, "anonymous_id": anon, "session_start": ts0, "session_end": ts1}
            )
        events.extend(session)
    if p.long_session == ("planned", "", ""):
        p.long_session = None
    return events


def _people(
    seed: int, chunk: int, count: int, first_index: int, truth: Truth, shape: Shape = DEFAULT_SHAPE
) -> tuple[random.Random, list[Person]]:
    rng = random.Random(f"persona-{seed}-{chunk}")
    people = [_make_person(rng, f"p{first_index + i:09x}") for i in range(count)]
    for p in people:
        p.is_bot = rng.random() < BOT_RATE
        if not p.is_bot and rng.random() < shape.long_session_rate:
            p.long_session = ("planned", "", "")
        # Draws only for a shape that asks, so the default shape writes what it always wrote.
        if shape.anonymous_share and rng.random() < shape.anonymous_share:
            p.user_id = p.email = p.phone = None
        if shape.buyer_share is not None:
            p.buys = rng.random() < shape.buyer_share
        _add_devices(rng, p)
    # Households: a tablet several registered people use, each with an own anonymousId.
    registered = [p for p in people if p.user_id and not p.is_bot]
    n_households = max(1, round(len(registered) * SHARED_DEVICE_RATE / 2.5)) if len(registered) >= 10 else 0
    for _ in range(n_households):
        members = rng.sample(registered, rng.randint(2, 4))
        device_id = _uuid(rng)
        for m in members:
            m.devices.append(
                {
                    "device_id": device_id,
                    "type": "tablet",
                    "os": "iPadOS",
                    "anonymous_ids": [_uuid(rng)],
                    "shared": True,
                }
            )
    if shape.duplicate_account_share or shape.family_email_share:
        _plant_accounts(random.Random(f"persona-{seed}-{chunk}-accounts"), people, shape)
    return rng, people


def _plant_accounts(rng: random.Random, people: list[Person], shape: Shape) -> None:
    """Duplicate accounts and family emails (see Shape), from their own random stream."""
    candidates = [p for p in people if p.user_id and p.email and not p.is_bot]
    n_dup = round(len(candidates) * shape.duplicate_account_share)
    n_family = round(len(candidates) * shape.family_email_share)
    chosen = rng.sample(candidates, min(len(candidates), n_dup + 2 * n_family))
    for p in chosen[:n_dup]:
        p.second_user_id, p.names_always = f"u{rng.getrandbits(48):012x}", True
        dtype = rng.choices(("mobile", "desktop", "tablet"), p.archetype.device_weights)[0]
        p.devices.append(
            {
                "device_id": _uuid(rng),
                "type": dtype,
                "os": rng.choice(OS_BY_DEVICE[dtype]),
                "anonymous_ids": [_uuid(rng)],
                "user_id": p.second_user_id,
            }
        )
    rest = chosen[n_dup:]
    for head, member in zip(rest[0::2], rest[1::2]):
        member.email, member.last_name, member.postal_code = head.email, head.last_name, head.postal_code
        if member.first_name == head.first_name:
            member.first_name = rng.choice([n for n in FIRST_NAMES if n != head.first_name])
        member.shares_email_with, head.names_always, member.names_always = head.key, True, True


def _record_truth(p: Person, truth: Truth) -> None:
    truth.people.append(
        {
            "person_key": p.key,
            "archetype": p.archetype.name,
            "age": p.age,
            "age_bracket": AGE_BRACKETS[p.age_index],
            "gender": GENDERS[p.gender_index],
            "country": p.country[0],
            "timezone": p.timezone,
            "user_id": p.user_id,
            "email": p.email,
            "phone": p.phone,
            "age_observed": p.age_known,
            "gender_observed": p.gender_known,
            "is_bot": p.is_bot,
            "has_long_session": p.long_session is not None,
            "second_user_id": p.second_user_id,
            "shares_email_with": p.shares_email_with,
        }
    )
    for d in p.devices:
        for anon in d["anonymous_ids"]:
            truth.identifiers.append(
                {
                    "person_key": p.key,
                    "anonymous_id": anon,
                    "device_id": d["device_id"],
                    "shared_device": bool(d.get("shared")),
                }
            )


def _malform(rng: random.Random, event: dict, fmt: str) -> tuple[str, object]:
    """A broken copy of an event (with a fresh messageId), and the reason planted."""
    bad = json.loads(json.dumps(event))
    bad["messageId"] = _uuid(rng)
    choices = ["missing_id", "bad_timestamp", "timestamp_out_of_range", "unknown_type"]
    if fmt != "parquet":
        choices += ["bad_type", "truncated"]
    if fmt in ("jsonl", "jsonl.gz"):
        choices += ["malformed_json", "not_an_object"]
    reason = rng.choice(choices)
    if reason == "missing_id":
        bad.pop("anonymousId", None)
        bad.pop("userId", None)
    elif reason == "bad_timestamp":
        bad["timestamp"] = rng.choice(("yesterday", "2026-02-30T10:00:00Z", "not a date"))
    elif reason == "timestamp_out_of_range":
        bad["timestamp"] = rng.choice(("1970-01-01T00:00:00Z", "2099-06-01T00:00:00Z"))
    elif reason == "unknown_type":
        bad["type"] = "trakc"
    elif reason == "bad_type":
        bad["type"], bad["event"] = "track", "Product Viewed"
        bad["properties"] = {**(bad.get("properties") or {}), "price": "cheap"}
    elif reason == "truncated":
        return reason, ("cut", json.dumps(bad)[: rng.randint(10, 60)])
    elif reason == "malformed_json":
        return reason, ("raw", json.dumps(bad).replace('":', '"', 1))
    elif reason == "not_an_object":
        return reason, ("raw", json.dumps([bad.get("type"), bad.get("timestamp")]))
    return reason, bad


class _Writer:
    """Writes one landing file in one of FORMATS, line by line, atomically (tmp + rename)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.tmp = path.with_name(path.name + ".part")
        self.lines = 0
        self.rows: list[dict] = []
        if fmt == "jsonl":
            self.fh = open(self.tmp, "w", encoding="utf-8")
        elif fmt == "jsonl.gz":
            self.fh = io.TextIOWrapper(gzip.open(self.tmp, "wb", compresslevel=1), encoding="utf-8")
        elif fmt == "csv":
            self.fh = open(self.tmp, "w", encoding="utf-8", newline="")
            self.csv = csv.writer(self.fh, lineterminator="\n")
            self.csv.writerow(FLAT_COLUMNS)

    def write(self, item: dict | tuple) -> None:
        self.lines += 1
        if isinstance(item, tuple):  # ("raw", text) or ("cut", text): a line that is not an event
            if self.fmt == "csv":  # a row cut short: too few columns
                self.fh.write(",".join(["x"] * (len(FLAT_COLUMNS) // 3)) + "\n")
            else:
                self.fh.write(item[1] + "\n")
            return
        if self.fmt in ("jsonl", "jsonl.gz"):
            self.fh.write(json.dumps(item, separators=(",", ":")) + "\n")
            return
        if self.fmt == "csv":
            flat = flatten(item)
            flat["properties_products"] = (
                json.dumps(flat["properties_products"]) if flat["properties_products"] is not None else None
            )
            self.csv.writerow(["" if v is None else v for v in flat.values()])
        else:
            self.rows.append(parquet_row(item))

    def close(self) -> None:
        if self.fmt == "parquet":
            table = pa.Table.from_pylist(self.rows, schema=_parquet_schema())
            pq.write_table(table, self.tmp)
        else:
            self.fh.close()
        self.tmp.rename(self.path)


NUMERIC_COLUMNS = {
    flat: pa.float64() if kind == "DOUBLE" else pa.int64() for flat, kind in NUMERIC_FLAT_COLUMNS.items()
}


def _parquet_schema() -> pa.Schema:
    return pa.schema([(c, NUMERIC_COLUMNS.get(c, pa.string())) for c in FLAT_COLUMNS])


def parquet_row(event: dict) -> dict:
    """An event as a row of a Parquet landing file: flat columns, numbers stay numbers, the
    rest text, products as JSON."""
    flat = flatten(event)
    if flat["properties_products"] is not None:
        flat["properties_products"] = json.dumps(flat["properties_products"])
    return {k: v if v is None or k in NUMERIC_COLUMNS else str(v) for k, v in flat.items()}


def generate(
    people: int,
    seed: int,
    out: Path,
    fmt: str = "jsonl",
    people_per_file: int | None = None,
    truth_dir: Path | None = None,
    shape: Shape = DEFAULT_SHAPE,
) -> dict:
    """Write landing files for `people` people into `out` and ground truth into `truth_dir`.

    Deterministic for a seed. Holds one file's worth of people in memory at a time.
    Returns the counts of what was written and planted.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if people < 1:
        raise ValueError("people must be at least 1")
    out = Path(out)
    truth_dir = Path(truth_dir) if truth_dir else out / "_truth"
    out.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    per_file = people_per_file or max(2500, min(50000, people // 20))
    n_files = -(-people // per_file)
    truth = Truth()
    carry: list[dict | tuple] = []  # late and re-delivered events that land in the next file
    ext = {"jsonl": "jsonl", "jsonl.gz": "jsonl.gz", "csv": "csv", "parquet": "parquet"}[fmt]
    written: list[str] = []
    for chunk in range(n_files):
        count = min(per_file, people - chunk * per_file)
        rng, persons = _people(seed, chunk, count, chunk * per_file, truth, shape)
        events: list[dict] = []
        for p in persons:
            events.extend(_person_events(rng, p, truth, shape))
            _record_truth(p, truth)
        events.sort(key=lambda e: e["timestamp"])
        lines: list[dict | tuple] = []
        held: list[dict | tuple] = []
        last = chunk == n_files - 1
        for ev in events:
            truth.count("events")
            if rng.random() < LATE_RATE and not last:
                held.append(ev)
                truth.count("late_events")
            else:
                lines.append(ev)
            if rng.random() < DUPLICATE_RATE:
                (held if not last and rng.random() < 0.5 else lines).append(ev)
                truth.count("duplicate_lines")
            if rng.random() < MALFORMED_RATE:
                reason, bad = _malform(rng, ev, fmt)
                lines.append(bad)
                truth.count(f"malformed:{reason}")
                truth.count("malformed_lines")
        lines = carry + lines
        carry = held
        # Out of order: swap a few neighbours.
        for _ in range(len(lines) // 50):
            i = rng.randrange(max(1, len(lines) - 1))
            lines[i], lines[i + 1 if i + 1 < len(lines) else i] = lines[i + 1 if i + 1 < len(lines) else i], lines[i]
        path = out / f"events-s{seed}-{chunk:05d}.{ext}"
        writer = _Writer(path, fmt)
        for item in lines:
            writer.write(item)
        writer.close()
        truth.count("lines", writer.lines)
        written.append(path.name)
    truth.counts["files"] = len(written)
    truth.counts["people"] = people
    _write_truth(truth, truth_dir)
    return dict(truth.counts)


def _write_truth(truth: Truth, truth_dir: Path) -> None:
    pq.write_table(pa.Table.from_pylist(truth.people), truth_dir / "people.parquet")
    pq.write_table(pa.Table.from_pylist(truth.identifiers), truth_dir / "identifiers.parquet")
    schema = pa.schema(
        [
            ("person_key", pa.string()),
            ("anonymous_id", pa.string()),
            ("session_start", pa.string()),
            ("session_end", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(truth.long_sessions, schema=schema), truth_dir / "long_sessions.parquet")
    (truth_dir / "counts.json").write_text(json.dumps(truth.counts, indent=2, sort_keys=True))


# Sign-up records: people who registered more than once under different emails and devices,
# with the typos and gaps of hand-typed forms. Names are built from syllables so that their
# frequencies look like a real population's (a few common, a long tail), unlike the small
# name lists above.
SYLLABLES = (
    "an",
    "be",
    "ca",
    "da",
    "el",
    "fi",
    "go",
    "ha",
    "is",
    "jo",
    "ka",
    "li",
    "ma",
    "no",
    "or",
    "pa",
    "ri",
    "sa",
    "te",
    "ul",
    "va",
    "wi",
    "xe",
    "yo",
    "za",
    "ro",
    "mi",
    "ne",
    "lu",
    "to",
)


SYLLABLE_WEIGHTS = tuple(1 / (i + 1) ** 0.7 for i in range(len(SYLLABLES)))  # Zipf-like: a few common


def _name(rng: random.Random, parts: tuple[int, int]) -> str:
    return "".join(rng.choices(SYLLABLES, SYLLABLE_WEIGHTS, k=rng.randint(*parts)))


def _typo(rng: random.Random, text: str) -> str:
    if len(text) < 2:
        return text
    i = rng.randrange(len(text) - 1)
    kind = rng.random()
    if kind < 0.4:
        return text[:i] + text[i + 1] + text[i] + text[i + 2 :]  # swap neighbours
    if kind < 0.7:
        return text[:i] + text[i + 1 :]  # drop one
    return text[:i] + rng.choice("aeioulnrst") + text[i + 1 :]  # mistype one


def _record_variant(rng: random.Random, traits: dict) -> dict:
    """A second sign-up of the same person: one or two fields mistyped or left out."""
    out = dict(traits)
    for _ in range(rng.choice((1, 1, 2))):
        field = rng.choice(("first_name", "last_name", "birthday", "postal_code", "city"))
        if out.get(field) is None:
            continue
        roll = rng.random()
        if roll < 0.25:
            out[field] = None
        elif field == "birthday":
            y, m, d = out[field].split("-")
            out[field] = f"{y}-{d}-{m}" if int(d) <= 12 and roll < 0.6 else f"{y[:3]}{rng.randint(0, 9)}-{m}-{d}"
        elif field == "postal_code":
            i = rng.randrange(len(out[field]))
            out[field] = out[field][:i] + str(rng.randint(0, 9)) + out[field][i + 1 :]
        else:
            out[field] = _typo(rng, out[field])
    return out


def identify_records(count: int, seed: int, out: Path, duplicate_share: float = 0.25) -> dict:
    """Write `count` identify events (JSON lines) for sign-ups sharing no identifier: each has its
    own anonymousId, and `duplicate_share` of them are a person signing up again (with typos).
    The true person of each anonymousId goes to `<out>/_truth/records.parquet`."""
    rng = random.Random(seed)
    out = Path(out)
    (out / "_truth").mkdir(parents=True, exist_ok=True)
    people: list[tuple[str, dict]] = []
    anonymous_ids, keys = [], []
    start = END_AT - timedelta(days=HISTORY_DAYS)
    with (out / f"signups-s{seed}.jsonl").open("w") as fh:
        for i in range(count):
            if people and rng.random() < duplicate_share:
                key, base = rng.choice(people)
                traits = _record_variant(rng, base)
            else:
                postal = f"{rng.randint(1000, 99999):05d}"
                base = {
                    "first_name": _name(rng, (2, 3)),
                    "last_name": _name(rng, (2, 4)),
                    "birthday": f"{rng.randint(1940, 2008)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                    "postal_code": postal,
                    # A postcode area holds several localities (as in FEBRL's Australian data).
                    "city": f"{_name(rng, (2, 3))}-{postal[:3]}",
                }
                key = f"r{i:08d}"
                people.append((key, base))
                traits = base
            anon = _uuid(rng)
            anonymous_ids.append(anon)
            keys.append(key)
            event = {
                "type": "identify",
                "messageId": _uuid(rng),
                "anonymousId": anon,
                "timestamp": _iso(start + timedelta(seconds=rng.randrange(HISTORY_DAYS * 86400))),
                "traits": {k: (v.title() if k.endswith("name") else v) for k, v in traits.items() if v is not None},
            }
            fh.write(json.dumps(event) + "\n")
    pq.write_table(pa.table({"anonymous_id": anonymous_ids, "person_key": keys}), out / "_truth" / "records.parquet")
    return {"records": count, "people": len(people)}

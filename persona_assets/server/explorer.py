"""The person explorer at `/`: server-rendered pages over the profile API's reads.

Every value on a page comes from a `ProfileReader` method the JSON API under `/v1/` also
answers with (search, traits, provenance, links, identifiers, audiences with why, events,
segments, audiences), run on the same reads thread: the pages add no second way to read.
Templates (Jinja2) escape every value, always; a Content-Security-Policy allows scripts and
styles from this server only, so even a value that escaped would not run.

Keys. A browser presents the read key once, in a form; the answer is a session cookie
(HttpOnly, SameSite=Strict) holding a random nonce, its time and an HMAC of both under a
secret made at start, never the key (so a restart, or 12 hours, ends every session). The
admin key unlocks the actions (unmerge, merge, forget) the same way, in a second cookie.
Every POST carries a CSRF token (an HMAC of the session's nonce) and must come from this
origin. Keys and tokens are compared in constant time and never logged.

Actions run the same commands a user types (`persona unmerge`, `persona merge`, `persona
forget`) as a child process, one at a time: they wait for the warehouse's one writer as the
command does, rebuild the people they touch and republish the snapshot, which the reader
opens at its next read. The action's page follows it and shows the people after.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from persona_assets.server.asgi import Answer, ClientGone, Request
from persona_assets.server.collect import key_matches
from persona_assets.server.profiles import BadRequest, NotFound

TEMPLATES = Path(__file__).with_name("templates")
STATIC = Path(__file__).with_name("static")
READ_COOKIE, ADMIN_COOKIE = "persona_read", "persona_admin"
SESSION_SECONDS = 12 * 3600
FORM_BYTES = 8 * 1024
EVENTS_PER_PAGE = 20
MEMBERS_PER_PAGE = 50
OUTPUT_CHARS = 20_000  # of an action's output, kept for its page
PERSON = re.compile(r"^p[0-9a-f]{16}$")
HEADERS = {
    "content-type": "text/html; charset=utf-8",
    "cache-control": "no-store",
    # Paths and pages hold identifiers: nothing is sent on to another site.
    "referrer-policy": "same-origin",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
SOURCES = {
    "observed": "observed",
    "enriched": "enriched",
    "inferred": "inferred",
    "imputed_stat": "imputed (statistics)",
    "imputed_model": "imputed (model)",
    "computed": "computed",
    "unknown": "unknown",
}
BEHAVIOUR = (
    ("session_count", "sessions"),
    ("avg_session_seconds", "mean session (s)"),
    ("event_count", "events"),
    ("order_count", "orders"),
    ("total_revenue", "revenue"),
    ("avg_order_value", "mean order value"),
    ("days_since_last_order", "days since last order"),
    ("sessions_per_week", "sessions a week"),
    ("intent_score", "intent score"),
)


class Sessions:
    """Signed, expiring session tokens and the CSRF token of each; the secret lives as long as the process."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, kind: str) -> str:
        nonce, at = secrets.token_urlsafe(18), str(int(time.time()))
        return f"{nonce}.{at}.{self._mac(f'{kind}|{nonce}|{at}')}"

    def nonce(self, token: str | None, kind: str) -> str | None:
        """The token's nonce when it is a valid, unexpired `kind` session, else None."""
        parts = (token or "").split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        nonce, at, mac = parts
        if not hmac.compare_digest(mac.encode(), self._mac(f"{kind}|{nonce}|{at}").encode()):
            return None
        return nonce if 0 <= time.time() - int(at) < SESSION_SECONDS else None

    def csrf(self, nonce: str) -> str:
        return self._mac(f"csrf|{nonce}")


@dataclass
class Job:
    """One action (a `persona` command run as a child process) and what became of it."""

    id: int
    kind: str  # unmerge, merge, forget
    person_id: str
    command: list[str]
    identifiers: list[tuple[str, str]]  # the person's identifiers when it started, to find them after
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    returncode: int | None = None
    output: str = ""
    task: asyncio.Future | None = None

    @property
    def running(self) -> bool:
        return self.returncode is None

    def public(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "person_id": self.person_id,
            "running": self.running,
            "ok": self.returncode == 0,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": self.finished_at.isoformat(timespec="seconds") if self.finished_at else None,
        }


@dataclass
class Visit:
    """What one request is allowed: read (a valid read session or key), act (admin unlocked), and its CSRF token."""

    read: bool
    admin: bool
    csrf: str = ""


class Explorer:
    """The explorer's pages and actions; `read(call)` runs a reader call on the reads thread."""

    def __init__(self, settings, home: Path, reader, read) -> None:
        self.settings, self.home, self.reader, self.read = settings, home, reader, read
        self.sessions = Sessions()
        self.jobs: dict[int, Job] = {}
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,  # every template, whatever its name
            undefined=jinja2.ChainableUndefined,
        )
        self.templates.filters["number"] = _number
        self.templates.filters["when"] = _when
        self.templates.filters["pct"] = lambda v: "–" if not isinstance(v, int | float) else f"{100 * v:.0f}%"
        self.templates.globals["SOURCES"] = SOURCES

    # --- answers ------------------------------------------------------------------------------

    def page(self, template: str, visit: Visit | None, status: int = 200, headers: dict | None = None, **values):
        values = {"visit": visit, "admin_key_set": bool(self.settings.admin_key), "running": self._running(), **values}
        body = self.templates.get_template(template).render(**values).encode()
        return Answer(status, body, HEADERS | (headers or {}))

    def message(self, visit, status: int, title: str, text: str) -> Answer:
        return self.page("message.html", visit, status, title=title, text=text)

    @staticmethod
    def redirect(location: str, cookies: list[str] | None = None) -> Answer:
        answer = Answer(303, b"", {"location": location, "cache-control": "no-store"})
        if cookies:  # Answer's headers are a dict: a second Set-Cookie goes under another case
            for n, cookie in enumerate(cookies):
                answer.headers["set-cookie" if n == 0 else "Set-Cookie"] = cookie
        return answer

    # --- who is asking ------------------------------------------------------------------------

    def visit(self, request: Request) -> Visit:
        cookies = _cookies(request.headers.get("cookie", ""))
        nonce = self.sessions.nonce(cookies.get(READ_COOKIE), "read")
        header = _header_key(request)
        read = nonce is not None or key_matches(header, self.settings.read_key)
        admin = bool(self.settings.admin_key) and self.sessions.nonce(cookies.get(ADMIN_COOKIE), "admin") is not None
        return Visit(read, admin and read, self.sessions.csrf(nonce) if nonce else "")

    def _same_origin(self, request: Request) -> bool:
        """A browser's POST says where it comes from (Sec-Fetch-Site, Origin); one from another site is refused
        (SameSite=Strict already keeps the cookies from it). A client that sends neither is no browser."""
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            return site in ("same-origin", "none")
        origin = request.headers.get("origin")
        return origin is None or urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")

    def _checked_post(self, request: Request, visit: Visit, form: dict) -> Answer | None:
        """None when a POST may go on: same origin, a read session, its CSRF token."""
        if not self._same_origin(request):
            return self.message(visit, 403, "Refused", "This form was sent from another site.")
        if not visit.read:
            return self.message(visit, 401, "Sign in first", "Your session has ended: sign in with the read key again.")
        if not visit.csrf or not hmac.compare_digest(form.get("csrf", "").encode(), visit.csrf.encode()):
            return self.message(
                visit, 403, "Refused", "The form's security token is missing or stale: reload the page."
            )
        return None

    # --- routing ------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Answer:
        parts = [urllib.parse.unquote(p) for p in request.path.split("/")[1:]]
        if parts[0] == "static" and len(parts) == 2 and request.method == "GET":
            return _static(parts[1])
        visit = self.visit(request)
        if not self.settings.read_key:
            return self.message(
                visit,
                503,
                "The explorer is off",
                "No read key is set. Set PERSONA_READ_KEY (or read_key under server: in "
                "persona.yaml) and restart persona serve.",
            )
        if request.method not in ("GET", "POST"):
            return Answer(405, b"", {"allow": "GET, POST"})
        try:
            if request.method == "POST":
                try:
                    form = await _form(request)
                except ValueError as exc:
                    return self.message(visit, 400, "Not understood", str(exc))
                return await self._post(request, visit, parts, form)
            if parts == ["login"]:
                return self.redirect("/") if visit.read else self.page("login.html", visit, next="/")
            if not visit.read:
                back = request.path + ("?" + urllib.parse.urlencode(request.query) if request.query else "")
                return self.page("login.html", visit, 401, next=_next(back))
            return await self._get(request, visit, parts)
        except NotFound:
            return self.message(
                visit,
                404,
                "Nobody here",
                "No one in the snapshot has this id (forgotten, or merged into someone else since: search again).",
            )
        except BadRequest as exc:
            return self.message(visit, 400, "Not understood", str(exc))
        except FileNotFoundError:
            return self.message(visit, 503, "No snapshot yet", "Run `persona run` (or make demo) first.")

    async def _get(self, request: Request, visit: Visit, parts: list[str]) -> Answer:
        q = request.query
        if parts == [""]:
            segments = await self.read(self.reader.segments)
            audiences = await self.read(self.reader.audience_list)
            return self.page("home.html", visit, segments=segments["data"], audiences=audiences["data"])
        if parts == ["search"]:
            return await self._search(visit, q.get("q", ""))
        if len(parts) == 2 and parts[0] == "people":
            return await self._person(visit, parts[1], q.get("next"))
        if len(parts) == 3 and parts[0] == "people" and parts[2] in ("unmerge", "merge", "forget"):
            return await self._confirm(visit, parts[1], parts[2], q.get("with", ""))
        if len(parts) == 2 and parts[0] == "segments":
            limit, after = MEMBERS_PER_PAGE, q.get("next")
            found = await self.read(lambda: self.reader.segment_members(parts[1], limit, after))
            return self.page("members.html", visit, kind="segment", found=found, after=after)
        if len(parts) == 2 and parts[0] == "audiences":
            limit, after = MEMBERS_PER_PAGE, q.get("next")
            found = await self.read(lambda: self.reader.audience_members(parts[1], limit, after))
            return self.page("members.html", visit, kind="audience", found=found, after=after)
        if len(parts) == 2 and parts[0] == "actions":
            return await self._action_page(visit, parts[1])
        if len(parts) == 3 and parts[0] == "actions" and parts[2] == "status":
            job = self.jobs.get(int(parts[1])) if parts[1].isdigit() else None
            if job is None:
                return Answer.json({"error": "no such action"}, 404)
            return Answer.json(job.public(), headers={"cache-control": "no-store"})
        return self.message(visit, 404, "No such page", "Start from the search.")

    async def _post(self, request: Request, visit: Visit, parts: list[str], form: dict) -> Answer:
        if parts == ["login"]:
            if not self._same_origin(request):
                return self.message(visit, 403, "Refused", "This form was sent from another site.")
            if not key_matches(form.get("key"), self.settings.read_key):
                return self.page("login.html", visit, 401, next=_next(form.get("next", "/")), wrong=True)
            cookie = _cookie(READ_COOKIE, self.sessions.issue("read"))
            return self.redirect(_next(form.get("next", "/")), [cookie])
        refused = self._checked_post(request, visit, form)
        if refused:
            return refused
        back = _next(form.get("next", "/"))
        if parts == ["logout"]:
            return self.redirect("/", [_cookie(READ_COOKIE, "", 0), _cookie(ADMIN_COOKIE, "", 0)])
        if parts == ["unlock"]:
            if not self.settings.admin_key:
                return self.message(visit, 403, "Actions are off", ACTIONS_OFF)
            if not key_matches(form.get("key"), self.settings.admin_key):
                return self.message(visit, 403, "Wrong admin key", "That is not the admin key; nothing was unlocked.")
            return self.redirect(back, [_cookie(ADMIN_COOKIE, self.sessions.issue("admin"))])
        if parts == ["lock"]:
            return self.redirect(back, [_cookie(ADMIN_COOKIE, "", 0)])
        if len(parts) == 3 and parts[0] == "people" and parts[2] in ("unmerge", "merge", "forget"):
            if not self.settings.admin_key:
                return self.message(visit, 403, "Actions are off", ACTIONS_OFF)
            if not visit.admin:
                return self.message(
                    visit, 403, "Unlock actions first", "Actions need the admin key: unlock them on the person's page."
                )
            return await self._act(visit, parts[1], parts[2], form)
        return self.message(visit, 404, "No such page", "Start from the search.")

    # --- pages --------------------------------------------------------------------------------

    async def _search(self, visit: Visit, text: str) -> Answer:
        text = text.strip()
        if not text:
            return self.redirect("/")
        found = (await self.read(lambda: self.reader.search(text)))["data"]
        if len(found) == 1:
            return self.redirect(f"/people/{found[0]['person_id']}")
        return self.page("search.html", visit, 200 if found else 404, query=text, found=found)

    async def _person(self, visit: Visit, person_id: str, after: str | None) -> Answer:
        if not PERSON.match(person_id):
            raise NotFound
        r, who = self.reader, ("person_id", person_id)
        traits = (await self.read(lambda: r.traits(*who, None)))["traits"]
        provenance = (await self.read(lambda: r.provenance(*who)))["data"]
        identity = await self.read(lambda: r.links(*who))
        identifiers = (await self.read(lambda: r.identifiers(*who)))["data"]
        audiences = await self.read(lambda: r.audiences_why(*who))
        events = await self.read(lambda: r.events(*who, EVENTS_PER_PAGE, after, None))
        weeks = (await self.read(lambda: r.activity(*who)))["data"]
        catalog = {s["id"]: s for s in (await self.read(r.segments))["data"]}
        jobs = [j for j in self.jobs.values() if j.person_id == person_id]
        return self.page(
            "person.html",
            visit,
            person_id=person_id,
            traits=traits,
            provenance=provenance,
            behaviour=[(label, traits.get(name)) for name, label in BEHAVIOUR],
            affinity=_bars(traits.get("category_affinity") or {}),
            activity=_columns(weeks),
            identity=identity,
            identifiers=identifiers,
            audiences=audiences,
            events=events,
            after=after,
            path=_segment_path(traits, catalog),
            jobs=jobs,
        )

    async def _confirm(self, visit: Visit, person_id: str, kind: str, other: str) -> Answer:
        if not PERSON.match(person_id):
            raise NotFound
        r, who = self.reader, ("person_id", person_id)
        traits = (await self.read(lambda: r.traits(*who, None)))["traits"]
        identifiers = (await self.read(lambda: r.identifiers(*who)))["data"]
        identity = await self.read(lambda: r.links(*who))
        others = (await self.read(lambda: r.search(other)))["data"] if other.strip() else []
        return self.page(
            "confirm.html",
            visit,
            kind=kind,
            person_id=person_id,
            traits=traits,
            identifiers=identifiers,
            identity=identity,
            other=other.strip(),
            others=others,
        )

    async def _action_page(self, visit: Visit, number: str) -> Answer:
        job = self.jobs.get(int(number)) if number.isdigit() else None
        if job is None:
            return self.message(visit, 404, "No such action", "Actions are kept until persona serve restarts.")
        now = []
        if not job.running:
            # Who holds the identifiers the person had when the action started: read as any search is.
            for kind, identifier in job.identifiers:
                found = (await self.read(lambda k=kind, i=identifier: self.reader.search(f"{k}:{i}")))["data"]
                now.append((kind, identifier, found[0]["person_id"] if found else None))
        people = sorted({p for _, _, p in now if p})
        return self.page("action.html", visit, job=job, now=now, people=people)

    # --- actions ------------------------------------------------------------------------------

    async def _act(self, visit: Visit, person_id: str, kind: str, form: dict) -> Answer:
        if not PERSON.match(person_id):
            raise NotFound
        running = self._running()
        if running is not None:
            return self.message(
                visit,
                409,
                "Another action is running",
                f"Action #{running.id} ({running.kind} of {running.person_id}) has not finished; "
                "the warehouse takes one writer at a time.",
            )
        identifiers = (await self.read(lambda: self.reader.identifiers("person_id", person_id)))["data"]
        reason = form.get("reason", "").strip()[:500]
        args = {"unmerge": ["unmerge", person_id], "forget": ["forget", person_id]}.get(kind)
        if kind == "merge":
            other = form.get("with", "").strip()
            found = (await self.read(lambda: self.reader.search(other)))["data"] if other else []
            if len(found) != 1 or found[0]["person_id"] == person_id:
                return self.message(
                    visit,
                    400,
                    "Whom to merge with?",
                    "Name exactly one other person (a person_id or an identifier that finds one person).",
                )
            args = ["merge", person_id, found[0]["person_id"]]
            # the other's identifiers too, so the action's page shows who holds all of them after
            theirs = await self.read(lambda: self.reader.identifiers("person_id", found[0]["person_id"]))
            identifiers += theirs["data"]
        if kind in ("unmerge", "merge"):
            args += ["--by", "explorer"] + (["--reason", reason] if reason else [])
        job = Job(
            len(self.jobs) + 1,
            kind,
            person_id,
            [sys.executable, "-m", "persona_assets.cli", *args],
            [(i["type"], i["id"]) for i in identifiers],
        )
        self.jobs[job.id] = job
        await self._start(job)
        return self.redirect(f"/actions/{job.id}")

    async def _start(self, job: Job) -> None:
        env = {**os.environ, "PERSONA_HOME": str(self.home)}
        process = await asyncio.create_subprocess_exec(
            *job.command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )

        async def follow() -> None:
            out, _ = await process.communicate()
            job.output = out.decode(errors="replace")[-OUTPUT_CHARS:]
            job.finished_at = datetime.now(UTC)
            job.returncode = process.returncode

        job.task = asyncio.ensure_future(follow())

    def _running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.running), None)

    async def stop(self) -> None:
        """At shutdown: an action still running finishes its own work (a child of its own); we stop waiting."""
        for job in self.jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()


ACTIONS_OFF = (
    "No admin key is set, so merging, splitting and forgetting from here are off. Set PERSONA_ADMIN_KEY "
    "(or admin_key under server: in persona.yaml; not the read or write key) and restart persona serve."
)


# --- helpers --------------------------------------------------------------------------------


def _static(name: str) -> Answer:
    path = STATIC / name
    kind = STATIC_TYPES.get(path.suffix)
    if kind is None or "/" in name or name.startswith(".") or not path.is_file():
        return Answer(404, b"not found", {"content-type": "text/plain"})
    return Answer(
        200, path.read_bytes(), {"content-type": kind, "cache-control": "no-cache", "x-content-type-options": "nosniff"}
    )


async def _form(request: Request) -> dict:
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > FORM_BYTES:
        raise ValueError("the form is too large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > FORM_BYTES:
                raise ValueError("the form is too large")
            chunks.append(chunk)
    except ClientGone:
        raise ValueError("the form was cut short") from None
    try:
        text = b"".join(chunks).decode()
    except UnicodeDecodeError:
        raise ValueError("the form is not UTF-8") from None
    return {k: v[0] for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()}


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out[name] = value
    return out


def _cookie(name: str, value: str, max_age: int = SESSION_SECONDS) -> str:
    return f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"


def _header_key(request: Request) -> str | None:
    from persona_assets.server.collect import basic_username

    header = request.headers.get("authorization") or ""
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return basic_username(header)


def _next(path: str) -> str:
    """A place to go back to on this site only (never `//other.site` or a scheme)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


def _number(value) -> str:
    if value is None or isinstance(value, jinja2.Undefined) or value != value:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _when(value) -> str:
    if not value or isinstance(value, jinja2.Undefined):
        return "–"
    return str(value).replace("T", " ")[:19]


def _bars(affinity: dict, top: int = 8) -> list[dict]:
    """The strongest categories as bars for the inline SVG chart (width relative to the strongest)."""
    items = sorted(((k, v) for k, v in affinity.items() if isinstance(v, int | float) and v > 0), key=lambda kv: -kv[1])
    items = items[:top]
    most = items[0][1] if items else 1.0
    return [
        {"label": k, "score": v, "width": max(1.0, 200.0 * v / most), "y": 22 * i} for i, (k, v) in enumerate(items)
    ]


def _columns(weeks: list[dict], height: float = 60.0) -> list[dict]:
    """Each week as a column (events) with its orders inside it, for the inline SVG chart."""
    most = max((w["events"] for w in weeks), default=0) or 1
    return [
        {**w, "x": 16 * i, "h": height * w["events"] / most, "oh": height * w["orders"] / most}
        for i, w in enumerate(weeks)
    ]


def _segment_path(traits: dict, catalog: dict) -> list[dict]:
    path = []
    for key in ("segment_id", "subsegment_id"):
        entry = catalog.get(traits.get(key))
        if entry is not None:
            path.append(entry)
    return path

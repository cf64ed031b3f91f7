"""Normalizing and keyed hashing of email and phone: raw values never leave ingestion."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import phonenumbers

KEY_ENV = "PERSONA_HASH_KEY"
KEY_FILE = ".hash_key"
GMAIL_DOMAINS = ("gmail.com", "googlemail.com")
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"


def load_key(home: Path) -> bytes:
    """The HMAC key: PERSONA_HASH_KEY if set, else one generated once per PERSONA_HOME (mode 0600)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode()
    path = Path(home) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def hmac_params(key: bytes) -> dict[str, str]:
    """The inner and outer HMAC pads as hex, for `hmac_sql` (RFC 2104 with SHA-256)."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return {
        "hmac_ipad": bytes(b ^ 0x36 for b in key).hex(),
        "hmac_opad": bytes(b ^ 0x5C for b in key).hex(),
    }


def hmac_sql(expr: str) -> str:
    """DuckDB expression computing HMAC-SHA256 of a VARCHAR expression, hex encoded.

    Runs vectorized in DuckDB; needs the parameters of `hmac_params` bound.
    """
    return f"sha256(unhex($hmac_opad) || unhex(sha256(unhex($hmac_ipad) || encode({expr}))))"


def hmac_hex(key: bytes, value: str) -> str:
    """The same keyed hash in Python (for look-ups and tests)."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def normalize_email_sql(expr: str, gmail_rules: bool) -> str:
    """DuckDB expression: trimmed, lower-cased email; NULL unless it looks like one.

    With gmail rules, dots and +tags in the local part of Gmail addresses are dropped.
    """
    e = f"lower(trim({expr}))"
    valid = f"regexp_full_match({e}, '{EMAIL_PATTERN}')"
    if not gmail_rules:
        return f"CASE WHEN {valid} THEN {e} END"
    local = f"split_part({e}, '@', 1)"
    domain = f"split_part({e}, '@', 2)"
    gmail = ", ".join(f"'{d}'" for d in GMAIL_DOMAINS)
    canonical = f"replace(split_part({local}, '+', 1), '.', '') || '@gmail.com'"
    return f"CASE WHEN NOT {valid} THEN NULL WHEN {domain} IN ({gmail}) THEN {canonical} ELSE {e} END"


def normalize_email(value: str, gmail_rules: bool = True) -> str | None:
    """Python twin of `normalize_email_sql`, for look-ups by email (`persona profile`)."""
    import re

    e = value.strip().lower()
    if not re.fullmatch(EMAIL_PATTERN, e):
        return None
    local, domain = e.split("@", 1)
    if gmail_rules and domain in GMAIL_DOMAINS:
        return local.split("+", 1)[0].replace(".", "") + "@gmail.com"
    return e


def normalize_phone(value: str, region: str | None) -> str | None:
    """E.164 form of a phone number, or None when it cannot be a valid number.

    `region` (ISO country, e.g. from the event's locale) reads national formats.
    """
    text = value.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, region if region and not text.startswith("+") else None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# Emails and phone numbers inside free text (a page URL, a search query, a quarantined line):
# an email written plainly or URL-encoded (jo%40example.com); a phone number written
# internationally (+49 151 2345678, 0049..., %2B49...), which a search query or a URL may
# carry; and in JSON text any value under a key that names a phone (phone, mobile, tel, fax).
TEXT_EMAIL_RE = r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
TEXT_PHONE_RE = r"(?:\+|%2[Bb]|\b00)[1-9](?:(?:[ ()./-]|%20)?[0-9]){6,14}"
JSON_PHONE_RE = r"""("[A-Za-z_]*(?:phone|mobile|tel|telephone|cell|fax)[A-Za-z_]*"\s*:\s*)("[^"]*"|[-+0-9 ().]+)"""


def scrub_text_sql(expr: str) -> str:
    """DuckDB expression: `expr` with every email replaced by <email> and every international
    phone number by <phone> (for page URLs and search queries, which users type into)."""
    no_email = f"regexp_replace({expr}, '{TEXT_EMAIL_RE}', '<email>', 'g')"
    return f"regexp_replace({no_email}, '{TEXT_PHONE_RE}', '<phone>', 'g')"


# In a quarantined line, anything around an @ is taken for an email (the line may be broken anywhere).
LINE_EMAIL_RE = r"""[^\s"',;:<>\[\]{}()]+@[^\s"',;:<>\[\]{}()]+"""


def redact_line_sql(expr: str) -> str:
    """DuckDB expression: a quarantined line's text without the emails and phone numbers it
    carried (it keeps its shape, so the reason can still be seen)."""
    from persona_assets.core.publish import sql_literal

    no_email = f"regexp_replace({scrub_text_sql(expr)}, {sql_literal(LINE_EMAIL_RE)}, '<email>', 'g')"
    # \1 keeps the key: a backreference in DuckDB's replacement, written as backslash-one in SQL.
    return f"""regexp_replace({no_email}, {sql_literal(JSON_PHONE_RE)}, {sql_literal(chr(92) + '1"<phone>"')}, 'g')"""

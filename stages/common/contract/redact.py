"""Credentials inside URLs (http://user:TOKEN@host/v1) never reach a manifest, a log or the console."""

from __future__ import annotations

import re

# scheme://userinfo@ : the userinfo part (user, or user:password/token) is replaced, the host kept
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@\s]+)@")
# ?api_key=..., &token=... in query strings
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:api[_-]?key|key|token|access[_-]?token|password|secret)=)[^&#\s]+", re.I)


def redact(text: str) -> str:
    if "://" not in text:
        return text
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + "<redacted>@", text)
    return _QUERY_SECRET.sub(lambda m: m.group("key") + "<redacted>", text)

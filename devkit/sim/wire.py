"""What the simulated services share: where notifications go, seeded ids, how a request's body and address travel.

Notifications are handed to `Deliver` as the function app would receive them
(`/api/<dataverse|fo>/<template>` of the registered `FUNCTION_URL`). Bodies go
through JSON as httpx would send them; a request's address is built only when
an error names it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from loyaltysync.targets.odata import Key, check_name
from loyaltysync.templates import Side

Row = dict[str, Any]
Deliver = Callable[[Side, str, bytes, dict[str, str]], None]
FUNCTION_URL = "https://loyaltysync-sim.example"  # where the registered webhooks point (only the path is used)
FUNCTION_KEY = "sim-function-key"  # the simulated function app's key
STORED_TIME = "%Y-%m-%dT%H:%M:%SZ"


_VERSION_MASK = ~((0xF000 << 64) | (0xC000 << 48))
_VERSION_BITS = (0x4000 << 64) | (0x8000 << 48)


def seeded_id(rng: random.Random) -> Callable[[], str]:
    """Random-version GUIDs from `rng`: `str(uuid.UUID(int=rng.getrandbits(128), version=4))`, formatted directly."""

    def new_id() -> str:
        text = f"{(rng.getrandbits(128) & _VERSION_MASK) | _VERSION_BITS:032x}"
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    return new_id


def delivery_route(url: str) -> tuple[Side, str] | None:
    """(endpoint, template) of a delivery URL `<function>/api/<dataverse|fo>/<template>`, None for others."""
    parts = urlsplit(url).path.strip("/").split("/")
    if len(parts) == 3 and parts[0] == "api" and parts[1] in ("dataverse", "fo"):
        endpoint: Side = "fo" if parts[1] == "fo" else "dataverse"
        return endpoint, unquote(parts[2])
    return None


def lazy_address(entity_set: str, key: Key, build: Callable[[], str]) -> Callable[[], str]:
    """A request's address, built only when an error names it; its names checked now, as the real client does."""
    check_name(entity_set)
    for name in key:
        check_name(name)
    return build


def sent_params(params: Mapping[str, str | None]) -> dict[str, str]:
    """Query options as the service reads them off the URL (None ones are not sent)."""
    return {k: v for k, v in params.items() if v is not None}


def json_copy(body: Mapping[str, Any]) -> Any:
    """The body as the service decodes it from the request's JSON (what httpx would send; TypeError if it cannot)."""
    return json.loads(json.dumps(dict(body)))

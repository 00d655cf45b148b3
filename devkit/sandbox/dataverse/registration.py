"""Rules for webhook registration rows: service endpoints, processing steps and their images.

Checked on every write to those tables (docs/wire-formats.md §1.11): a webhook
endpoint (contract 8) authenticates with a Webhook Key (4), Http Header (5) or
Http Query String (6); types 5 and 6 carry `<settings><setting name= value=/></settings>`.
A webhook step has no `configuration`. The emulator delivers asynchronous
post-operation steps (mode 1, stage 40) only, so it refuses other webhook steps
instead of silently treating them as asynchronous.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from devkit.sandbox.dataverse.errors import INVALID_ARGUMENT, DataverseError
from devkit.sandbox.dataverse.schema import TableDef

if TYPE_CHECKING:
    from devkit.sandbox.dataverse.org import Organization

WEBHOOK = 8
WEBHOOK_KEY, HTTP_HEADER, HTTP_QUERY = 4, 5, 6
_SETTINGS = re.compile(r"^\s*<settings>\s*((?:<setting\s[^>]*/>\s*)*)</settings>\s*$", re.DOTALL)
_SETTING = re.compile(r"<setting\s([^>]*)/>")
_ATTRIBUTE = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def _invalid(message: str) -> DataverseError:
    return DataverseError(400, INVALID_ARGUMENT, message)


def parse_settings(text: str) -> list[tuple[str, str]]:
    """The name/value pairs of an HttpHeader / HttpQueryString `authvalue`; ValueError when malformed."""
    match = _SETTINGS.match(text)
    if not match:
        raise ValueError('authvalue must be <settings><setting name="..." value="..."/>...</settings>')
    pairs = []
    for setting in _SETTING.finditer(match.group(1)):
        attributes = {k: html.unescape(v) for k, v in _ATTRIBUTE.findall(setting.group(1))}
        if "name" not in attributes or "value" not in attributes or not attributes["name"]:
            raise ValueError("every <setting> needs a name and a value")
        pairs.append((attributes["name"], attributes["value"]))
    if not pairs:
        raise ValueError("authvalue has no <setting>")
    return pairs


def validate(org: Organization, definition: TableDef, row: Mapping[str, Any], before: Mapping[str, Any] | None) -> None:
    """Raise 400 when a registration row breaks the rules above; other tables pass."""
    name = definition.logical_name
    if name == "serviceendpoint":
        _endpoint(row)
    elif name == "sdkmessageprocessingstep":
        _step(org, row)
    elif name == "sdkmessageprocessingstepimage":
        _image(org, row)


def _endpoint(row: Mapping[str, Any]) -> None:
    if row.get("contract") != WEBHOOK:
        return
    url = row.get("url") or ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _invalid(f"The webhook url '{url}' is not an absolute http(s) URL.")
    authtype = row.get("authtype")
    if authtype not in (WEBHOOK_KEY, HTTP_HEADER, HTTP_QUERY):
        raise _invalid("A webhook's authtype must be 4 (WebhookKey), 5 (HttpHeader) or 6 (HttpQueryString).")
    value = row.get("authvalue")
    if not value:
        raise _invalid("A webhook needs an authvalue.")
    if authtype in (HTTP_HEADER, HTTP_QUERY):
        try:
            parse_settings(value)
        except ValueError as exc:
            raise _invalid(f"Invalid authvalue: {exc}.") from exc


def _step(org: Organization, row: Mapping[str, Any]) -> None:
    message_id, filter_id, handler = row.get("sdkmessageid"), row.get("sdkmessagefilterid"), row.get("eventhandler")
    if message_id is None or handler is None:
        raise _invalid("A step needs sdkmessageid and eventhandler.")
    if filter_id is not None:
        message_filter = org.row("sdkmessagefilter", filter_id)
        if message_filter is None or message_filter["sdkmessageid"] != message_id:
            raise _invalid("The sdkmessagefilter does not belong to the step's sdkmessage.")
    endpoint = org.row("serviceendpoint", handler)
    if endpoint is None or endpoint.get("contract") != WEBHOOK:
        return
    if row.get("configuration"):
        raise _invalid("A step whose event handler is a webhook cannot have a configuration.")
    if row.get("mode") != 1 or row.get("stage") != 40:
        raise _invalid("The sandbox delivers webhooks from asynchronous (mode 1) post-operation (stage 40) steps only.")


def _image(org: Organization, row: Mapping[str, Any]) -> None:
    step_id = row.get("sdkmessageprocessingstepid")
    step = org.row("sdkmessageprocessingstep", step_id) if step_id else None
    if step is None:
        raise _invalid("An image needs an existing sdkmessageprocessingstepid.")
    message = org.row("sdkmessage", step["sdkmessageid"])
    message_name = message["name"] if message else ""
    image_type = row.get("imagetype")
    if image_type is None:
        raise _invalid("An image needs an imagetype: 0 PreImage, 1 PostImage, 2 Both.")
    if message_name == "Create" and image_type in (0, 2):
        raise _invalid("A Create step cannot have a pre-image: the record does not exist before the operation.")
    if message_name == "Delete" and image_type in (1, 2):
        raise _invalid("A Delete step cannot have a post-image: the record does not exist after the operation.")
    expected = "Id" if message_name == "Create" else "Target"
    if row.get("messagepropertyname") not in (None, expected):
        raise _invalid(f"The messagepropertyname of a {message_name} image must be '{expected}'.")
    if not row.get("entityalias"):
        raise _invalid("An image needs an entityalias.")

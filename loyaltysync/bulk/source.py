"""Reading the source table page by page, from the start or from a page link saved in a checkpoint.

The clients' `query()` generators hide the page links; a resumable copy needs
them, because "the page after the last committed one" is exactly the
`@odata.nextLink` that came with it. So the pager here asks for one page at a
time and hands each page over with the link to the next one (None on the
last page). Links are followed unchanged (the clients refuse other hosts).
F&O pages by `$skiptoken`; when it sends no link after a full page, paging
continues with `$top`/`$skip`, as `FnoClient.query` does. Dataverse pages by
paging cookie only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from loyaltysync import mapping
from loyaltysync.errors import TargetError
from loyaltysync.runtime import Runtime
from loyaltysync.targets.http import TargetHttp
from loyaltysync.targets.odata import check_name, query_string, select_list
from loyaltysync.templates import Side, Template

log = logging.getLogger("loyaltysync.bulk")

Row = dict[str, Any]


@dataclass(slots=True)
class SourcePage:
    """One page of source rows; `next` is where the following page is read (None after the last)."""

    number: int
    rows: list[Row]
    next: str | None


class Source:
    """The rows of one template on one side, in pages of at most `page_size`."""

    def __init__(self, runtime: Runtime, template: Template, side: Side, *, page_size: int) -> None:
        self.template = template
        self.side: Side = side
        self.page_size = page_size
        if side == "fo":
            self.http: TargetHttp = runtime.fno.http
            params: dict[str, str | int | None] = {
                "$select": select_list(mapping.fo_select(template)),
                "cross-company": "true" if template.fo.company_specific else None,
            }
            self.entity_set = check_name(template.fo.entity_set)
        else:
            self.http = runtime.dataverse.http
            params = {"$select": select_list(mapping.dataverse_select(template))}
            self.entity_set = check_name(template.dataverse.entity_set)
        self.first = self.entity_set + query_string(params)
        self._params = params

    def _headers(self) -> dict[str, str]:
        headers = {"Prefer": f"odata.maxpagesize={self.page_size}"}
        if self.side == "dataverse":
            headers["If-None-Match"] = "null"
        return headers

    async def count(self) -> int | None:
        """How many rows the source holds, when the service can say (Dataverse counts only up to 5000)."""
        try:
            if self.side == "fo":
                cross = {"cross-company": "true"} if self.template.fo.company_specific else {}
                response = await self.http.request("GET", f"{self.entity_set}/$count" + query_string(cross))
                return int(response.text.strip())
            response = await self.http.request(
                "GET",
                self.entity_set + query_string({"$select": self.template.dataverse.primary_id, "$count": "true"}),
                headers={
                    "Prefer": 'odata.maxpagesize=1,odata.include-annotations="Microsoft.Dynamics.CRM.totalrecordcount,'
                    'Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"',
                    "If-None-Match": "null",
                },
            )
            data = response.json()
            if data.get("@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"):
                return None
            total = data.get("@Microsoft.Dynamics.CRM.totalrecordcount", data.get("@odata.count"))
            return int(total) if isinstance(total, int) and total >= 0 else None
        except (TargetError, ValueError) as exc:
            log.info("%s: could not count the source rows (%s); progress without ETA", self.entity_set, exc)
            return None

    async def pages(self, start: str | None = None, *, number: int = 0) -> AsyncGenerator[SourcePage, None]:
        """Pages from `start` (a saved `next` link; None: the beginning); `number` counts pages already read."""
        url: str | None = start or self.first
        while url is not None:
            response = await self.http.request("GET", url, headers=self._headers())
            data = response.json()
            rows = [dict(r) for r in data.get("value") or []]
            url = self._next(url, data, len(rows))
            if rows or url is None:
                number += 1
                yield SourcePage(number, rows, url)

    def _next(self, url: str, data: dict[str, Any], returned: int) -> str | None:
        link = data.get("@odata.nextLink")
        if isinstance(link, str) and link:
            return link
        query = dict(parse_qsl(urlsplit(url).query))
        if self.side == "fo" and returned >= self.page_size and "$skiptoken" not in query:
            # A full page and no link from a service that does not page by itself: page with $top/$skip,
            # as FnoClient.query does. (After a server link, no link means the last page.)
            skip = int(query.get("$skip", "0")) + returned
            return self.entity_set + query_string({**self._params, "$top": self.page_size, "$skip": skip})
        return None

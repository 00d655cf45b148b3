"""What leaves the process for Application Insights: the real distro and exporter, read on the wire.

A child process (the OpenTelemetry providers and instrumentations are global, once per
process) sets telemetry up as the deployed app does, with the connection string pointing
at a loopback ingestion endpoint that records every envelope the exporters POST. It runs
changes both ways through the in-process pieces against both emulators over TCP (so an
httpx instrumentation would see real requests) and Azurite (so would azure-core's), logs a
URL outside any change, refuses a webhook, flushes and hands back the envelopes. Nothing
sits between our code and the wire.

Two set-ups, each with the distro's instrumentations active as far as that set-up leaves
them: `azure-monitor` (the app calls `configure_azure_monitor`) and `functions-worker` (the
Functions worker configured the distro first, with its defaults: every instrumentation on;
the app then joins it). The worker's distro samples as `OTEL_TRACES_SAMPLER` says, set as
infra/main.bicep sets it: with the distro's default (5 traces a second) a burst like this
run's is dropped whole.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from devkit.azurite import Azurite

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "tests" / "fixtures" / "events"
TOKEN = "export-test-sandbox-token-5f1c"
SALT = "export-test-salt"
CARD = "C-1001"  # the card of the Dataverse webhook and F&O business event fixtures
PARTY = "P-7700421"  # the party number the Dataverse card carries (seeded below)
CARD_ID = "6d81597f-0f9f-e711-8122-000d3aa2331c"  # msdyn_loyaltycardid of the webhook fixture
HOST_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MARKER = "ENVELOPES:"


# ----------------------------------------------------------------------------- the child process


class _Ingestion(BaseHTTPRequestHandler):
    """Application Insights' ingestion (`/v2.1/track`) and Live Metrics (`QuickPulseService.svc`) on loopback."""

    received: ClassVar[list[dict[str, Any]]] = []
    live: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        if self.path.startswith("/v2.1/track"):
            items = json.loads(raw)
            type(self).received.extend(items)
            body = json.dumps({"itemsReceived": len(items), "itemsAccepted": len(items), "errors": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        else:
            type(self).live.append(raw.decode("utf-8", "replace"))
            body = b""
            self.send_response(200)
            self.send_header("x-ms-qps-subscribed", "false")  # nobody watches: no documents are posted
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


async def _child(mode: str, storage: str, prefix: str) -> dict[str, Any]:
    import httpx
    from opentelemetry import metrics, trace
    from opentelemetry._logs import get_logger_provider

    from devkit.azurite import free_port
    from devkit.sandbox import dataverse as dataverse_emulator
    from devkit.sandbox import fno as fno_emulator
    from devkit.stack import Server
    from loyaltysync import inbound, telemetry, worker
    from loyaltysync.runtime import build_runtime
    from loyaltysync.settings import load_settings
    from loyaltysync.templates import default_mappings_dir, load_templates

    ingestion = ThreadingHTTPServer(("127.0.0.1", 0), _Ingestion)
    threading.Thread(target=ingestion.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{ingestion.server_address[1]}/"
    connection = (
        f"InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint={endpoint};LiveEndpoint={endpoint}"
    )
    templates = load_templates(default_mappings_dir())
    fo_port, dv_port = free_port(), free_port()
    fo = Server("fo", fno_emulator.create_app(token=TOKEN, templates=templates), fo_port)
    dv = Server("dataverse", dataverse_emulator.create_app(token=TOKEN, templates=templates), dv_port)
    await fo.start()
    await dv.start()
    environ = {
        "FNO_URL": fo.url,
        "DATAVERSE_URL": dv.url,
        "LOYALTYSYNC_SANDBOX_TOKEN": TOKEN,
        "AzureWebJobsStorage": storage,
        "QUEUE_PREFIX": prefix,
        "STATE_TABLE": f"{prefix}state",
        "DEADLETTER_TABLE": f"{prefix}dead",
        "CONTROL_TABLE": f"{prefix}control",
        "APPLICATIONINSIGHTS_CONNECTION_STRING": connection,
        "TELEMETRY_HASH_SALT": SALT,
    }
    if mode == "functions-worker":
        from azure.monitor.opentelemetry import configure_azure_monitor

        # The sampler infra/main.bicep sets for both modes (the distro's default would be 5 traces a second).
        os.environ.update(OTEL_TRACES_SAMPLER="microsoft.fixed_percentage", OTEL_TRACES_SAMPLER_ARG="1.0")

        # What the Python worker does with PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true
        # (azure-functions-python-worker, utils/otel.py `initialize_azure_monitor`): the distro's defaults.
        configure_azure_monitor(connection_string=connection, logger_name="loyaltysync")
        environ["PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY"] = "true"
    settings = load_settings(environ)
    assert telemetry.configure(settings) == mode
    logging.getLogger("loyaltysync").setLevel(logging.INFO)

    runtime = build_runtime(settings, templates)
    telemetry.instrument_runtime(runtime)
    cards = templates["loyalty-cards"]
    try:
        async with httpx.AsyncClient(base_url=dv.url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            seeded = await client.post(
                "/api/data/v9.2/msdyn_loyaltycards",
                json={"msdyn_loyaltycardid": CARD_ID, "msdyn_cardnumber": CARD, "msdyn_partynumber": PARTY},
            )
            assert seeded.status_code in (201, 204), seeded.text
        webhook = (EVENTS / "dataverse-loyaltycard-update.json").read_bytes()
        reply = inbound.handle_inbound(
            "dataverse", cards, templates, webhook, {"Content-Type": "application/json"},
            max_body_bytes=1_048_576, host_traceparent=HOST_TRACEPARENT,
        )
        assert reply.status == 202, reply.body
        outcome = await worker.handle_change(runtime, reply.messages[0])
        assert outcome is not None and outcome.applied, outcome
        business_event = (EVENTS / "fo-businessevent-loyaltycard.json").read_bytes()
        reply = inbound.handle_inbound(
            "fo", cards, templates, business_event, {"Content-Type": "application/json"},
            max_body_bytes=1_048_576, host_traceparent=HOST_TRACEPARENT,
        )
        assert reply.status == 202, reply.body
        await worker.handle_change(runtime, reply.messages[0])
        refused = inbound.handle_inbound(
            "dataverse", cards, templates, b"{not json", {"Content-Type": "application/json"},
            max_body_bytes=1_048_576, host_traceparent=HOST_TRACEPARENT,
        )
        assert refused.status == 400, refused.body
        # A URL logged outside any change (a reconcile page, a lookup): no change's values are known here.
        logging.getLogger("loyaltysync.reconcile").warning(
            "page failed: %s/data/RetailLoyaltyCards(CardNumber='%s')?$filter=PartyNumber eq '%s'", fo.url, CARD, PARTY
        )
        logging.getLogger("loyaltysync.preflight").warning("preflight: %s/api/data/v9.2/x(%s)", dv.url, PARTY)
        await telemetry.refresh_backlog(runtime)
        async with httpx.AsyncClient(base_url=dv.url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            party_on_dataverse = (await client.get(f"/api/data/v9.2/msdyn_loyaltycards({CARD_ID})")).json()
    finally:
        await runtime.aclose()
        await dv.stop()
        await fo.stop()
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider(), get_logger_provider()):
        flush = getattr(provider, "force_flush", None)
        assert callable(flush)
        flush()
    return {
        "envelopes": _Ingestion.received,
        "live": _Ingestion.live,
        "party_on_dataverse": party_on_dataverse.get("msdyn_partynumber"),
    }


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module", params=["azure-monitor", "functions-worker"])
def exported(request: pytest.FixtureRequest, azurite: Azurite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    tuple[str, dict[str, Any]]
]:
    mode = request.param
    prefix = "exp" + ("am" if mode == "azure-monitor" else "fw")
    temp = tmp_path_factory.mktemp(prefix)
    environ = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "APPLICATIONINSIGHTS_", "PYTHON_APPLICATIONINSIGHTS_", "FUNCTIONS_"))
    }
    environ.update(
        PYTHONPATH=str(ROOT),
        TMPDIR=str(temp),  # the exporter's retry storage, should anything fail
        APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL="true",  # statsbeat goes to a fixed Microsoft endpoint
    )
    done = subprocess.run(  # noqa: S603 - this very file, run by this interpreter
        [sys.executable, str(Path(__file__)), mode, azurite.connection_string, prefix],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith(MARKER))
    yield mode, json.loads(line[len(MARKER) :])


def _of(envelopes: list[dict[str, Any]], base_type: str) -> list[dict[str, Any]]:
    return [e["data"]["baseData"] | {"_sampleRate": e.get("sampleRate")} for e in envelopes
            if e["data"]["baseType"] == base_type]


def test_no_card_party_number_or_token_reaches_the_wire(exported: tuple[str, dict[str, Any]]) -> None:
    mode, found = exported
    envelopes = found["envelopes"]
    assert found["party_on_dataverse"] == PARTY, "the card the run synced carries the party number"
    kinds = {e["data"]["baseType"] for e in envelopes}
    assert {"RequestData", "RemoteDependencyData", "MessageData", "MetricData"} <= kinds, kinds
    wire = json.dumps(envelopes) + "\n".join(found["live"])
    for secret in (CARD, PARTY, TOKEN, SALT):
        assert secret not in wire, f"{mode}: {secret} reached Application Insights"
    # Still useful: the target calls show the entity set, the log line its text, keys as hashes.
    dependencies = _of(envelopes, "RemoteDependencyData")
    calls = [d for d in dependencies if d.get("type") == "HTTP"]
    assert any(d["data"].endswith("/data/RetailLoyaltyCards(…)") for d in calls), [d["data"] for d in calls]
    assert all(d["properties"].get("target") in ("fno", "dataverse") for d in calls), "only our own CLIENT spans"
    messages = [m["message"] for m in _of(envelopes, "MessageData")]
    assert any(m.startswith("page failed: ") and "RetailLoyaltyCards(…)?$filter=…" in m for m in messages), messages
    assert any(m.startswith("preflight: ") for m in messages), "a child logger's record is redacted too"


def test_each_span_lands_in_the_table_the_queries_read(exported: tuple[str, dict[str, Any]]) -> None:
    """The exporter's span-kind mapping, as docs/monitoring.md and the workbook rely on it."""
    _, found = exported
    envelopes = found["envelopes"]
    requests = _of(envelopes, "RequestData")
    dependencies = _of(envelopes, "RemoteDependencyData")
    syncs = [r for r in requests if r["name"] == "sync loyalty-cards"]
    assert syncs, "the worker's CONSUMER span is a request"
    inbound = [d for d in dependencies if d["name"].startswith("inbound ")]
    # Under the host (a traceparent given) the inbound span is INTERNAL: a dependency of type InProc whose
    # resultCode is "0" and whose answer is only in customDimensions.status.
    assert {(d["name"], d["type"], d["resultCode"], d["properties"]["status"]) for d in inbound} >= {
        ("inbound dataverse/loyalty-cards", "InProc", "0", "202"),
        ("inbound dataverse/loyalty-cards", "InProc", "0", "400"),
        ("inbound fo/loyalty-cards", "InProc", "0", "202"),
    }
    assert not [r for r in requests if r["name"].startswith(("inbound ", "POST /api/"))]
    refused = next(d for d in inbound if d["properties"]["status"] == "400")
    assert refused["properties"]["refusal"]
    assert any(d["type"] == "Queue Message" and d["name"] == "enqueue loyalty-cards" for d in dependencies)
    # Every span sent with a sample rate of 100 %, i.e. itemCount 1: the app's sampling_ratio=1.0, or the
    # worker's distro reading OTEL_TRACES_SAMPLER=microsoft.fixed_percentage with OTEL_TRACES_SAMPLER_ARG=1.0.
    spans = requests + dependencies
    assert spans and {s["_sampleRate"] for s in spans} == {100.0}


# ----------------------------------------------------------------------------- child entry point

if __name__ == "__main__":
    result = asyncio.run(_child(sys.argv[1], sys.argv[2], sys.argv[3]))
    print(MARKER + json.dumps(result), flush=True)
    os._exit(0)  # the distro's exporter and live-metrics threads would otherwise keep the process alive

"""A small, faithful stand-in for `func start` where Azure Functions Core Tools cannot be installed.

It imports the same `function_app.app`, indexes it through the azure-functions
library as the Python worker does, refuses at start-up any signature the worker
refuses (`worker_rules`), binds arguments and outputs through the library's
converters, and serves HTTP triggers (routes, methods,
keys), queue triggers against Azurite (host.json batching, retries, poison
queue) and timer triggers (NCRONTAB). Other triggers are listed, not run.
"""

from devkit.devhost.app import DevHostError, FunctionSpec
from devkit.devhost.host import DevHost, serve

__all__ = ["DevHost", "DevHostError", "FunctionSpec", "serve"]

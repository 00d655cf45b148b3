"""F&O OData emulator: `/data/` with F&O's names, types, errors, paging, `$batch` and data events."""

from devkit.sandbox.fno.app import create_app

__all__ = ["create_app"]

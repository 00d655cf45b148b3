"""Initial sync at scale: stream one side's table, write the other in bulk, resumable, rate-controlled.

Where Microsoft's dual-write initial sync is capped (500K rows per run, about
100 rows a minute, a 24 h timeout, a full re-push on every rerun and only the
top 5 errors visible), this one streams pages (memory bounded whatever the
row count), writes with UpsertMultiple / `$batch` under adaptive rate control,
checkpoints after every page (`--resume` continues where a crash stopped),
parks every failing record with its reason, and fills the sync state so live
sync starts clean.

- `source`: page reader that exposes the next-page links (the resume points);
- `prepare`: a page of rows into target writes and sync state;
- `writers`: Dataverse (UpsertMultiple, `$batch` fallback) and F&O (`$batch`);
- `checkpoint`: the control-store document after each committed page;
- `run`: the pipeline and its report.
"""

from loyaltysync.bulk.checkpoint import Checkpoint, Direction
from loyaltysync.bulk.prepare import Failure, Item
from loyaltysync.bulk.run import (
    SUMMARY_COLUMNS,
    InitialSyncReport,
    SyncOptions,
    controller_for,
    exit_code,
    initial_sync,
    initial_sync_many,
    source_side,
    summary_rows,
)
from loyaltysync.bulk.writers import WriteAborted

__all__ = [
    "SUMMARY_COLUMNS",
    "Checkpoint",
    "Direction",
    "Failure",
    "InitialSyncReport",
    "Item",
    "SyncOptions",
    "WriteAborted",
    "controller_for",
    "exit_code",
    "initial_sync",
    "initial_sync_many",
    "source_side",
    "summary_rows",
]

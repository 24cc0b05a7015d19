"""The mechanics of one sync, one concern per module: averaging and its handle, the sync header and agreement
checks, compressed deltas, the outer step and synced state, overlap, fragments. Nothing here names the runtime."""

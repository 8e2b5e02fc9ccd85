"""The store on disk: directory and manifest, snapshots, the write-ahead log and its typed records."""

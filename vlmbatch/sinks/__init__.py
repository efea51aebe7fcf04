"""Where rows go: a resumable, crash-safe Parquet output."""

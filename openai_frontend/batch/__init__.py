"""OpenAI's Batch API for the frontend: ``/v1/files`` and ``/v1/batches``.

store.py keeps everything in SQLite plus file bodies on disk (nothing only in memory), validation.py checks
uploaded JSONL files, runner.py runs the lines in the frontend process through the same chat path as
``/v1/chat/completions`` and survives restarts, objects.py renders rows as OpenAI's objects."""

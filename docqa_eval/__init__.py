"""Document question answering evaluation against an OpenAI-compatible server.

`dataset` loads a JSONL question set, `runner` asks the served model, `metrics` scores the answers (ANLS and
exact match, as in DocVQA) and `report` turns predictions into JSON and Markdown reports.
`scripts/evaluate.py` is the command line.
"""

"""Validate our responses against OpenAI's published OpenAPI schemas (tests/fixtures/openai/).

    assert_valid(completion_dict, "CreateChatCompletionResponse")
    assert_valid(chunk_dict, "CreateChatCompletionStreamResponse")
    assert_valid(event_dict, "ResponseStreamEvent")
    assert_valid(model_dict, "Model", strict=False)   # our extension fields allowed

Any component schema of the fixture can be named (``schema_names()`` lists them; extend ``ROOTS`` in
tests/fixtures/openai/extract_schemas.py for more). The spec is OpenAPI 3.1 but still marks some fields with
3.0's ``nullable: true``; that is read as "or null". Validation is JSON Schema 2020-12 (``jsonschema``).

Strict (the default): an object may hold only the properties its schema declares, as OpenAI's clients and
the openai package's typed models expect (``unevaluatedProperties: false`` on every object schema with
declared properties, so properties brought in through ``allOf`` / ``$ref`` count as declared). The spec's
own ``additionalProperties`` (maps such as ``metadata``) is kept as is.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "openai" / "openapi_schemas.json"
_BASE = "urn:openai-openapi"


def _nullable(schema):
    """OpenAPI 3.0's ``nullable: true`` -> JSON Schema's "or null" (recursively, on a copy)."""
    if isinstance(schema, list):
        return [_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_nullable(v) if isinstance(v, dict | list) and k not in ("enum", "const", "required") else v)
           for k, v in schema.items() if k != "nullable"}  # fmt: skip
    if schema.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]} if out else {}
    return out


def _composed_names(schemas: dict) -> set[str]:
    """Schemas referenced from an ``allOf``: parts of a larger object, so they must stay open."""
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "allOf":
                    names.update(p["$ref"].rsplit("/", 1)[1] for p in value if isinstance(p, dict) and "$ref" in p)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schemas)
    return names


def _close(schema, *, in_all_of: bool = False):
    """Add ``unevaluatedProperties: false`` to object schemas with declared properties (not to allOf parts)."""
    if isinstance(schema, list):
        return [_close(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "$defs"):
            out[key] = {name: _close(sub) for name, sub in value.items()}
        elif key == "allOf":
            out[key] = [_close(sub, in_all_of=True) for sub in value]
        elif key in ("anyOf", "oneOf", "prefixItems"):
            out[key] = [_close(sub) for sub in value]
        elif key in ("items", "additionalProperties", "not", "contains", "if", "then", "else"):
            out[key] = _close(value)
        else:
            out[key] = value
    declares = "properties" in out or "allOf" in out
    if declares and not in_all_of and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["unevaluatedProperties"] = False
    return out


@functools.cache
def _document(strict: bool) -> dict:
    document = json.loads(FIXTURE.read_text())
    schemas = _nullable(document["components"]["schemas"])
    if strict:
        open_parts = _composed_names(schemas)
        schemas = {name: _close(s, in_all_of=name in open_parts) for name, s in schemas.items()}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": _BASE,
            "components": {"schemas": schemas}}  # fmt: skip


@functools.cache
def _validator(schema_name: str, strict: bool) -> jsonschema.protocols.Validator:
    document = _document(strict)
    if schema_name not in document["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {FIXTURE.name}; see extract_schemas.py's ROOTS")
    registry = Registry().with_resource(_BASE, Resource.from_contents(document, default_specification=DRAFT202012))
    root = {"$ref": f"{_BASE}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(root, registry=registry)


def schema_names() -> list[str]:
    return sorted(_document(False)["components"]["schemas"])


def schema(schema_name: str, *, strict: bool = True) -> dict:
    """The (converted) schema named ``schema_name``, for tests that want to look inside it."""
    return copy.deepcopy(_document(strict)["components"]["schemas"][schema_name])


def errors(obj, schema_name: str, *, strict: bool = True) -> list[str]:
    """Every way ``obj`` breaks the schema, as readable lines (empty: valid)."""
    validator = _validator(schema_name, strict)
    found = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    lines: list[str] = []
    for error in found:
        for reason in _reasons(error):
            where = "/".join(str(p) for p in reason.absolute_path) or "(root)"
            lines.append(f"{where}: {reason.message}")
    return lines


def _reasons(error) -> list:
    """anyOf / oneOf: the failures of the branches whose ``type`` tag matched (the one the object meant to
    be), rather than "is not valid under any of the given schemas"."""
    if not error.context:
        return [error]
    branches: dict[int, list] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    meant = [subs for subs in branches.values()
             if not any(list(s.relative_path) == ["type"] and s.validator in ("enum", "const") for s in subs)]
    if len(meant) != 1:
        return [error]
    return [reason for sub in meant[0] for reason in _reasons(sub)]


def assert_valid(obj, schema_name: str, *, strict: bool = True) -> None:
    """Fail (AssertionError with every reason) unless ``obj`` is valid under OpenAI's ``schema_name``."""
    problems = errors(obj, schema_name, strict=strict)
    assert not problems, f"not a valid {schema_name}:\n  " + "\n  ".join(problems) + (
        f"\nobject: {json.dumps(obj)[:2000]}"
    )

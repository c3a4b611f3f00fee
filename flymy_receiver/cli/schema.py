"""``flymy-receiver schema``: the JSON Schema (or OpenAPI document) of every event."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from .options import UsageError

__all__ = ["run_schema"]


def run_schema(args: argparse.Namespace) -> int:
    from ..schema import event_schemas, openapi_document

    output = _import_model(args.output) if args.output else None
    try:
        document = openapi_document(output) if args.openapi else event_schemas(output)
    except Exception as exc:  # pydantic cannot build a JSON Schema for that model
        raise UsageError(f"no JSON Schema for {args.output}: {_first_line(exc)}") from None
    print(json.dumps(document, indent=2))
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    kind = type(exc).__name__
    return f"{kind}: {text.splitlines()[0][:200]}" if text else kind


def _import_model(spec: str) -> type[Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--output must be MODULE:MODEL, got {spec[:200]!r}")
    sys.path.insert(0, os.getcwd())  # like python -m: the user's own modules are importable
    try:
        model = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import {spec}: {_first_line(exc)}") from None
    except (Exception, SystemExit) as exc:  # the module itself failed while importing
        raise UsageError(f"cannot import {spec}: {_first_line(exc)}") from None
    from pydantic import BaseModel

    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise UsageError(f"{spec} is not a pydantic model")
    return model

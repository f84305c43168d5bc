#!/usr/bin/env python3
"""Derives the LLM NLP study definitions in `dataflows/llm/` from an installed Cumulus ETL.

Cumulus ETL declares its LLM studies as data (a `tasks.toml` and JSON schemas per study) and
turns them into requests at run time: the response schema becomes a pydantic model, whose JSON
schema is pasted into the system prompt and, made strict, sent as the response format. This
tool derives ours with the reference's own code, so prompts and response formats are the
reference's byte for byte (which matters twice: the answers a site already paid for are cached
under the note's text alone, and the model answers what it is asked):

    ~/.cache/reference-cumulus/venv/bin/python tools/derive_llm_studies.py dataflows/llm

(`../shared/tools/reference-cumulus.sh` installs that environment.) It writes one file per
study, `<study>.json`: for each task definition, its name, version, models, system prompt (with
the schema in place), user prompt template, response format, and the type of the `result`
column; and `models.json`, what each model is called by each provider. The files are committed;
the tool is rerun when the reference's studies change.
"""

import enum
import json
import os
import sys
import types
import typing

import pydantic
from cumulus_etl.etl.tasks import nlp_task, task_factory
from cumulus_etl.nlp import models


def result_type(annotation) -> object:
    """The `result` column's type for a pydantic annotation, as upstream's table schema maps it
    (every field nullable; a field named `spans` becomes a list of [start, end] pairs later)."""
    if origin := typing.get_origin(annotation):
        inner = typing.get_args(annotation)[0]
        if origin is typing.Union or origin is types.UnionType:
            return result_type(inner)
        if issubclass(origin, list):
            return {"list": result_type(inner)}
        if origin is typing.Annotated:
            return result_type(inner)
        raise ValueError(f"unsupported type {annotation}")
    if issubclass(annotation, str):
        return "string"
    if issubclass(annotation, bool):
        return "bool"
    if issubclass(annotation, int):
        return "int32"
    if issubclass(annotation, float):
        return "float32"
    if issubclass(annotation, enum.Enum):
        return "string"
    if issubclass(annotation, pydantic.BaseModel):
        return struct_of(annotation)
    raise ValueError(f"unsupported type {annotation}")


def struct_of(model: type[pydantic.BaseModel]) -> dict:
    return {"struct": [[name, result_type(info.annotation)] for name, info in model.model_fields.items()]}


def model_entry(model: type[models.Model]) -> dict:
    def prices(p):
        if p is None:
            return None
        return {
            "date": p.date.isoformat(),
            "new_input_tokens": p.new_input_tokens,
            "cache_read_input_tokens": p.cache_read_input_tokens,
            "cache_written_input_tokens": p.cache_written_input_tokens,
            "output_tokens": p.output_tokens,
            "multiplier": p.multiplier,
        }

    entry = {"id": model.CONFIG_ID}
    if model.VLLM_INFO:
        name, env_stem, port = model.VLLM_INFO
        entry["local"] = {
            "model": name,
            "url_env": f"CUMULUS_{env_stem}_URL",
            "default_url": f"http://localhost:{port}/v1",
            "compose_service": model.COMPOSE_ID,
        }
    if model.AZURE_ID:
        entry["azure"] = {
            "model": model.AZURE_ID,
            "batches": model.AZURE_BATCHES,
            "schema": model.AZURE_SCHEMA,
            "prices": prices(model.AZURE_PRICES),
        }
    if model.BEDROCK_ID:
        entry["bedrock"] = {
            "model": model.BEDROCK_ID,
            "cache": model.BEDROCK_CACHE,
            "schema": model.BEDROCK_SCHEMA,
            "prices": prices(model.BEDROCK_PRICES),
        }
    return entry


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "dataflows/llm"
    os.makedirs(out, exist_ok=True)
    studies: dict[str, dict] = {}
    used_models: dict[str, type[models.Model]] = {}
    for task in task_factory.get_nlp_tasks():
        if not (isinstance(task, type) and issubclass(task, nlp_task.BaseModelTask)):
            continue  # the covid study's cTAKES tasks
        model = task.client_class
        used_models[model.CONFIG_ID] = model
        suffix = "_" + model.CONFIG_ID.replace("-", "_")
        assert task.name.endswith(suffix), task.name
        base = task.name[: -len(suffix)]
        study, _, _ = base.partition("__")
        output = task.outputs[0]
        definition = {
            "name": base,
            # "spans": rows as upstream's LLM studies write them, every `spans` list of the
            # answer made [start, end] positions; "covid_gpt": the covid study's older format.
            "kind": "spans" if issubclass(task, nlp_task.BaseModelTaskWithSpans) else "covid_gpt",
            "version": task.task_version,
            "uniqueness_fields": sorted(output.uniqueness_fields or []),
            "group_field": output.group_field,
            "system_prompt": task.get_system_prompt(),
            "user_prompt": task.user_prompt or "%CLINICAL-NOTE%",
            "response_format": models.OpenAIProvider.pydantic_to_response_format(
                task.response_format
            ),
            # The schema as Bedrock is given it (its tool's input schema), not made strict.
            "json_schema": task.response_format.model_json_schema(),
            "result": struct_of(task.response_format),
            "models": [],
        }
        tasks = studies.setdefault(study, {"study": study, "tasks": {}})["tasks"]
        known = tasks.setdefault(base, definition)
        known["models"].append(model.CONFIG_ID)
        for key in ("kind", "version", "system_prompt", "user_prompt", "response_format", "json_schema"):
            assert known[key] == definition[key], (task.name, key)
    for study, entry in studies.items():
        entry["tasks"] = list(entry["tasks"].values())
        with open(os.path.join(out, f"{study}.json"), "w", encoding="utf8") as f:
            json.dump(entry, f, indent=1, ensure_ascii=False)
            f.write("\n")
    with open(os.path.join(out, "models.json"), "w", encoding="utf8") as f:
        json.dump([model_entry(m) for m in used_models.values()], f, indent=1)
        f.write("\n")
    count = sum(len(t["models"]) for s in studies.values() for t in s["tasks"])
    print(f"{len(studies)} studies, {count} tasks, {len(used_models)} models written to {out}")


if __name__ == "__main__":
    main()

"""Every file skipjack reads goes through a schema at the boundary (`skipjack.schemas`): one-line errors that
name the file and the first problem, caches that are measured again when damaged, and no reader elsewhere that
indexes into `json.loads(...)` of a file itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from skipjack import schemas
from skipjack.errors import SkipjackError, Unavailable

SRC = Path(__file__).resolve().parents[1] / "src" / "skipjack"


@pytest.mark.parametrize(
    "data, needle",
    [
        ([1, 2], "the model config: expected a JSON object (got a list)"),
        ("x", "the model config: expected a JSON object (got a string)"),
        ({"model_type": "llama", "hidden_size": "64"}, "hidden_size must be a positive integer (got '64')"),
        ({"model_type": "llama", "num_hidden_layers": True}, "num_hidden_layers must be a positive integer"),
        ({"model_type": "llama", "rope_scaling": "linear"}, "rope_scaling: expected a JSON object (got a string)"),
        ({"model_type": "llama", "rope_scaling": {"factor": 0}}, "rope_scaling.factor: input should be greater"),
        ({"model_type": "llama", "layer_types": "full"}, "layer_types: input should be a valid list"),
        ({"model_type": "llama", "rms_norm_eps": "1e-6"}, "rms_norm_eps: input should be a valid number"),
        ({"model_type": "llama", "eos_token_id": "2"}, "eos_token_id"),
        ({"model_type": "gemma3", "text_config": []}, "text_config: expected a JSON object (got a list)"),
        ({"model_type": "llama", "tie_word_embeddings": "yes"}, "tie_word_embeddings: input should be a valid boolean"),
    ],
)
def test_a_model_config_of_the_wrong_shape_is_one_line(data, needle):
    from skipjack.models import normalise_config

    with pytest.raises(SkipjackError) as e:
        normalise_config(data)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_configs_that_load_today_still_pass():
    """Real configs carry keys skipjack does not read, nulls and lists: they pass through unchecked."""
    from conftest import FAMILIES, hf_config

    for family in FAMILIES:
        schemas.parse("c", hf_config(family).to_dict(), schemas.HFConfig)
    qwen = {"model_type": "qwen2", "sliding_window": None, "eos_token_id": [1, 2], "x": {}}
    schemas.parse("c", qwen, schemas.HFConfig)


def test_read_json_names_the_file_and_the_problem(tmp_path):
    f = tmp_path / "t.json"
    f.write_text("[1]")
    with pytest.raises(schemas.SchemaError) as e:
        schemas.read_json("the thing", f, schemas.CostPrior)
    assert str(e.value) == f"the thing {f}: expected a JSON object (got a list)"
    assert e.value.problem == "expected a JSON object (got a list)"
    f.write_text('{"widths": [1')
    with pytest.raises(schemas.SchemaError, match="not valid JSON"):
        schemas.read_json("the thing", f, schemas.CostPrior)
    f.write_bytes(b"\xff\xfe{}")
    with pytest.raises(schemas.SchemaError, match="not UTF-8"):
        schemas.read_json("the thing", f, dict)
    with pytest.raises(Unavailable, match="cannot read the thing"):
        schemas.read_json("the thing", tmp_path / "missing.json", dict)


@pytest.mark.parametrize(
    "text",
    ["", "{", "[]", "null", '{"widths": [1], "rel": [1], "slope": [0]}', '{"widths": [1], "rel": ["x"], "slope": [0], '
     '"beta": 0}', '{"widths": [1], "rel": [NaN], "slope": [0], "beta": 0}'],
)  # fmt: skip
def test_a_damaged_cache_reads_as_missing(tmp_path, text):
    f = tmp_path / "c.json"
    f.write_text(text)
    assert schemas.read_cache(f, schemas.CostPrior) is None
    assert schemas.read_cache(tmp_path / "none.json", schemas.CostPrior) is None


def test_prompt_lines_and_counts():
    assert schemas.parse("c", {"1": 2, "7": 0}, schemas.TokenCounts) == {1: 2, 7: 0}
    with pytest.raises(schemas.SchemaError):
        schemas.parse("c", {"1": -1}, schemas.TokenCounts)
    meta = {"format": "f", "version": "2", "tokens": "[1, 2]", "first": "[0]", "capacity": "8"}
    m = schemas.parse("m", meta, schemas.PromptCacheMeta)
    assert (m.tokens, m.first, m.capacity) == ([1, 2], [0], 8)
    with pytest.raises(schemas.SchemaError, match="tokens"):
        schemas.parse("m", meta | {"tokens": "[1, "}, schemas.PromptCacheMeta)


# Readers that parse a file's JSON themselves, outside `skipjack.schemas`, for the lead to route through it
# (#35: files of other workers); the list may only shrink.
UNCHECKED = {
    "integrity.py",
    "evaluation/harness.py",
    "bench/benchmarks_md.py",
    "bench/layers.py",
    "bench/schema.py",
    "bench/eval_report.py",
    "bench/summary.py",
}


def test_no_file_is_parsed_without_a_schema():
    """`json.load(f)` or `json.loads(<a file's text>)` appears in `skipjack.schemas` only: elsewhere a file's
    content would be indexed unchecked (a list where an object was expected: an AttributeError, not a line)."""
    rx = re.compile(r"json\.load\(|json\.loads\([^)\n]*read_(text|bytes)|json\.loads\(_read_text")
    found = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if rx.search(p.read_text())} - {"schemas.py"}
    assert found <= UNCHECKED, f"files parsed without a schema: {sorted(found - UNCHECKED)}"


def test_the_checker_sees_an_unchecked_read():
    rx = re.compile(r"json\.load\(|json\.loads\([^)\n]*read_(text|bytes)|json\.loads\(_read_text")
    assert rx.search("d = json.loads(path.read_text())") and rx.search("json.load(f)")
    assert not rx.search("json.loads(line)") and not rx.search("json.dumps(x)")

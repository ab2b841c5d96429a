"""The model id of a local source (a folder, a container): ``--model-id``, else the Hub id its
``config.json`` names, else a refusal that says what to pass; never ``MODEL_ID``."""

from __future__ import annotations

import json

import pytest

from shared.errors import InputError, SettingsError, UnsafeModelError
from shared.refresh.model_checks import is_hub_id, local_model_id


def config(**fields: object) -> bytes:
    return json.dumps({"model_type": "bert", **fields}).encode()


def test_the_model_id_given_wins_and_the_config_is_not_read() -> None:
    def unreadable() -> bytes:
        raise AssertionError("config.json read although --model-id was given")

    assert local_model_id(unreadable, given="local/minilm-squad", where="folder x", name="x") == "local/minilm-squad"
    with pytest.raises(SettingsError, match="--model-id must look like 'owner/name'"):
        local_model_id(unreadable, given="../up", where="folder x", name="x")


def test_the_hub_id_the_config_names() -> None:
    found = local_model_id(lambda: config(_name_or_path="deepset/roberta-base-squad2"), given=None, where="folder x", name="x")
    assert found == "deepset/roberta-base-squad2"


@pytest.mark.parametrize(
    ("named", "said"),
    [
        (None, "config.json names no model: pass --model-id ID (for example local/minilm-squad)"),
        ("", "config.json names no model: pass --model-id ID"),
        ("/home/me/out/checkpoint-500", "its _name_or_path is '/home/me/out/checkpoint-500'"),
        ("./my-model", "its _name_or_path is './my-model'"),
        ("C:\\models\\qa", "its _name_or_path is 'C:\\\\models\\\\qa'"),
        ("a/b/c", "its _name_or_path is 'a/b/c'"),
        ("bert-large-uncased-whole-word-masking-finetuned-squad", "names no model by a Hub id owner/name"),  # no owner
    ],
)
def test_a_config_that_names_no_hub_model_is_refused_saying_what_to_pass(named: str | None, said: str) -> None:
    fields = {} if named is None else {"_name_or_path": named}
    with pytest.raises(InputError) as raised:
        local_model_id(lambda: config(**fields), given=None, where="folder /m/minilm-squad", name="minilm-squad")
    message = raised.value.message
    assert said in message and message.startswith("folder /m/minilm-squad: ") and "\n" not in message, message
    assert "pass --model-id ID (for example local/minilm-squad)" in message


def test_the_example_id_is_a_valid_one_whatever_the_source_is_called() -> None:
    with pytest.raises(InputError, match=r"for example local/My-Model-v2\)"):
        local_model_id(lambda: config(), given=None, where="folder x", name="My Model (v2)")
    with pytest.raises(InputError, match=r"for example local/model\)"):
        local_model_id(lambda: config(), given=None, where="folder x", name="...")


def test_a_config_that_is_not_json_says_so() -> None:
    with pytest.raises(UnsafeModelError, match="config.json in folder x is not valid JSON"):
        local_model_id(lambda: b'{"model_type": "be', given=None, where="folder x", name="x")


def test_hub_ids() -> None:
    assert is_hub_id("deepset/roberta-base-squad2") and is_hub_id(" google-bert/bert-base-uncased ")
    assert not any(is_hub_id(t) for t in ("bert-base-uncased", "/abs/path", "./rel", "~/m", "a/", "a/b/c", "a b/c", "a/..", ""))

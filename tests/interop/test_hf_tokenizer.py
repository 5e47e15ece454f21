"""jsft's rendering of an HF chat template gives the token ids `transformers` gives."""

import json

import pytest

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from jsft.data.formats import Conversation, Message  # noqa: E402
from jsft.data.templates import build_template, prompt_ids, render  # noqa: E402
from jsft.data.tokenizer import load_tokenizer  # noqa: E402
from tests.data.test_templates import CHATML_JINJA, hf_dir  # noqa: E402, F401  (the fixture)

CASES = {
    "system_multi_turn": [
        ("system", "Be brief."),
        ("user", "What is 2 + 2?"),
        ("assistant", "4"),
        ("user", "And 3 + 3?"),
        ("assistant", "It is 6."),
    ],
    "no_system": [("user", "hello world"), ("assistant", "hello")],
}


def _hf_ids(tok, messages, add_generation_prompt, **template_kw):
    out = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        **template_kw,
    )
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(getattr(out, "ids", out))


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_ids_equal_apply_chat_template(hf_dir, case):  # noqa: F811
    ours_tok = load_tokenizer(str(hf_dir))
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    template = build_template("hf", tokenizer=ours_tok)
    messages = CASES[case]
    conv = Conversation(tuple(Message(r, c) for r, c in messages))
    ids, mask = render(template, ours_tok, conv)
    assert ids == _hf_ids(theirs, messages, add_generation_prompt=False)
    context, _ = conv.split_last_turn()
    assert prompt_ids(template, ours_tok, context) == _hf_ids(
        theirs, messages[:-1], add_generation_prompt=True
    )
    assert any(mask)


def _assert_same_ids(ours_dir, theirs, messages, **template_kw):
    tok = load_tokenizer(str(ours_dir))
    template = build_template("hf", tokenizer=tok)
    conv = Conversation(tuple(Message(r, c) for r, c in messages))
    ids, mask = render(template, tok, conv)
    expected = theirs.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], tokenize=False, **template_kw
    )
    assert ids == tok.encode(expected) and any(mask)
    assert ids == _hf_ids(theirs, messages, add_generation_prompt=False, **template_kw)


def test_a_tokenizer_saved_by_transformers_5_keeps_its_chat_template(hf_dir, tmp_path):  # noqa: F811
    # transformers 5 writes the template to chat_template.jinja, not into tokenizer_config.json.
    built = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(hf_dir / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_JINJA,
    )
    built.save_pretrained(str(tmp_path))
    assert (tmp_path / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CASES.values():
        _assert_same_ids(tmp_path, theirs, messages)


def test_a_legacy_chat_template_json_is_read(hf_dir, tmp_path):  # noqa: F811
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((hf_dir / name).read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    source = config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": source}))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    # AutoTokenizer ignores chat_template.json (AutoProcessor reads it): hand it the same template.
    _assert_same_ids(tmp_path, theirs, CASES["system_multi_turn"], chat_template=source)

"""jsft's rendering of an HF chat template gives the token ids `transformers` gives."""

import pytest

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from jsft.data.formats import Conversation, Message  # noqa: E402
from jsft.data.templates import build_template, prompt_ids, render  # noqa: E402
from jsft.data.tokenizer import load_tokenizer  # noqa: E402
from tests.data.test_templates import hf_dir  # noqa: E402, F401  (the fixture)

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


def _hf_ids(tok, messages, add_generation_prompt):
    out = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
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

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jsft.data.formats import BadRecord, Conversation, Message, to_conversation
from jsft.data.sources import DataError
from jsft.data.templates import JinjaTemplate, build_template, prompt_ids, render, stop_ids
from jsft.data.tokenizer import HFTokenizer, load_tokenizer, train_sentencepiece

CHAT = Conversation(
    (
        Message("system", "Be brief."),
        Message("user", "What is 2 + 2?"),
        Message("assistant", "4"),
        Message("user", "And 3 + 3?"),
        Message("assistant", "It is 6."),
    )
)
CHATML_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = ["Be brief. What is 2 + 2? 4 And 3 + 3? It is 6.", "You are helpful.", "hello world"] * 30


def trained_runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.fixture(scope="module")
def sp_chat_tokenizer(tmp_path_factory):
    special = (
        "<|im_start|>",
        "<|im_end|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<start_of_turn>",
        "<end_of_turn>",
    )
    return train_sentencepiece(TEXTS, 320, str(tmp_path_factory.mktemp("sp") / "t.model"), special)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer directory in Hugging Face layout, built on the spot."""
    d = tmp_path_factory.mktemp("hf_tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML_JINJA,
            }
        )
    )
    return d


def test_plain_trains_exactly_the_response_and_eos(sp_chat_tokenizer):
    tok = sp_chat_tokenizer
    conv = Conversation((Message("user", "What is 2 + 2?"), Message("assistant", "It is 6.")))
    ids, mask = render(build_template("plain", "\n"), tok, conv)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    (run,) = trained_runs(ids, mask)
    assert run[-1] == tok.eos_id and tok.decode(run[:-1]) == "It is 6."
    assert ids[: mask.index(True)] == prompt_ids(
        build_template("plain", "\n"), tok, Conversation(conv.messages[:1])
    )


@pytest.mark.parametrize(
    "name,end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>")]
)
def test_builtin_chat_templates_train_every_reply_and_its_end_token(sp_chat_tokenizer, name, end):
    tok, template = sp_chat_tokenizer, build_template(name)
    ids, mask = render(template, tok, CHAT)
    runs = trained_runs(ids, mask)
    assert [tok.decode(r) for r in runs] == [f"4{end}", f"It is 6.{end}"]
    assert tok.token_id(end) in stop_ids(template, tok) and tok.token_id(end) != tok.eos_id
    last_only = trained_runs(*render(template, tok, CHAT, "last_assistant"))
    assert [tok.decode(r) for r in last_only] == [f"It is 6.{end}"]
    # The prompt for the last reply is exactly the untrained-and-earlier part of the full render.
    context, _ = CHAT.split_last_turn()
    p = prompt_ids(template, tok, context)
    assert ids[: len(p)] == p and mask[len(p)] and not mask[len(p) - 1]


def test_gemma_writes_gemmas_turns_with_the_system_prompt_in_the_first_user_turn(sp_chat_tokenizer, hf_dir):
    template = build_template("gemma")
    ids, mask = render(template, sp_chat_tokenizer, CHAT)
    assert ids[0] == sp_chat_tokenizer.bos_id and not mask[0]
    tok = load_tokenizer(str(hf_dir))  # byte-level: decoding gives back the exact text (and no BOS)
    ids, mask = render(template, tok, CHAT)
    assert tok.decode(ids) == (
        "<start_of_turn>user\nBe brief.\n\nWhat is 2 + 2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3 + 3?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 6.<end_of_turn>\n"
    )
    assert [tok.decode(r) for r in trained_runs(ids, mask)] == ["4<end_of_turn>", "It is 6.<end_of_turn>"]
    context, _ = CHAT.split_last_turn()
    assert tok.decode(prompt_ids(template, tok, context)).endswith(
        "<start_of_turn>user\nAnd 3 + 3?<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(BadRecord, match="config.data.template='gemma' cannot write"):
        render(template, tok, to_conversation(TOOL_CHAT, "chat", {}))


# The string-content path of Gemma's tokenizer chat template (Gemma 2, 3), restated: BOS, no system
# role (its text and a blank line open the first user turn), `model` for the assistant, trimmed turns.
GEMMA_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + m['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def test_hf_template_trains_exactly_what_builtin_gemma_trains(tmp_path):
    from tests.conftest import save_chatml_bpe_tokenizer  # noqa: PLC0415

    save_chatml_bpe_tokenizer(tmp_path, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"))
    config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<|endoftext|>",
        "chat_template": GEMMA_JINJA,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(tmp_path))
    hf_template, gemma = build_template("hf", tokenizer=tok), build_template("gemma")
    assert hf_template.end_of_turn == "<end_of_turn>" and tok.bos_id == tok.token_id("<bos>")
    for train_on in ("all_assistant", "last_assistant"):
        assert render(hf_template, tok, CHAT, train_on) == render(gemma, tok, CHAT, train_on)
    context, _ = CHAT.split_last_turn()
    assert prompt_ids(hf_template, tok, context) == prompt_ids(gemma, tok, context)
    assert stop_ids(hf_template, tok) == stop_ids(gemma, tok)


def test_hf_jinja_template_masks_on_ids_and_matches_the_plain_render(hf_dir):
    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer) and tok.eos_token == "<|im_end|>" and tok.bos_id is None
    template = build_template("hf", tokenizer=tok)
    conv = Conversation(CHAT.messages[1:])  # no system turn: the template adds its default one
    ids, mask = render(template, tok, conv)
    # The whole id sequence is what tokenizing the rendered conversation gives.
    rendered = template.render_text(list(conv.messages), add_generation_prompt=False)
    assert rendered.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n")
    assert ids == tok.encode(rendered)
    runs = [tok.decode(r) for r in trained_runs(ids, mask)]
    assert runs == ["4<|im_end|>", "It is 6.<|im_end|>"]  # the reply and its end-of-turn, not the "\n"
    assert not any("helpful" in tok.decode([i]) for i, m in zip(ids, mask, strict=True) if m)
    context, _ = conv.split_last_turn()
    gen = prompt_ids(template, tok, context)
    assert tok.decode(gen).endswith("<|im_start|>assistant\n") and ids[: len(gen)] == gen


def test_hf_template_trains_exactly_what_builtin_chatml_trains(hf_dir):
    tok = load_tokenizer(str(hf_dir))
    hf_template = build_template("hf", tokenizer=tok)
    assert hf_template.end_of_turn == "<|im_end|>"
    for train_on in ("all_assistant", "last_assistant"):
        assert render(hf_template, tok, CHAT, train_on) == render(
            build_template("chatml"), tok, CHAT, train_on
        )
    assert stop_ids(hf_template, tok) == stop_ids(build_template("chatml"), tok)


def test_hf_template_with_an_end_of_turn_that_is_not_eos(hf_dir):
    # Gemma-style: replies end with a special token other than EOS, then a newline. That token is
    # trained, the newline is not, and generation stops at it.
    tok = load_tokenizer(str(hf_dir))
    tok.eos_token, tok.eos_id = "<|endoftext|>", tok.token_id("<|endoftext|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = build_template("hf", tokenizer=tok)
    assert template.end_of_turn == "<|im_end|>" and tok.token_id("<|im_end|>") in stop_ids(template, tok)
    conv = Conversation((Message("user", "hello"), Message("assistant", " hello world ")))
    ids, mask = render(template, tok, conv)
    assert [tok.decode(r) for r in trained_runs(ids, mask)] == ["hello world<|im_end|>"]
    assert tok.decode(ids).endswith("<|im_end|>\n") and not mask[-1]


def test_a_template_that_rewrites_history_is_refused(hf_dir):
    # Renders earlier assistant turns differently once a later turn exists (like templates that strip
    # reasoning from history): replies cannot be located by prefix, so the record is refused.
    source = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
        "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    template = JinjaTemplate(source, "", "<|im_end|>")
    with pytest.raises(BadRecord, match="renders earlier turns differently"):
        render(template, load_tokenizer(str(hf_dir)), Conversation(CHAT.messages[1:]))


def test_empty_mask_is_a_bad_record_and_unknown_template_a_config_error(sp_chat_tokenizer):
    template = JinjaTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(BadRecord, match="nothing to train"):
        # Every reply renders to the empty string, so no token is trained.
        render(
            JinjaTemplate(
                "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
            ),
            sp_chat_tokenizer,
            CHAT,
        )
    assert template.segments(CHAT, sp_chat_tokenizer)
    with pytest.raises(ValueError, match="config.data.template"):
        build_template("vicuna")
    with pytest.raises(DataError) as e:
        build_template("hf", tokenizer=sp_chat_tokenizer)
    message = str(e.value)
    assert (
        message.startswith("config.data.template='hf': the tokenizer ") and sp_chat_tokenizer.path in message
    )
    assert "has no chat template" in message and "chatml, gemma, llama3 or plain" in message


def test_text_records_train_every_token(sp_chat_tokenizer):
    tok = sp_chat_tokenizer
    ids, mask = render(
        build_template("chatml"), tok, Conversation((Message("assistant", "hello world"),), is_text=True)
    )
    assert ids[0] == tok.bos_id and not mask[0] and all(mask[1:])
    assert tok.decode(ids[1:-1]) == "hello world" and ids[-1] == tok.eos_id


TOOL_CHAT = {
    "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Use the tool.",
            "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
            ],
        },
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4", "reasoning_content": "The tool said 4."},
    ],
}


@pytest.mark.parametrize(
    "name,trained,tool_turn,system",
    [
        (
            "chatml",
            [
                "<think>\nUse the tool.\n</think>\n\n<tool_call>\n"
                '{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>',
                "<think>\nThe tool said 4.\n</think>\n\n4<|im_end|>",
            ],
            "<|im_start|>tool\n4<|im_end|>",
            "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call the functions",
        ),
        (
            "llama3",
            [
                "<think>\nUse the tool.\n</think>\n\n"
                '{"name": "add", "parameters": {"a": 2, "b": 2}}<|eot_id|>',
                "<think>\nThe tool said 4.\n</think>\n\n4<|eot_id|>",
            ],
            "<|start_header_id|>ipython<|end_header_id|>\n\n4<|eot_id|>",
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.\n\nYou have access to the following",
        ),
    ],
)
def test_builtin_templates_write_tools_calls_and_thinking_and_train_the_replies(
    hf_dir, name, trained, tool_turn, system
):
    tok, template = load_tokenizer(str(hf_dir)), build_template(name)
    conv = to_conversation(TOOL_CHAT, "chat", {})
    ids, mask = render(template, tok, conv)
    assert [tok.decode(r) for r in trained_runs(ids, mask)] == trained
    text = tok.decode(ids)
    assert tool_turn in text and system in text and json.dumps(TOOL_CHAT["tools"][0]) in text
    # train_reasoning=False: the thinking is gone from the text, not only from the loss.
    ids, mask = render(template, tok, conv, train_reasoning=False)
    assert "<think>" not in tok.decode(ids) and [tok.decode(r) for r in trained_runs(ids, mask)] == [
        t.split("</think>\n\n")[1] for t in trained
    ]


def test_plain_refuses_tools_naming_the_setting_and_writes_thinking(sp_chat_tokenizer):
    with pytest.raises(
        BadRecord, match=r"config.data.template='plain' cannot write; set config.data.template"
    ):
        render(build_template("plain"), sp_chat_tokenizer, to_conversation(TOOL_CHAT, "chat", {}))
    conv = Conversation((Message("user", "2 + 2?"), Message("assistant", "4", reasoning="two and two")))
    ids, mask = render(build_template("plain"), sp_chat_tokenizer, conv)
    assert sp_chat_tokenizer.decode(trained_runs(ids, mask)[0][:-1]) == "<think>\ntwo and two\n</think>\n\n4"

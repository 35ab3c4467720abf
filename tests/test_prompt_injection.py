"""Message content is data: only a chat template's own markup becomes control tokens.

llama.cpp's tokenizer with ``parse_special`` turns ``<|im_end|>`` typed in a message into the
real end of turn, so a user could write a system turn of their own. These tests run the real
tokenizer of the default model (ChatML) through :meth:`ChatTemplate.tokenize`.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqlease
from helpers import INJECTION
from helpers import control_tokens as _controls
from seqlease.chat.template import FALLBACK_TEMPLATE, ChatTemplate

# A Llama 3 style template (content trimmed) written with ChatML's tokens, which the default
# model has: templates that trim must be followed too.
TRIMMING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n\n{{ m.content | trim }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
)
REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module", params=["session", "completion"])
def ctx(request):
    with seqlease.Context(sequences=1, n_ctx=512, n_threads=1, backend=request.param) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def model():
    with seqlease.Context(sequences=1, n_ctx=256, n_threads=1) as ctx:
        yield ctx.model


def _plain(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**m, "content": "x"} for m in messages]


def test_a_user_message_cannot_open_a_system_turn_in_a_chat_session(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt="Be brief.")
        chat.prompt(INJECTION, temperature=0, max_tokens=1)
        result = chat.last_result
        assert result is not None
        asked = chat.history[:2]
        prompt = chat.template.tokenize(seq.model, asked)
        assert result.n_prompt == len(prompt)
        if ctx.backend.name == "session":
            assert ctx.probe.held(seq.id)[: len(prompt)] == tuple(prompt)
        # Exactly the template's control tokens: system, user, assistant turns, no fourth.
        markup = chat.template.tokenize(seq.model, _plain(asked))
        assert _controls(ctx.model, prompt) == _controls(ctx.model, markup)
        # The text typed is all there, as text.
        assert ctx.model.detokenize(prompt, special=True) == chat.template.render(asked)


def test_llama_cpps_own_tokenizer_would_have_made_it_a_system_turn(model):
    # The flaw the test above guards against: what the whole rendered text gives.
    template = ChatTemplate.from_model(model)
    messages = [{"role": "user", "content": INJECTION}]
    parsed = model.tokenize(template.render(messages), special=True)
    assert (
        len(_controls(model, parsed))
        == len(_controls(model, template.tokenize(model, _plain(messages)))) + 2
    )
    assert _controls(model, template.tokenize(model, messages)) == _controls(
        model, template.tokenize(model, _plain(messages))
    )


CONTENT = st.lists(
    st.sampled_from(
        ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "system", "user", "\n", " ", "  ", "a"]
    )
    # Assigned characters: llama.cpp's tokenizer does not round-trip unassigned ones.
    | st.text(
        st.characters(max_codepoint=0x2FFF, exclude_categories=["Cc", "Cs", "Co", "Cn"]), max_size=6
    ),
    max_size=8,
).map("".join)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    contents=st.lists(CONTENT, min_size=1, max_size=4),
    source=st.sampled_from([None, TRIMMING, FALLBACK_TEMPLATE]),
)
def test_any_content_stays_text_in_any_template_that_keeps_or_trims_it(model, contents, source):
    template = ChatTemplate(source or model.chat_template)
    roles = ["system", "user", "assistant", "user"]
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)]
    tokens = template.tokenize(model, messages)
    assert model.detokenize(tokens, special=True) == template.render(messages)
    assert _controls(model, tokens) == _controls(model, template.tokenize(model, _plain(messages)))
    if not any(c.text in m["content"] for c in model.control_tokens for m in messages):
        # Content without control text: exactly what llama.cpp itself makes of the prompt.
        assert tokens == model.tokenize(template.render(messages), special=True)


def test_a_template_that_rewrites_content_refuses_control_text_and_takes_the_rest(model):
    template = ChatTemplate(REWRITING)
    with pytest.raises(
        seqlease.SeqleaseError, match=r"control-token text '<\|im_start\|>'.*remove"
    ):
        template.tokenize(model, [{"role": "user", "content": INJECTION}])
    plain = [{"role": "user", "content": "hi there"}]
    assert template.tokenize(model, plain) == model.tokenize(template.render(plain), special=True)

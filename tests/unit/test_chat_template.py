"""Chat templates: every real template in the test data, parity with transformers, errors, loading."""

from __future__ import annotations

import copy
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mistralrs_serve.errors import ChatTemplateError, ModelLoadError
from mistralrs_serve.tokenizer import chat_template as chat_template_module
from mistralrs_serve.tokenizer.chat_template import ChatTemplate, flatten_text_content, load_chat_template
from template_data import MISSING_TESTDATA, TEMPLATE_DIR

TEMPLATE_FILES = sorted(TEMPLATE_DIR.glob("*.jinja"))

BOS, EOS = "<s>", "</s>"
FIXED_NOW = dt.datetime(2025, 3, 14, 9, 26, 53)

# --- Conversations, as an OpenAI client sends them (arguments as JSON text, content null beside calls) ---

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}
# Mistral templates demand tool-call ids of exactly 9 alphanumerics; every other template accepts them.
CALL_ID = "Abc123XyZ"

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hello there <b>&</b> café"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What's the weather like?"},
]
TOOL_CHAT = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather", "content": '{"temperature": 21}'},
]
REASONING_CHAT = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        # gpt-oss refuses both content and reasoning beside tool calls.
        "content": None,
        "reasoning": "The user wants the weather; call the tool.",
        "tool_calls": TOOL_CHAT[1]["tool_calls"],
    },
    TOOL_CHAT[2],
]


@dataclass(frozen=True)
class Expect:
    """What one template does with CHAT and TOOL_CHAT: None renders, a string is the expected error text."""

    chat_error: str | None = None
    tool_chat_error: str | None = None
    supports_tools: bool = True
    supports_thinking: bool = False
    renders_tool_calls: bool = True  # an assistant message's tool calls appear in the prompt
    renders_tool_results: bool = True  # tool messages appear in the prompt


# One entry per test data file; a file without one fails `test_every_template_has_expectations`.
EXPECTATIONS: dict[str, Expect] = {
    # This (Unsloth-edited) SmolLM3 template has no tool support: calls are dropped, results shown as user.
    "HuggingFaceTB-SmolLM3-3B": Expect(
        supports_tools=False, supports_thinking=True, renders_tool_calls=False
    ),
    "Mistral-Small-3.2-24B-Instruct-2506": Expect(),
    # The "tool_use" variant of a tokenizer_config's named templates: without tools it loops over None.
    # transformers only picks it when tools are given, and so does load_chat_template.
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": Expect(chat_error="'NoneType' object is not iterable"),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": Expect(chat_error="'NoneType' object is not iterable"),
    "Qwen-QwQ-32B": Expect(supports_thinking=True),
    "Qwen-Qwen2.5-7B-Instruct": Expect(),
    "Qwen-Qwen3-0.6B": Expect(supports_thinking=True),
    "Qwen3-Coder": Expect(),
    "Qwen3.5-4B": Expect(supports_thinking=True),
    # These two templates have no tool section: tools are ignored (tool calls in history still render).
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": Expect(supports_tools=False, supports_thinking=True),
    "deepseek-ai-DeepSeek-V3.1": Expect(supports_tools=False, supports_thinking=True),
    # Gemma 2 knows only user/model turns that strictly alternate: no system role, no tool role.
    "google-gemma-2-2b-it": Expect(
        chat_error="System role not supported",
        tool_chat_error="Conversation roles must alternate user/assistant/user/assistant/...",
        supports_tools=False,
    ),
    "google-gemma-4-31B-it": Expect(supports_thinking=True),
    # Lists tools, but renders only the content of an assistant message, not its tool calls.
    "ibm-granite-granite-3.3-2B-Instruct": Expect(renders_tool_calls=False),
    "meta-llama-Llama-3.1-8B-Instruct": Expect(),
    "meta-llama-Llama-3.2-3B-Instruct": Expect(),
    # No tool support at all: tool calls and tool messages are left out of the prompt.
    "microsoft-Phi-3.5-mini-instruct": Expect(
        supports_tools=False, renders_tool_calls=False, renders_tool_results=False
    ),
    "mistralai-Mistral-Nemo-Instruct-2407": Expect(),
    "openai-gpt-oss-120b": Expect(),
}


def _template_params() -> list[Any]:
    if not TEMPLATE_FILES:
        return [pytest.param(None, marks=pytest.mark.skip(reason=MISSING_TESTDATA), id="no-testdata")]
    return [pytest.param(path, id=path.stem) for path in TEMPLATE_FILES]


def _load(path: Path) -> ChatTemplate:
    return ChatTemplate(path.read_text(encoding="utf-8"), origin=str(path), bos_token=BOS, eos_token=EOS)


def _named(stem: str) -> ChatTemplate:
    path = TEMPLATE_DIR / f"{stem}.jinja"
    if not path.is_file():
        pytest.skip(MISSING_TESTDATA)
    return _load(path)


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin `strftime_now` (ours and transformers') so date-stamped templates compare on any day."""

    class FixedDatetime(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> FixedDatetime:  # type: ignore[override]
            return cls.fromtimestamp(FIXED_NOW.timestamp(), tz)

    monkeypatch.setattr(chat_template_module, "datetime", FixedDatetime)
    try:
        import transformers.utils.chat_template_utils as hf_utils
    except ImportError:
        return
    monkeypatch.setattr(hf_utils, "datetime", FixedDatetime, raising=False)


# --- Every template in the test data ---------------------------------------------------------------


def test_every_template_has_expectations() -> None:
    if not TEMPLATE_FILES:
        pytest.skip(MISSING_TESTDATA)
    assert sorted(path.stem for path in TEMPLATE_FILES) == sorted(EXPECTATIONS)


@pytest.mark.parametrize("path", _template_params())
def test_renders_chat(path: Path) -> None:
    template, expect = _load(path), EXPECTATIONS[path.stem]
    if expect.chat_error is not None:
        with pytest.raises(ChatTemplateError, match=expect.chat_error.replace(".", r"\.")) as info:
            template.render(CHAT, add_generation_prompt=True)
        assert info.value.param == "messages"
        return
    text = template.render(CHAT, add_generation_prompt=True)
    for message in CHAT:
        assert message["content"] in text
    assert "{{" not in text and "{%" not in text


@pytest.mark.parametrize("path", _template_params())
def test_renders_tool_chat(path: Path) -> None:
    template, expect = _load(path), EXPECTATIONS[path.stem]
    assert template.supports_tools == expect.supports_tools
    assert template.supports_thinking == expect.supports_thinking
    if expect.tool_chat_error is not None:
        with pytest.raises(ChatTemplateError, match=expect.tool_chat_error.replace(".", r"\.")):
            template.render(TOOL_CHAT, tools=[WEATHER_TOOL])
        return
    text = template.render(TOOL_CHAT, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert "What's the weather in Paris?" in text
    if expect.renders_tool_calls:
        assert "celsius" in text  # an argument value, whatever the family's call syntax
    if expect.renders_tool_results:
        assert '{"temperature": 21}' in text or '"{\\"temperature\\": 21}"' in text
    if expect.supports_tools:
        assert "get_weather" in text
        assert "Get the current weather for a city" in text
        assert "The city name" in text


def test_mistral_rejects_openai_style_call_ids() -> None:
    messages = copy.deepcopy(TOOL_CHAT)
    messages[1]["tool_calls"][0]["id"] = messages[2]["tool_call_id"] = "call_0"
    for stem in ("mistralai-Mistral-Nemo-Instruct-2407", "Mistral-Small-3.2-24B-Instruct-2506"):
        with pytest.raises(
            ChatTemplateError, match="Tool call IDs should be alphanumeric strings with length 9"
        ):
            _named(stem).render(messages, tools=[WEATHER_TOOL])


# --- Parity with transformers' apply_chat_template -------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {BOS: 0, EOS: 1, "<unk>": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS)


def _as_transformers_expects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """transformers wants arguments as objects and drops `content: None`, which most templates then
    trip over; give it what our preparation produces."""
    prepared = copy.deepcopy(messages)
    for message in prepared:
        if message.get("content") is None:
            message["content"] = ""
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return prepared


SCENARIOS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "chat": (CHAT, {}),
    "chat-no-generation-prompt": (CHAT, {"add_generation_prompt": False}),
    "thinking-on": (CHAT, {"enable_thinking": True}),
    "thinking-off": (CHAT, {"enable_thinking": False}),
    "tools": (TOOL_CHAT, {"tools": [WEATHER_TOOL]}),
    "reasoning-history": (REASONING_CHAT, {"tools": [WEATHER_TOOL]}),
    "reasoning-effort": (CHAT, {"reasoning_effort": "high"}),
    "llama-date": (CHAT, {"date_string": "01 Jan 2025"}),
}


# Templates that refuse some scenarios (see EXPECTATIONS); all others must render every scenario.
REFUSING_TEMPLATES = {
    "google-gemma-2-2b-it",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
}


def _parity_params() -> list[Any]:
    if not TEMPLATE_FILES:
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=MISSING_TESTDATA), id="no-testdata")]
    return [
        pytest.param(path, scenario, id=f"{path.stem}-{scenario}")
        for path in TEMPLATE_FILES
        for scenario in SCENARIOS
    ]


@pytest.mark.parametrize(("path", "scenario"), _parity_params())
def test_matches_transformers(hf_tokenizer: Any, path: Path, scenario: str) -> None:
    messages, kwargs = SCENARIOS[scenario]
    kwargs = {"add_generation_prompt": True, **kwargs}
    source = path.read_text(encoding="utf-8")
    try:
        expected = hf_tokenizer.apply_chat_template(
            _as_transformers_expects(messages), chat_template=source, tokenize=False, **kwargs
        )
    except Exception as exc:  # the template refuses this conversation: we must refuse it too
        assert path.stem in REFUSING_TEMPLATES, exc
        with pytest.raises(ChatTemplateError):
            _load(path).render(messages, **kwargs)
        return
    assert _load(path).render(messages, **kwargs) == expected


# Pairs that must render (not refuse) and match exactly: guards the test above against passing only
# because both sides raised.
REQUIRED_PARITY = [
    ("Qwen-Qwen2.5-7B-Instruct", "tools"),
    ("Qwen-Qwen3-0.6B", "chat"),
    ("Qwen-Qwen3-0.6B", "thinking-on"),
    ("Qwen-Qwen3-0.6B", "thinking-off"),
    ("Qwen-Qwen3-0.6B", "reasoning-history"),
    ("meta-llama-Llama-3.1-8B-Instruct", "tools"),
    ("meta-llama-Llama-3.2-3B-Instruct", "llama-date"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "tools"),
    ("HuggingFaceTB-SmolLM3-3B", "thinking-off"),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "tools"),
    ("openai-gpt-oss-120b", "tools"),
    ("openai-gpt-oss-120b", "reasoning-effort"),
    ("openai-gpt-oss-120b", "reasoning-history"),
]


@pytest.mark.parametrize(("stem", "scenario"), REQUIRED_PARITY)
def test_required_templates_match_transformers(hf_tokenizer: Any, stem: str, scenario: str) -> None:
    template = _named(stem)
    messages, kwargs = SCENARIOS[scenario]
    kwargs = {"add_generation_prompt": True, **kwargs}
    expected = hf_tokenizer.apply_chat_template(
        _as_transformers_expects(messages), chat_template=template.source, tokenize=False, **kwargs
    )
    assert template.render(messages, **kwargs) == expected
    if "tools" in kwargs:
        assert "get_weather" in expected


@pytest.mark.parametrize(
    "stem", ["Mistral-Small-3.2-24B-Instruct-2506", "Qwen3.5-4B", "google-gemma-4-31B-it"]
)
def test_content_parts_pass_through_to_templates_that_iterate_them(hf_tokenizer: Any, stem: str) -> None:
    template = _named(stem)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}
    ]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=template.source, tokenize=False, add_generation_prompt=True
    )
    assert template.render(messages) == expected


@pytest.mark.parametrize("stem", ["Qwen-Qwen2.5-7B-Instruct", "HuggingFaceTB-SmolLM3-3B"])
def test_content_parts_flattened_for_string_only_templates(hf_tokenizer: Any, stem: str) -> None:
    template = _named(stem)
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}
    ]
    as_string = [{"role": "user", "content": "first\nsecond"}]
    expected = hf_tokenizer.apply_chat_template(
        as_string, chat_template=template.source, tokenize=False, add_generation_prompt=True
    )
    assert template.render(parts) == expected


def test_strftime_now_uses_the_clock() -> None:
    text = _named("Mistral-Small-3.2-24B-Instruct-2506").render([{"role": "user", "content": "hi"}])
    assert "The current date is 2025-03-14." in text


# --- The rendering environment ----------------------------------------------------------------------


def _render(source: str, messages: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
    template = ChatTemplate(source, origin="test", bos_token=BOS, eos_token=EOS)
    return template.render(messages if messages is not None else [{"role": "user", "content": "x"}], **kwargs)


def test_environment_trims_blocks_and_has_loop_controls() -> None:
    source = "{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}"
    source += "{{ m.content }}\n{% endfor %}"
    assert _render(source, [{"content": "a"}, {"content": "b"}]) == "a\n"


def test_tojson_keeps_html_unicode_and_key_order() -> None:
    value = {"z": "<b>&'</b>", "a": "café"}
    assert _render("{{ v | tojson }}", v=value) == '{"z": "<b>&\'</b>", "a": "café"}'
    assert _render("{{ v | tojson(indent=2) }}", v={"k": 1}) == '{\n  "k": 1\n}'


def test_context_variables() -> None:
    source = (
        "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools }}|{{ documents }}|{{ custom }}"
    )
    assert _render(source, custom=7) == "<s>|</s>|True|None|None|7"
    assert _render(source, add_generation_prompt=False, tools=[], custom=None) == "<s>|</s>|False|None|None|"


def test_missing_special_tokens_are_empty_strings() -> None:
    template = ChatTemplate("{{ bos_token + 'x' + eos_token }}", origin="test")
    assert template.render([]) == "x"


def test_enable_thinking_is_passed_only_when_given() -> None:
    source = "{{ enable_thinking is defined }} {{ enable_thinking | default('-') }}"
    assert _render(source) == "False -"
    assert _render(source, enable_thinking=False) == "True False"
    assert _render(source, enable_thinking=True) == "True True"


def test_generation_tag_renders_its_body() -> None:
    assert _render("[{% generation %}{{ messages[0].content }}{% endgeneration %}]") == "[x]"


def test_tool_call_arguments_json_text_is_parsed() -> None:
    source = "{% for c in messages[0].tool_calls %}{{ c.function.arguments | tojson }};{% endfor %}"
    calls = [
        {"function": {"name": "f", "arguments": '{"b": 1, "a": [true]}'}},
        {"function": {"name": "f", "arguments": "not json"}},
        {"function": {"name": "f", "arguments": "[1, 2]"}},  # not an object: templates iterate `|items`
        {"function": {"name": "f", "arguments": {"already": "parsed"}}},
    ]
    messages = [{"role": "assistant", "content": None, "tool_calls": calls}]
    original = copy.deepcopy(messages)
    expected = '{"b": 1, "a": [true]};"not json";"[1, 2]";{"already": "parsed"};'
    assert _render(source, messages) == expected
    assert messages == original  # the caller's messages are not modified


def test_none_values_dropped_and_content_defaulted() -> None:
    source = "{{ messages[0].content | tojson }} {{ messages[0].name is defined }}"
    assert _render(source, [{"role": "assistant", "content": None, "name": None}]) == '"" False'


def test_reasoning_aliases() -> None:
    source = "{{ messages[0].reasoning_content }}|{{ messages[0].thinking }}"
    assert _render(source, [{"role": "assistant", "reasoning": "r"}]) == "r|r"
    assert _render(source, [{"role": "assistant", "thinking": "t"}]) == "t|t"


def test_flatten_text_content() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"text": "b"}]},
        {"role": "user", "content": "plain"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    original = copy.deepcopy(messages)
    assert [m["content"] for m in flatten_text_content(messages)] == ["a\nb", "plain", ""]
    assert messages == original


def test_content_heuristic() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert _render("{{ messages[0].content }}", parts) == "a\nb"
    iterating = "{% for p in messages[0]['content'] %}<{{ p.text }}>{% endfor %}"
    assert _render(iterating, parts) == "<a><b>"
    assert _render("{{ messages[0].content[1].text }}", parts) == "b"


# --- Errors and the sandbox --------------------------------------------------------------------------


def test_syntax_error_names_origin() -> None:
    with pytest.raises(ModelLoadError, match=r"/models/x/chat_template\.jinja.*line 2"):
        ChatTemplate("ok\n{% if %}", origin="/models/x/chat_template.jinja")


def test_unknown_filter_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match=r"GGUF metadata of m\.gguf"):
        ChatTemplate("{{ x | no_such_filter }}", origin="GGUF metadata of m.gguf")


def test_raise_exception_message_is_kept() -> None:
    with pytest.raises(ChatTemplateError) as info:
        _render("{{ raise_exception('x: roles must alternate') }}")
    assert str(info.value) == "x: roles must alternate"
    assert info.value.param == "messages"


def test_runtime_error_is_a_chat_template_error_with_line() -> None:
    with pytest.raises(ChatTemplateError, match=r"line 3.*TypeError") as info:
        _render("a\nb\n{{ messages[0].content + 1 }}")
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{% set x = messages.append({'role': 'user'}) %}",  # immutable sandbox: no mutating methods
        "{% set ns = namespace(_private=1) %}",
        "{% set ns = namespace(a=1) %}{% set ns.__class__ = 1 %}",
    ],
)
def test_sandbox_blocks_escapes(source: str) -> None:
    with pytest.raises(ChatTemplateError, match=r"unsafe|may not set"):
        _render(source)


def test_unsafe_attribute_renders_nothing() -> None:
    # Like transformers: a blocked attribute is undefined (empty) unless used further, which raises.
    assert _render("[{{ ''.__class__ }}]") == "[]"


def test_dict_global_is_limited() -> None:
    assert _render("{{ dict(a=1) }}{{ dict.fromkeys(['b'], 2) }}") == "{'a': 1}{'b': 2}"
    assert _render("{{ dict.mro }}") == ""


def test_non_mapping_message_is_rejected() -> None:
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]"):
        _render("{{ messages }}", ["hello"])  # type: ignore[list-item]


# --- load_chat_template ------------------------------------------------------------------------------


def _loader(**overrides: Any) -> ChatTemplate | None:
    arguments: dict[str, Any] = {
        "override": None,
        "model_dir": None,
        "gguf_metadata": None,
        "tokenizer_config": None,
        "bos_token": BOS,
        "eos_token": EOS,
    }
    arguments.update(overrides)
    return load_chat_template(**arguments)


def _source(template: ChatTemplate | None) -> str:
    assert template is not None
    return template.source


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "chat_template.jinja").write_text("from jinja file", encoding="utf-8")
    return tmp_path


def test_priority_order(model_dir: Path) -> None:
    config = {"chat_template": "from tokenizer_config"}
    gguf = {"tokenizer.chat_template": "from gguf"}
    everything = {"model_dir": model_dir, "tokenizer_config": config, "gguf_metadata": gguf}
    assert _source(_loader(override="{{ 'override' }}", **everything)) == "{{ 'override' }}"
    assert _source(_loader(**everything)) == "from jinja file"
    (model_dir / "chat_template.jinja").unlink()
    assert _source(_loader(**everything)) == "from tokenizer_config"
    assert _source(_loader(model_dir=model_dir, gguf_metadata=gguf)) == "from gguf"
    assert _source(_loader(tokenizer_config={"chat_template": ""}, gguf_metadata=gguf)) == "from gguf"
    assert _loader(model_dir=model_dir, tokenizer_config={}, gguf_metadata={}) is None


def test_tokens_and_origin_are_passed(model_dir: Path) -> None:
    template = _loader(model_dir=model_dir, override="{{ bos_token }}{{ eos_token }}")
    assert template is not None and template.render([]) == "<s></s>"
    from_gguf = _loader(gguf_metadata={"tokenizer.chat_template": b"{{ 'bytes' }}"})
    assert from_gguf is not None and "GGUF" in from_gguf.origin and from_gguf.render([]) == "bytes"


@pytest.mark.parametrize("suffix", [".jinja", ".txt"])
def test_override_path(tmp_path: Path, model_dir: Path, suffix: str) -> None:
    path = tmp_path / f"custom{suffix}"
    path.write_text("custom {{ messages | length }}", encoding="utf-8")
    template = _loader(override=str(path), model_dir=model_dir)
    assert template is not None and template.origin == str(path)
    assert template.render([{"role": "user", "content": "x"}]) == "custom 1"


def test_override_json_file(tmp_path: Path) -> None:
    path = tmp_path / "chat_template.json"
    path.write_text(json.dumps({"chat_template": "json {{ 1 }}"}), encoding="utf-8")
    assert _source(_loader(override=str(path))) == "json {{ 1 }}"


def test_override_literal_needs_template_syntax(tmp_path: Path) -> None:
    assert _source(_loader(override="{% if true %}y{% endif %}")) == "{% if true %}y{% endif %}"
    with pytest.raises(ModelLoadError, match="not an existing file"):
        _loader(override=str(tmp_path / "missing.jinja"))
    with pytest.raises(ModelLoadError, match="not an existing file"):
        _loader(override="just some words")


def test_named_templates_default_and_tool_use() -> None:
    config = {
        "chat_template": [
            {"name": "default", "template": "default {{ tools is none }}"},
            {"name": "tool_use", "template": "tool_use {{ tools | length }}"},
        ]
    }
    template = _loader(tokenizer_config=config)
    assert template is not None and template.supports_tools
    assert template.render([]) == "default True"
    assert template.render([], tools=[WEATHER_TOOL]) == "tool_use 1"


def test_named_templates_without_default() -> None:
    single = {"chat_template": [{"name": "rag", "template": "rag"}]}
    assert _source(_loader(tokenizer_config=single)) == "rag"
    several = {"chat_template": [{"name": "a", "template": "a"}, {"name": "b", "template": "b"}]}
    with pytest.raises(ModelLoadError, match="none named 'default'"):
        _loader(tokenizer_config=several)


def test_broken_template_from_config_names_its_file(model_dir: Path) -> None:
    (model_dir / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json"):
        _loader(model_dir=model_dir, tokenizer_config={"chat_template": "{% for %}"})


@pytest.mark.parametrize("path", _template_params())
def test_every_template_loads_from_tokenizer_config(path: Path) -> None:
    """Every real template also loads through a tokenizer_config (the common way models ship them)."""
    template = _loader(tokenizer_config={"chat_template": path.read_text(encoding="utf-8")})
    assert template is not None and template.source == path.read_text(encoding="utf-8")


# Templates of our own writing in the two shapes some models read tools in (the shapes, not
# their text): Phi-4-mini's tools as a JSON string on the system message, SmolLM3's `xml_tools`.
_SYSTEM_TOOLS = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'system' and 'tools' in m and m['tools'] is not none %}"
    "<|tool|>{{ m['tools'] }}<|/tool|>{% endif %}<|end|>{% endfor %}"
)
_XML_TOOLS = (
    "{% if xml_tools %}<tools>{% for t in xml_tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tools_reach_templates_that_read_them_from_the_system_message() -> None:
    template = ChatTemplate(_SYSTEM_TOOLS, origin="test")
    listed = json.dumps([_TOOL])
    with_system = template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tools=[_TOOL],
        add_generation_prompt=False,
    )
    assert with_system == f"<|system|>Be brief.<|tool|>{listed}<|/tool|><|end|><|user|>Hi<|end|>"
    alone = template.render([{"role": "user", "content": "Hi"}], tools=[_TOOL], add_generation_prompt=False)
    assert alone == f"<|system|><|tool|>{listed}<|/tool|><|end|><|user|>Hi<|end|>"
    plain = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert plain == "<|user|>Hi<|end|>"  # no tools: no system message made up


def test_tools_reach_templates_that_read_xml_tools() -> None:
    template = ChatTemplate(_XML_TOOLS, origin="test")
    out = template.render([{"role": "user", "content": "Hi"}], tools=[_TOOL], add_generation_prompt=False)
    assert out.startswith("<tools>") and '"get_weather"' in out and out.endswith("user: Hi\n")
    assert "<tools>" not in template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)

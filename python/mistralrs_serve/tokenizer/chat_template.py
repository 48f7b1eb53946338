"""Chat templates: compile and render Jinja chat templates the way Hugging Face transformers does."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from mistralrs_serve.errors import ChatTemplateError, ModelLoadError

__all__ = ["ChatTemplate", "flatten_text_content", "load_chat_template"]

# Jinja names templates compiled from strings like this; their frames in a traceback carry it,
# which is how a render error is traced back to a template line.
_TEMPLATE_FRAME_NAME = "<template>"

# Names under which a message's reasoning may arrive, in order of preference. Templates read
# `reasoning_content` (Qwen3, DeepSeek) or `thinking` (gpt-oss), so both are filled from whichever is given.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

# The template loops over, indexes or maps a message's content, so it copes with a list of parts.
_CONTENT_LOOP = re.compile(
    r"\{%-?\s*for\s+\w+(?:\s*,\s*\w+)*\s+in\s+[\w.\[\]'\"]*\bcontent\b['\"]?\]?\s*[|%\s-]"
)
_CONTENT_INDEX = re.compile(r"\bcontent\b['\"]?\]?\s*\[\s*\d+\s*\]")
_CONTENT_MAP = re.compile(r"\bcontent\b['\"]?\]?\s*\|\s*(?:map|selectattr|rejectattr)\b")

_MENTIONS_TOOLS = re.compile(r"\btools\b")
_MENTIONS_THINKING = re.compile(r"\benable_thinking\b")


class _TemplateRaised(jinja2.TemplateError):
    """The template called `raise_exception`: its message is meant for the user as it is."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML and sorts keys; prompts need the JSON verbatim,
    # in the order the caller gave (tool schemas read better with "type" before "properties").
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _DictFactory:
    """Stands in for the `dict` global: builds dicts, but exposes no type object to climb from."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict[Any, Any]:
        return dict.fromkeys(keys, value)


def _reject_private_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _GuardedNamespace(Namespace):
    """`namespace()` that refuses underscore names, which could shadow Python internals."""

    # `self` is positional-only so that `namespace(self=...)` in a template still works.
    def __init__(self, /, *args: Any, **kwargs: Any) -> None:
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _reject_private_name(name)
        super().__init__(attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _reject_private_name(name)
        super().__setitem__(name, value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in transformers.

    Serving has no use for the marks, but templates that contain the tag must still compile, so the
    block renders its body unchanged.
    """

    tags = {"generation"}  # noqa: RUF012 - the attribute name and type are Jinja's

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` name itself
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _build_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _GuardedNamespace
    return env


_ENVIRONMENT = _build_environment()


# ---------------------------------------------------------------------------------------------
# Preparing what the template sees
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A deep copy of `value` made only of JSON-like builtins.

    The sandbox judges methods by name, so objects of other types (numpy arrays, enums, pydantic models)
    could expose unsafe ones; copying also means preparing messages never changes the caller's data.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    # Templates only test media for presence, so a placeholder renders the same.
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> None:
    reasoning = next((message[key] for key in _REASONING_KEYS if message.get(key) is not None), None)
    if reasoning is not None:
        message.setdefault("thinking", reasoning)
        message["reasoning_content"] = reasoning


def _parse_arguments(call: dict[str, Any]) -> None:
    arguments = call.get("arguments")
    if not isinstance(arguments, str):
        return
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return  # not JSON: the template gets the text as the client sent it
    # Only objects: templates iterate arguments with `|items` or `tojson` them as a mapping.
    if isinstance(parsed, dict):
        call["arguments"] = parsed


def _parse_tool_call_arguments(message: dict[str, Any]) -> None:
    tool_calls = message.get("tool_calls")
    if not isinstance(tool_calls, list):
        return
    for call in tool_calls:
        if not isinstance(call, dict):
            continue
        # OpenAI nests name and arguments under "function"; some clients send them flat.
        _parse_arguments(call)
        if isinstance(call.get("function"), dict):
            _parse_arguments(call["function"])


def _prepare_message(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(
            f"messages[{index}] must be an object, got {type(message).__name__}", "messages"
        )
    # A None-valued key (e.g. `content: null` beside tool_calls) would render as "None" or break string
    # concatenation, while templates handle a missing key.
    prepared = {str(key): _plain(value) for key, value in message.items() if value is not None}
    # OpenAI allows `content: null` (or none at all) beside tool_calls, but most templates concatenate or
    # split the content unconditionally; "" is what their authors' own examples pass.
    prepared.setdefault("content", "")
    _alias_reasoning(prepared)
    _parse_tool_call_arguments(prepared)
    return prepared


def _join_text_parts(parts: list[Any]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif (
            isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
    return "\n".join(texts)


def flatten_text_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` whose list-of-parts `content` is replaced by its text parts joined with "\\n".

    Parts other than text (images, audio) are dropped: a template that only accepts strings could not
    show them anyway. Messages whose content is already a string are returned as they are.
    """
    flattened = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": _join_text_parts(content)}
        flattened.append(message)
    return flattened


def _iterates_content_parts(source: str) -> bool:
    """Whether the template handles `content` given as a list of parts.

    A heuristic on the source: it loops over something named `content`, indexes it (`content[0]`), or
    maps/selects over it. Templates that do none of these (Qwen2.5, Llama 3.x, SmolLM3, ...) would
    print a list's Python repr or drop it, so their messages are flattened to strings first.
    """
    return any(pattern.search(source) for pattern in (_CONTENT_LOOP, _CONTENT_INDEX, _CONTENT_MAP))


# ---------------------------------------------------------------------------------------------
# Compiling and rendering
# ---------------------------------------------------------------------------------------------


def _template_line(traceback: TracebackType | None) -> int | None:
    """The template line being rendered when an error was raised (Jinja maps its frames to lines)."""
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == _TEMPLATE_FRAME_NAME:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


def _render_error(exc: Exception) -> ChatTemplateError:
    if isinstance(exc, _TemplateRaised):
        # The template author wrote this message for the user (e.g. "roles must alternate").
        return ChatTemplateError(str(exc.message), param="messages")
    line = _template_line(exc.__traceback__)
    where = f" at line {line}" if line is not None else ""
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return ChatTemplateError(f"the chat template attempted an unsafe operation{where}: {exc}", "messages")
    return ChatTemplateError(
        f"the chat template failed to render these messages{where}: {type(exc).__name__}: {exc}", "messages"
    )


class ChatTemplate:
    """A compiled chat template; `render` turns messages (OpenAI format) into prompt text.

    A model's chat template turns an OpenAI-style list of messages into the prompt text. Templates come
    from the model's files (untrusted code), so they run in Jinja's immutable sandbox, in the same
    environment transformers' `apply_chat_template` builds: `trim_blocks`, `lstrip_blocks`, the
    `loopcontrols` extension, a `tojson` filter that neither escapes HTML nor sorts keys, the globals
    `raise_exception` and `strftime_now`, and the context variables `messages`, `tools`, `documents`,
    `add_generation_prompt`, `bos_token`, `eos_token` plus any extra keyword arguments.

    Before rendering, messages are prepared as transformers does (keys whose value is None are dropped,
    reasoning fields are aliased) and in three ways it does not, to accept what OpenAI clients send: a
    null or missing `content` becomes "", tool-call arguments given as a JSON string are parsed into an
    object, and content given as a list of parts is flattened to a string for templates that cannot
    iterate over parts (see `_iterates_content_parts`). With those inputs the output is identical to
    `apply_chat_template(..., tokenize=False)` (tests/unit/test_chat_template.py checks it).
    """

    def __init__(
        self,
        source: str,
        *,
        origin: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        tool_use_source: str | None = None,
    ) -> None:
        """`tool_use_source`: a second template that renders requests with tools, as transformers does
        with a model's template named "tool_use" (Hermes 2 Pro / 3 ship their tool format only there).
        """
        self.source = source
        self.origin = origin
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(
                f"the chat template from {origin} does not compile: {exc.message} (line {exc.lineno})"
            ) from exc
        except jinja2.TemplateError as exc:
            raise ModelLoadError(f"the chat template from {origin} does not compile: {exc}") from exc
        self._flatten_content = not _iterates_content_parts(source)
        self._tool_use: ChatTemplate | None = None
        if tool_use_source:
            self._tool_use = ChatTemplate(
                tool_use_source, origin=f"{origin} (tool_use)", bos_token=bos_token, eos_token=eos_token
            )

    @property
    def supports_tools(self) -> bool:
        if self._tool_use is not None and self._tool_use.supports_tools:
            return True
        return _MENTIONS_TOOLS.search(self.source) is not None

    @property
    def tools_source(self) -> str:
        """The source that renders requests with tools (a separate tool_use template, where there is one)."""
        return self._tool_use.source if self._tool_use is not None else self.source

    @property
    def supports_thinking(self) -> bool:
        if self._tool_use is not None and self._tool_use.supports_thinking:
            return True
        return _MENTIONS_THINKING.search(self.source) is not None

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`; a template error becomes ChatTemplateError (param "messages").

        `enable_thinking=None` and other extra arguments that are None are left out of the context, so
        the template's own default applies (`reasoning_effort=None` must not render as "None").
        """
        if tools and self._tool_use is not None:
            return self._tool_use.render(
                messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                enable_thinking=enable_thinking,
                **extra,
            )
        context = self._context(messages, add_generation_prompt, tools, enable_thinking, extra)
        try:
            return self._template.render(context)
        except Exception as exc:  # templates are code: any error they raise is the template's failure
            raise _render_error(exc) from exc

    def _context(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        enable_thinking: bool | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        prepared = [_prepare_message(message, index) for index, message in enumerate(messages)]
        if self._flatten_content:
            prepared = flatten_text_content(prepared)
        # As in transformers, `documents` is always defined and extra arguments may override the
        # special tokens. A missing token is "" so that `bos_token + ...` still works.
        context: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "documents": None,
        }
        context.update({key: _plain(value) for key, value in extra.items() if value is not None})
        if enable_thinking is not None:
            context["enable_thinking"] = enable_thinking
        # An empty list means "no tools": templates test `tools is not none` and would announce zero tools.
        context["tools"] = _plain(tools) if tools else None
        if tools and _READS_XML_TOOLS.search(self.source):
            context["xml_tools"] = context["tools"]  # SmolLM3's own template names them so
        if tools and _READS_MESSAGE_TOOLS.search(self.source):
            prepared = _tools_on_system_message(prepared, tools)
        context["messages"] = prepared
        context["add_generation_prompt"] = add_generation_prompt
        return context


# Templates that read the tool list from elsewhere than `tools`: SmolLM3's (`xml_tools`), and
# Phi-4-mini's (a JSON string on the system message, `message['tools']`).
_READS_XML_TOOLS = re.compile(r"\bxml_tools\b")
_READS_MESSAGE_TOOLS = re.compile(r"\w\[\s*['\"]tools['\"]\s*\]|\w\.tools\b")


def _tools_on_system_message(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The tools as JSON on the first message, a system message (one with empty content put first
    where there is none), as such templates expect them."""
    listed = json.dumps(_plain(tools), ensure_ascii=False)
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "tools": listed}, *messages[1:]]
    return [{"role": "system", "content": "", "tools": listed}, *messages]


# ---------------------------------------------------------------------------------------------
# Finding a model's template
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Found:
    source: str
    origin: str
    tool_use: str | None = None


def _looks_like_template(text: str) -> bool:
    return "{%" in text or "{{" in text


def _named_templates(value: Any, origin: str) -> _Found | None:
    """The templates in a `chat_template` value: a string, or a list of {"name", "template"}.

    As in transformers, "default" renders requests without tools and "tool_use" (if present) those with
    tools. A single template is the default whatever its name; several without a "default" is an error.
    """
    if value is None or isinstance(value, str):
        return _Found(value, origin) if value and value.strip() else None
    if isinstance(value, Mapping):
        named = dict(value)
    elif isinstance(value, list) and all(isinstance(item, Mapping) for item in value):
        named = {item.get("name"): item.get("template") for item in value}
    else:
        raise ModelLoadError(
            f"the chat_template in {origin} is neither a string nor a list of named templates"
        )
    if len(named) == 1:
        named = {"default": next(iter(named.values()))}
    if "default" not in named:
        raise ModelLoadError(
            f"{origin} has chat templates {sorted(map(str, named))} but none named 'default'"
        )
    default, tool_use = named["default"], named.get("tool_use")
    if not isinstance(default, str) or not (tool_use is None or isinstance(tool_use, str)):
        raise ModelLoadError(f"a named chat template in {origin} is not a string")
    return _Found(default, origin, tool_use)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read the chat template {path}: {exc}") from exc


def _override_source(override: str) -> _Found:
    """The user-given template: a literal template, or a path to a template file.

    A `.json` file is read like tokenizer_config.json / chat_template.json (its "chat_template" key).
    """
    if _looks_like_template(override):
        return _Found(override, "the chat template override (a literal template)")
    path = Path(override).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"chat template override {override!r} is not an existing file, nor a Jinja template "
            "(a literal template contains '{%' or '{{')"
        )
    text = _read_text(path)
    if path.suffix.lower() != ".json":
        return _Found(text, str(path))
    try:
        found = _named_templates(json.loads(text).get("chat_template"), str(path))
    except (ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{path} is not a JSON object with a chat_template: {exc}") from exc
    if found is None:
        raise ModelLoadError(f"{path} has no chat_template")
    return found


def _gguf_source(gguf_metadata: Mapping[str, Any]) -> str | None:
    value = gguf_metadata.get("tokenizer.chat_template")
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _find_source(
    override: str | None,
    model_dir: Path | None,
    gguf_metadata: Mapping[str, Any] | None,
    tokenizer_config: Mapping[str, Any] | None,
) -> _Found | None:
    if override:
        return _override_source(override)
    if model_dir is not None and (model_dir / "chat_template.jinja").is_file():
        path = model_dir / "chat_template.jinja"
        return _Found(_read_text(path), str(path))
    if tokenizer_config is not None:
        origin = (
            str(model_dir / "tokenizer_config.json") if model_dir is not None else "tokenizer_config.json"
        )
        found = _named_templates(tokenizer_config.get("chat_template"), origin)
        if found is not None:
            return found
    if gguf_metadata is not None:
        source = _gguf_source(gguf_metadata)
        if source and source.strip():
            return _Found(source, "GGUF metadata (tokenizer.chat_template)")
    return None


def load_chat_template(
    *,
    override: str | None,
    model_dir: Path | None,
    gguf_metadata: Mapping[str, Any] | None,
    tokenizer_config: Mapping[str, Any] | None,
    bos_token: str | None,
    eos_token: str | None,
) -> ChatTemplate | None:
    """The model's chat template, or None if it has none.

    Looked up in this order: `override` (a literal template if it contains "{%" or "{{", else a path to a
    file), `model_dir/chat_template.jinja`, `tokenizer_config["chat_template"]`, then the GGUF key
    `tokenizer.chat_template`. An empty template counts as none. A tokenizer_config "tool_use" template
    is kept beside the default and renders requests that carry tools.
    """
    found = _find_source(override, model_dir, gguf_metadata, tokenizer_config)
    if found is None:
        return None
    return ChatTemplate(
        found.source,
        origin=found.origin,
        bos_token=bos_token,
        eos_token=eos_token,
        tool_use_source=found.tool_use,
    )

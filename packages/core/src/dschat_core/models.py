"""Models and tokenizers: loading any causal LM, the reward model, and tiny random models for tests.

The reward model is a standard Hugging Face ``*ForSequenceClassification`` with one label: its ``score`` head is
DeepSpeed-Chat's ``v_head`` (a bias-free linear on the last hidden state), and the folder loads with
``from_pretrained`` whatever its shard layout. Per-token values come from the base model's hidden states through
that head.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

TINY_ARCHS = ("opt", "llama", "gpt2")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_model_folder(path: str, what: str = "a model", reward: bool = False) -> None:
    """Refuse, in one line, a folder that is not a Hugging Face model (with its tokenizer), or, with ``reward``,
    not a reward model: loading it would end in a traceback, or score with a random value head."""
    import json

    from .errors import UserError

    folder = Path(path).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        models = [p.name for p in sorted(folder.iterdir()) if (p / "config.json").is_file()] if folder.is_dir() else []
        inside = f"; the models are in {', '.join(models)} inside it" if models else ""
        raise UserError(f"{path} holds no model (no config.json){inside}; fix: point at {what}'s folder")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise UserError(
            f"{path} has no tokenizer files; fix: point at a folder dschat-core saved, or add the "
            "tokenizer (save_pretrained) beside the weights"
        )
    try:
        settings = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{config} is damaged ({exc}); fix: restore it, or save the model again") from None
    for weights in sorted(folder.glob("*.safetensors")):
        problem = damaged_safetensors(weights)
        if problem:
            raise UserError(
                f"{weights} is damaged ({problem}): the model cannot be loaded; fix: restore the file, or train "
                "the stage again (its last checkpoint resumes it)"
            )
    if reward:
        architectures = settings.get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise UserError(
                f"{path} is not a reward model (its architecture: {', '.join(architectures) or '?'}); "
                "fix: point at stage 2's output (runs/RUN/reward)"
            )


def damaged_safetensors(path: Path) -> str:
    """Why a safetensors file cannot be read ('' if it can): its header says how long the file must be, so a file
    cut short is found without reading the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            return ""
    except Exception as exc:  # SafetensorError, OSError: the library's own words
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """DeepSpeed-Chat's conventions: right padding; a missing pad token becomes EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_dropout(config, dropout: float | None) -> None:
    """Write a dropout value into every dropout key the config has (None keeps the pretrained values)."""
    if dropout is None:
        return
    for key in (
        "dropout",
        "attention_dropout",
        "hidden_dropout",
        "activation_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
    ):
        if hasattr(config, key):
            setattr(config, key, dropout)


def load_causal_lm(path: str, dropout: float | None = None, trust_remote_code: bool = False, dtype=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    apply_dropout(config, dropout)
    return AutoModelForCausalLM.from_pretrained(path, config=config, trust_remote_code=trust_remote_code, dtype=dtype)


def load_reward_model(path: str, dropout: float | None = None, trust_remote_code: bool = False, pad_token_id=None):
    """A one-label sequence-classification model: from a stage-2 output, or a base model with a new head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    apply_dropout(config, dropout)
    config.num_labels = 1
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    # A base model has no score head yet: transformers' load report would print a table saying so on every rank.
    # The head is expected to be new; anything else missing is said in one line.
    from transformers.utils import logging as hf_logging

    loader_log = hf_logging.get_logger("transformers.modeling_utils")
    level = loader_log.level
    loader_log.setLevel(hf_logging.ERROR)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    finally:
        loader_log.setLevel(level)
    head = {name for name, _ in model.named_parameters() if name.startswith(_score_head_prefix(model))}
    missing = sorted(set(info.get("missing_keys", ())) - head)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        warnings.warn(f"reward model {path}: newly initialised weights beyond the score head: {shown}", stacklevel=2)
    return model


def _score_head_prefix(model) -> str:
    """The name of a sequence classifier's head (``score`` for most, ``classifier``/``lm_head`` elsewhere)."""
    for prefix in ("score", "classifier", "lm_head"):
        if hasattr(model, prefix):
            return prefix
    return "score"


def unwrapped(model):
    """The transformers model inside a DeepSpeed engine and/or a peft model (whose own ``base_model`` is the LoRA
    wrapper, not the transformers model)."""
    module = getattr(model, "module", model)
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def token_values(model, input_ids, attention_mask, position_ids=None):
    """Per-token scalar values [B, L] from a sequence-classification model's head (DeepSpeed-Chat's v_head).
    ``position_ids`` matter for left-padded rollouts; right-padded batches need none."""
    module = unwrapped(model)
    extra = {} if position_ids is None else {"position_ids": position_ids}
    hidden = module.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)[0]
    head = getattr(module, "score", None) or module.classifier
    return head(hidden).squeeze(-1)


#: The tiny models' chat template: DeepSpeed-Chat's turns ("\n\nHuman: …", "\n\nAssistant: …" closed by EOS), so
#: that a conversation reads as the tiny tokenizer's corpus does; a system message leads as it is.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\\n\\nAssistant: ' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\nAssistant:' }}{%- endif -%}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 512, add_bos: bool = True):
    """A byte-level BPE tokenizer trained on ``texts`` with ``tokenizers``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, **SPECIAL_TOKENS, padding_side="right", chat_template=TINY_CHAT_TEMPLATE
    )


def tiny_config(arch: str, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 256):
    """A small config of a real architecture, with the tokenizer's special-token ids."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    ids: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "opt":
        return OPTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=hidden * 4,
            word_embed_proj_dim=hidden,
            max_position_embeddings=max_positions,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,  # type: ignore[call-arg]  # kept as an attribute: the shipped model has it
            **ids,
        )
    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            intermediate_size=hidden * 2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; use one of {TINY_ARCHS}")


def init_tiny(
    arch: str,
    out_dir: str | Path,
    texts: list[str] | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
    max_positions: int = 256,
    extra_tokens: list[str] | None = None,
) -> Path:
    """Write a randomly initialised small model of a real architecture plus its tokenizer, as an ordinary
    Hugging Face folder; ``extra_tokens`` are added to the tokenizer whole (an environment's markup)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from .tiny_task import corpus

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {TINY_ARCHS}")
    tokenizer = train_tokenizer(texts or corpus(), vocab_size=vocab_size, add_bos=arch != "gpt2")
    if extra_tokens:
        tokenizer.add_tokens(extra_tokens)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer, hidden, layers, heads, max_positions))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

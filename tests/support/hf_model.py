"""Builds, on the fly, a model directory shaped like fla-hub's RetNets (`fla-hub/retnet-1.3B-100B`).

The same file set and config keys as the Hub directory, at small dimensions: `config.json` (fla's keys,
`torch_dtype` bfloat16), `generation_config.json`, weights in bf16 sharded over two safetensors files
with `model.safetensors.index.json`, a Llama-style BPE `tokenizer.json` trained here with `tokenizers`
(byte fallback `<0x00>`..`<0xFF>` at ids 3..258, metaspace `▁` prefix, `<unk>` `<s>` `</s>` at 0, 1, 2),
`tokenizer_config.json` (`add_bos_token`, `add_eos_token`, a Llama-2 chat template) and
`special_tokens_map.json`, a `README.md` model card. Not made: `tokenizer.model` (a sentencepiece
binary; nothing here reads it). Deterministic: the same call writes the same bytes. No downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from model.config import RetNetConfig
from model.retnet import RetNet
from tests.support.bpe import SAMPLE_TEXT

VOCAB_SIZE = 640
SPECIALS = ["<unk>", "<s>", "</s>"]
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# An ASCII corpus (plus "é"): every other character (CJK, emoji, ...) goes through byte fallback.
CORPUS = [line for line in SAMPLE_TEXT.splitlines() if line.isascii()] * 4 + ["café élève déjà vu"] * 8


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def build_tokenizer(legacy: bool = True) -> Tokenizer:
    """A Llama-2-style tokenizer: `legacy` uses Llama's Prepend+Replace normalizer (as in the Hub's
    tokenizer.json files); otherwise the newer Metaspace pre-tokenizer (prepend_scheme "first")."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    n_learn = VOCAB_SIZE - len(SPECIALS) - 256
    trainer = trainers.BpeTrainer(vocab_size=n_learn, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS, trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)})
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab and len(vocab) < VOCAB_SIZE:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if legacy:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first", split=False
        )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def fla_config(**overrides: object) -> dict:
    """fla-hub/retnet-1.3B-100B's config.json, every key, at test dimensions."""
    cfg = {
        "_name_or_path": "fla-hub/retnet-tiny-test",
        "architectures": ["RetNetForCausalLM"],
        "attn_mode": "fused_chunk",
        "bos_token_id": 1,
        "conv_size": 4,
        "elementwise_affine": True,
        "eos_token_id": 2,
        "expand_k": 1,
        "expand_v": 2,
        "feature_map": None,
        "fuse_cross_entropy": True,
        "fuse_norm": True,
        "hidden_act": "swish",
        "hidden_ratio": 2,
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": None,
        "max_position_embeddings": 2048,
        "model_type": "retnet",
        "norm_eps": 1e-06,
        "num_heads": 2,
        "num_hidden_layers": 2,
        "num_kv_heads": None,
        "rms_norm_eps": 1e-06,
        "share_conv_kernel": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2",
        "use_cache": True,
        "use_output_gate": True,
        "use_short_conv": False,
        "vocab_size": VOCAB_SIZE,
    }
    cfg.update(overrides)
    return cfg


def write_sharded(tensors: dict[str, torch.Tensor], out: Path, shards: int = 2) -> None:
    """Weights as `model-0000i-of-0000n.safetensors` files plus the index, as transformers writes them."""
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_hf_model(
    out: Path, *, legacy: bool = True, chat_template: str | None = LLAMA2_CHAT_TEMPLATE
) -> Path:
    """Write the whole fla-hub-shaped directory into `out` (created) and return it."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = fla_config()
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.40.2"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    torch.manual_seed(1234)
    model = RetNet(RetNetConfig.from_dict(cfg))
    write_sharded({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, out)
    build_tokenizer(legacy).save(str(out / "tokenizer.json"))
    tok_cfg: dict = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {**_special(s), "special": True} for i, s in enumerate(SPECIALS)},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": legacy,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    smap = {"bos_token": _special("<s>"), "eos_token": _special("</s>"), "unk_token": _special("<unk>")}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")
    (out / "README.md").write_text("---\nlicense: mit\nlibrary_name: fla\n---\n")  # the Hub's model card
    return out

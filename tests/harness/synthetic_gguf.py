"""Tiny, randomly initialised GGUF models of every architecture the product runs.

Each file is structurally what llama.cpp's converter writes for the real model (tensor names
and shapes, hyperparameters, a tokenizer section with a chat template llama.cpp recognises),
only small: 2 layers, n_embd 256, grouped-query attention (4 query heads, 2 KV heads), and
a vocabulary of 1536 tokens (a few hundred merges learned from a few paragraphs of text,
filled up with reserved tokens). The weights are random, so the models say nothing useful,
but llama.cpp has to load, quantize and run them exactly as it would the real ones:

    llama   SmolLM2: byte-level BPE ("smollm" pre-tokenizer), ChatML, tied embeddings
    gemma3  Gemma-3: SentencePiece with byte fallback, BOS added, <start_of_turn> turns,
            q/k norms, post-attention and post-feed-forward norms, one sliding-window layer
            and one global layer with their own RoPE bases
    phi3    Phi-4-mini: byte-level BPE ("gpt-4o" pre-tokenizer), <|user|>...<|end|> turns,
            fused QKV and gate/up projections, partial rotary (3/4 of each head), LongRoPE
            factor tensors, the sliding-window key llama.cpp ignores for Phi

`write_model` writes F16 weights (F32 norms and RoPE factors, as the converter does);
`quantize` turns that into the quantizations the product ships, through llama.cpp's own
quantizer.
"""

from __future__ import annotations

import ctypes
import itertools
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import numpy.typing as npt

ARCHITECTURES = ("llama", "gemma3", "phi3")
QUANTS = ("Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")

# general.file_type of a quantized file, as llama.cpp's quantizer writes it
QUANT_FTYPES: dict[str, int] = {
    "Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
}
# the tensor type most weight matrices get under each quantization
QUANT_BASE_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "Q3_K_M": gguf.GGMLQuantizationType.Q3_K,
    "Q4_K_M": gguf.GGMLQuantizationType.Q4_K,
    "Q5_K_M": gguf.GGMLQuantizationType.Q5_K,
    "Q6_K": gguf.GGMLQuantizationType.Q6_K,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
}

N_LAYER = 2
N_EMBD = 256  # K-quant blocks span 256 values: every weight row is a multiple of that
N_FF = 512
N_MERGES = 600
# Real vocabularies run from 49k to 262k tokens. The engine's constrained decoder looks at
# the 1024 likeliest tokens when the top one does not fit (np.argpartition(-logits, 1024)),
# which needs more than 1024 tokens, so each vocabulary is filled up with reserved control
# tokens, named as the model family names them.
N_VOCAB = 1536
RESERVED: dict[str, str] = {
    "llama": "<|reserved_special_token_{}|>",
    "gemma3": "<unused{}>",
    "phi3": "<|dummy_{}|>",
}


# general.name matters to llama.cpp: a name containing "phi3" or "phi-3" switches on Phi-3's
# per-token fix-ups, which look up "</s>", "<unk>" and "<s>" and fail to load a Phi-4-style
# vocabulary without them ("error loading model vocabulary: unordered_map::at").
MODEL_NAMES: dict[str, str] = {
    "llama": "SmolLM2 Synthetic 2L",
    "gemma3": "Gemma 3 Synthetic 2L",
    "phi3": "Phi 4 Mini Synthetic 2L",
}


@dataclass(frozen=True)
class ChatMarkers:
    """The special tokens that open a user turn and close any turn."""

    user: str
    end: str


CHAT_MARKERS: dict[str, ChatMarkers] = {
    "llama": ChatMarkers("<|im_start|>", "<|im_end|>"),
    "gemma3": ChatMarkers("<start_of_turn>", "<end_of_turn>"),
    "phi3": ChatMarkers("<|user|>", "<|end|>"),
}

# SmolLM2-135M-Instruct's template (llama.cpp: "chatml", found by <|im_start|>)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Gemma-3's turns (llama.cpp: "gemma", found by <start_of_turn>)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Phi-4-mini-instruct's template (llama.cpp: "phi3", found by <|assistant|> and <|end|>)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] "
    "+ '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)

# What the tokenizers are trained on: the kind of text the agent's prompts and jobs hold,
# so a prompt costs words, not bytes, and fits a small context.
CORPUS = """\
You classify short messages from sensors, machines and system logs. Read the message and
choose the one label that fits it best. Answer with the label only.
You extract structured data from short messages sent by sensors, machines and system logs.
Copy values exactly as they appear in the message. Answer with one JSON object with these
fields: device (string), metric (string), value (number), unit (string), alarm (boolean).
Labels: normal, warning, critical, ok, fault, high, low, temperature, humidity, pressure.
Message: Room 4 reads 31 C, above the 28 C limit. Label: warning
Message: Pump P-3 vibration 9.1 mm/s, above the alarm threshold. Label: critical
Message: Boiler pressure is 2.4 bar, within the normal range. Label: normal
Message: The light is red. The light is green. The light is blue.
Message: sshd[2231]: Failed password for invalid user admin from 10.0.0.7 port 22 ssh2
Message: Sensor T-12 temperature 22.5 C, humidity 41 %, battery 87 %, all values normal.
Message: Machine M-7 reports a fault on the conveyor motor; the operator should check it.
{"device": "pump-3", "metric": "vibration", "value": 9.1, "unit": "mm/s", "alarm": true}
{"device": "room-4", "metric": "temperature", "value": 31, "unit": "C", "alarm": false}
{"severity": "info", "ack_needed": false, "readings": [1.5, 2.0], "site": {"floor": 3}}
The system reads the sensor value and the machine sends the message to the device log.
"""


# ---- tokenizers ---------------------------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, as byte-level BPE vocabularies spell them."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _train_merges(words: Counter[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: merge the most frequent adjacent pair, n_merges times."""
    merges: list[tuple[str, str]] = []
    current = dict(words)
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in current.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += freq
        if not pairs:
            break
        best, _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        merges.append(best)
        current = {_apply_merge(word, best): freq for word, freq in current.items()}
    return merges


def _apply_merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None

    def add(self, text: str, kind: gguf.TokenType, score: float = 0.0) -> int:
        if text in self.tokens:  # llama.cpp asserts every token text is unique
            return self.tokens.index(text)
        self.tokens.append(text)
        self.types.append(int(kind))
        if self.scores is not None:
            self.scores.append(score)
        return len(self.tokens) - 1

    def fill(self, pattern: str) -> None:
        i = 0
        while len(self.tokens) < N_VOCAB:
            self.add(pattern.format(i), gguf.TokenType.CONTROL, -1000.0)
            i += 1


def _bpe_vocab(specials_first: Iterable[str], specials_last: Iterable[str], reserved: str) -> Vocab:
    """Byte-level BPE: 256 byte tokens, learned merges, the model's special tokens."""
    to_unicode = _byte_to_unicode()
    pieces = re.findall(
        r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", CORPUS
    )
    words: Counter[tuple[str, ...]] = Counter(
        tuple(to_unicode[b] for b in piece.encode("utf-8")) for piece in pieces
    )
    merges = _train_merges(words, N_MERGES)
    vocab = Vocab(tokens=[], types=[], merges=[f"{a} {b}" for a, b in merges])
    for text in specials_first:
        vocab.add(text, gguf.TokenType.CONTROL)
    for byte in range(256):
        vocab.add(to_unicode[byte], gguf.TokenType.NORMAL)
    for left, right in merges:
        vocab.add(left + right, gguf.TokenType.NORMAL)
    for text in specials_last:
        vocab.add(text, gguf.TokenType.CONTROL)
    vocab.fill(reserved)
    return vocab


def _spm_vocab(specials: Iterable[str], reserved: str) -> Vocab:
    """SentencePiece-style: byte-fallback tokens <0x00>..<0xFF>, "▁" for spaces, pieces
    scored so that llama.cpp's bigram merging replays the learned merges in order."""
    text = CORPUS.replace(" ", "▁")
    words: Counter[tuple[str, ...]] = Counter(
        tuple(word) for word in re.findall(r"▁?[^▁\n]+|▁|\n", text)
    )
    merges = _train_merges(words, N_MERGES)
    vocab = Vocab(tokens=[], types=[], scores=[])
    for special in specials:
        kind = gguf.TokenType.UNKNOWN if special == "<unk>" else gguf.TokenType.CONTROL
        vocab.add(special, kind, -1000.0)
    for byte in range(256):
        vocab.add(f"<0x{byte:02X}>", gguf.TokenType.BYTE)
    for i, char in enumerate(sorted({c for word in words for c in word} | {"▁"})):
        vocab.add(char, gguf.TokenType.NORMAL, -float(len(merges) + 1 + i))
    for rank, (left, right) in enumerate(merges):
        vocab.add(left + right, gguf.TokenType.NORMAL, -float(rank))
    vocab.fill(reserved)
    return vocab


# ---- weights ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attention:
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


ATTENTION: dict[str, Attention] = {
    "llama": Attention(n_head=4, n_head_kv=2, head_dim=64, n_rot=64),
    # Gemma's heads are wider than n_embd / n_head (key_length is written explicitly)
    "gemma3": Attention(n_head=4, n_head_kv=2, head_dim=128, n_rot=128),
    # Phi-4-mini rotates 3/4 of each head (partial_rotary_factor 0.75)
    "phi3": Attention(n_head=4, n_head_kv=2, head_dim=64, n_rot=48),
}


class _Weights:
    """Random weights, named and shaped as llama.cpp's loaders ask.

    Shapes are given as llama.cpp writes them ({ne0, ne1}: input size first); numpy arrays
    are the other way round.
    """

    def __init__(self, writer: gguf.GGUFWriter, seed: int) -> None:
        self.writer = writer
        self.rng = np.random.default_rng(seed)

    def matrix(self, name: str, n_in: int, n_out: int) -> None:
        data = self.rng.normal(0.0, 0.02, size=(n_out, n_in)).astype(np.float16)
        self.writer.add_tensor(name, data)

    def norm(self, name: str, n: int) -> None:
        data = (1.0 + self.rng.normal(0.0, 0.02, size=n)).astype(np.float32)
        self.writer.add_tensor(name, data)

    def vector(self, name: str, data: npt.NDArray[np.float32]) -> None:
        self.writer.add_tensor(name, data.astype(np.float32))


def write_model(path: Path, arch: str, seed: int = 0) -> Path:
    """Write a tiny F16 GGUF of `arch` ("llama", "gemma3" or "phi3") to `path`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    att = ATTENTION[arch]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("model")
    writer.add_name(MODEL_NAMES[arch])
    writer.add_description(f"random weights in the {arch} layout, for llama.cpp loader tests")
    writer.add_file_type(llama_cpp.LLAMA_FTYPE_MOSTLY_F16)

    writer.add_block_count(N_LAYER)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(att.n_head)
    writer.add_head_count_kv(att.n_head_kv)
    writer.add_rope_dimension_count(att.n_rot)

    if arch == "llama":
        vocab = _bpe_vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [], RESERVED[arch])
        writer.add_context_length(8192)
        writer.add_rope_freq_base(100000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(len(vocab.tokens))
        _write_bpe(writer, vocab, pre="smollm", bos=1, eos=2, unk=0, pad=2)
        writer.add_chat_template(CHATML_TEMPLATE)
    elif arch == "gemma3":
        vocab = _spm_vocab(
            ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
            RESERVED[arch],
        )
        writer.add_context_length(32768)
        writer.add_key_length(att.head_dim)
        writer.add_value_length(att.head_dim)
        writer.add_rope_freq_base(1000000.0)
        writer.add_rope_freq_base_swa(10000.0)
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_sliding_window(64)
        writer.add_sliding_window_pattern([True, False])  # layer 0 local, layer 1 global
        _write_spm(writer, vocab)
        writer.add_chat_template(GEMMA_TEMPLATE)
    else:
        specials = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]
        vocab = _bpe_vocab([], [*specials, "<|tool|>", "<|/tool|>"], RESERVED[arch])
        endoftext = vocab.tokens.index("<|endoftext|>")
        writer.add_context_length(131072)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_scaling_attn_factors(1.1902381)
        writer.add_rope_scaling_orig_ctx_len(4096)
        writer.add_sliding_window(262144)
        _write_bpe(writer, vocab, pre="gpt-4o", bos=endoftext, eos=endoftext, pad=endoftext)
        writer.add_chat_template(PHI3_TEMPLATE)

    weights = _Weights(writer, seed)
    n_vocab = len(vocab.tokens)
    weights.matrix("token_embd.weight", N_EMBD, n_vocab)  # tied: no output.weight
    weights.norm("output_norm.weight", N_EMBD)
    if arch == "phi3":
        half = att.n_rot // 2
        weights.vector("rope_factors_long.weight", np.linspace(1.0, 8.0, half, dtype=np.float32))
        weights.vector("rope_factors_short.weight", np.ones(half, dtype=np.float32))
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        weights.norm(f"{blk}.attn_norm.weight", N_EMBD)
        if arch == "phi3":
            weights.matrix(f"{blk}.attn_qkv.weight", N_EMBD, att.q_dim + 2 * att.kv_dim)
        else:
            weights.matrix(f"{blk}.attn_q.weight", N_EMBD, att.q_dim)
            weights.matrix(f"{blk}.attn_k.weight", N_EMBD, att.kv_dim)
            weights.matrix(f"{blk}.attn_v.weight", N_EMBD, att.kv_dim)
        weights.matrix(f"{blk}.attn_output.weight", att.q_dim, N_EMBD)
        weights.norm(f"{blk}.ffn_norm.weight", N_EMBD)
        if arch == "phi3":
            weights.matrix(f"{blk}.ffn_up.weight", N_EMBD, 2 * N_FF)  # gate and up, fused
        else:
            weights.matrix(f"{blk}.ffn_gate.weight", N_EMBD, N_FF)
            weights.matrix(f"{blk}.ffn_up.weight", N_EMBD, N_FF)
        weights.matrix(f"{blk}.ffn_down.weight", N_FF, N_EMBD)
        if arch == "gemma3":
            weights.norm(f"{blk}.attn_q_norm.weight", att.head_dim)
            weights.norm(f"{blk}.attn_k_norm.weight", att.head_dim)
            weights.norm(f"{blk}.post_attention_norm.weight", N_EMBD)
            weights.norm(f"{blk}.post_ffw_norm.weight", N_EMBD)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_bpe(
    writer: gguf.GGUFWriter,
    vocab: Vocab,
    *,
    pre: str,
    bos: int,
    eos: int,
    pad: int,
    unk: int | None = None,
) -> None:
    assert vocab.merges is not None
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if unk is not None:
        writer.add_unk_token_id(unk)
    writer.add_pad_token_id(pad)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


def _write_spm(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    assert vocab.scores is not None
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.tokens.index("<bos>"))
    writer.add_eos_token_id(vocab.tokens.index("<eos>"))
    writer.add_unk_token_id(vocab.tokens.index("<unk>"))
    writer.add_pad_token_id(vocab.tokens.index("<pad>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


# ---- quantization -------------------------------------------------------------------------


def quantize(src: Path, dst: Path, quant: str) -> Path:
    """Quantize `src` to `dst` with llama.cpp's quantizer (llama-quantize's code path)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = 2
    llama_cpp.llama_backend_init()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {quant}) returned {rc}")
    return dst

"""Import of Andrej Karpathy's llama2.c *legacy* checkpoints and tokenizers into a Hugging Face directory.

Why a module of its own: the format is small, self-contained and needs no JAX; it is an importer that
produces a standard HF LLaMA directory, which the HF <-> Orbax conversion then takes like any other model.

:func:`convert_llama2c_to_hf` reads a checkpoint of ``export.py --version 0`` (what ``run.c`` reads; e.g.
``stories260K.bin``: an int32[7] header, then float32 tensors in llama2.c's order, every matrix
[out_features, in_features]; any other size is refused with a ``ValueError`` naming the file) and a
tokenizer of ``tokenizer.py export`` (e.g. ``tok512.bin``). q_proj and k_proj rows are permuted inside
every head (:func:`permute_rotary_rows`), because llama2.c rotates interleaved pairs and Hugging Face
half-split ones; the tokenizer is rebuilt as a sentencepiece ``ModelProto`` that sentencepiece and
transformers' ``LlamaTokenizer`` load.

No pickle and no ``torch.load`` anywhere: the weights are read with numpy and written with safetensors.

The checkpoint and tokenizer formats and the RoPE permutation: docs/models.md#llama2c.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "Llama2cHeader",
    "read_llama2c_header",
    "iter_llama2c_tensors",
    "read_llama2c_checkpoint",
    "permute_rotary_rows",
    "read_llama2c_tokenizer",
    "llama2c_tokenizer_json",
    "convert_llama2c_to_hf",
]

_HEADER = struct.Struct("<7i")
_F32 = np.dtype("<f4")
# First int32 of llama2.c export.py --version 1 / 2 files: the uint32 magic 0x616b3432 ("ak42").
_MAGIC_V1 = 0x616B3432
_ROPE_THETA = 10000.0  # run.c and llama2.c's model.py hard-code it
_RMS_EPS = 1e-5  # likewise
_N_BYTE_PIECES = 256
_FIRST_NORMAL_ID = 3 + _N_BYTE_PIECES


# --------------------------------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------------------------------
class Llama2cHeader:
    """The 7-int32 llama2.c legacy header, validated.

    Attributes: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (always positive),
    max_seq_len, shared_classifier (True when the header's vocab_size was positive), head_size.
    """

    __slots__ = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len",
                 "shared_classifier", "head_size")

    def __init__(self, path: str | os.PathLike, raw: tuple[int, ...]):
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = raw
        where = f"llama2.c checkpoint {os.fspath(path)!r}"
        if raw[0] == _MAGIC_V1:
            raise ValueError(f"{where}: starts with the magic 0x616b3432 ('ak42') of llama2.c export.py --version 1/2; "
                             "only the legacy format (--version 0, a bare 7-int32 header) is supported")
        named = dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     max_seq_len=max_seq_len)
        bad = [f"{k}={v}" for k, v in named.items() if v <= 0]
        if vocab_size == 0:
            bad.append("vocab_size=0")
        if bad:
            raise ValueError(f"{where}: implausible header {raw}: non-positive {', '.join(bad)} "
                             "(not a llama2.c legacy checkpoint, or a corrupt one)")
        if dim % n_heads:
            raise ValueError(f"{where}: implausible header {raw}: n_heads={n_heads} does not divide dim={dim}")
        if n_heads % n_kv_heads:
            raise ValueError(f"{where}: implausible header {raw}: n_kv_heads={n_kv_heads} does not divide "
                             f"n_heads={n_heads}")
        if (dim // n_heads) % 2:
            raise ValueError(f"{where}: implausible header {raw}: head size {dim // n_heads} is odd "
                             "(RoPE needs pairs)")
        self.dim, self.hidden_dim, self.n_layers = dim, hidden_dim, n_layers
        self.n_heads, self.n_kv_heads, self.max_seq_len = n_heads, n_kv_heads, max_seq_len
        self.shared_classifier = vocab_size > 0
        self.vocab_size = abs(vocab_size)
        self.head_size = dim // n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def tensor_layout(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(llama2.c name, shape of one block, number of blocks) in file order (per-layer tensors: n_layers blocks)."""
        d, h, L, V, S, hs = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.max_seq_len, self.head_size
        layout = [
            ("token_embedding", (V, d), 1),
            ("rms_att", (d,), L),
            ("wq", (self.n_heads * hs, d), L),
            ("wk", (self.kv_dim, d), L),
            ("wv", (self.kv_dim, d), L),
            ("wo", (d, self.n_heads * hs), L),
            ("rms_ffn", (d,), L),
            ("w1", (h, d), L),
            ("w2", (d, h), L),
            ("w3", (h, d), L),
            ("rms_final", (d,), 1),
            ("freq_cis_real", (S, hs // 2), 1),
            ("freq_cis_imag", (S, hs // 2), 1),
        ]
        if not self.shared_classifier:
            layout.append(("wcls", (V, d), 1))
        return layout

    def expected_file_size(self) -> int:
        n = sum(int(np.prod(shape)) * count for _, shape, count in self.tensor_layout())
        return _HEADER.size + 4 * n

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this model (LlamaForCausalLM, float32)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": _RMS_EPS,
            "rope_theta": _ROPE_THETA,
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.shared_classifier,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": None,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": "float32",
            "dtype": "float32",
        }

    def __repr__(self) -> str:
        return (f"Llama2cHeader(dim={self.dim}, hidden_dim={self.hidden_dim}, n_layers={self.n_layers}, "
                f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, vocab_size={self.vocab_size}, "
                f"max_seq_len={self.max_seq_len}, shared_classifier={self.shared_classifier})")


def _read_header(f: BinaryIO, path: str | os.PathLike) -> Llama2cHeader:
    raw = f.read(_HEADER.size)
    if len(raw) != _HEADER.size:
        raise ValueError(f"llama2.c checkpoint {os.fspath(path)!r}: file is {len(raw)} bytes, too short for the "
                         f"{_HEADER.size}-byte header (7 int32)")
    header = Llama2cHeader(path, _HEADER.unpack(raw))
    actual = os.fstat(f.fileno()).st_size
    expected = header.expected_file_size()
    if actual != expected:
        other = "unshared" if header.shared_classifier else "shared"
        hint = ""
        classifier_bytes = 4 * header.vocab_size * header.dim
        flipped = expected + (classifier_bytes if header.shared_classifier else -classifier_bytes)
        if actual == flipped:
            hint = f" (the size would fit an {other} classifier: the sign of vocab_size in the header is wrong)"
        elif actual < expected:
            hint = " (truncated?)"
        raise ValueError(f"llama2.c checkpoint {os.fspath(path)!r}: file is {actual} bytes but its header {header} "
                         f"implies exactly {expected} bytes{hint}")
    return header


def read_llama2c_header(path: str | os.PathLike) -> Llama2cHeader:
    """Read and validate the header of a llama2.c legacy checkpoint, including the exact file size.

    Raises ``ValueError`` naming ``path`` for a short file, non-positive sizes, heads not dividing dim,
    an odd head size, or a file size other than the header implies.
    """
    with open(path, "rb") as f:
        return _read_header(f, path)


def _read_f32(f: BinaryIO, shape: tuple[int, ...], path: str | os.PathLike, what: str) -> np.ndarray:
    n = int(np.prod(shape))
    out = np.empty(n, dtype=_F32)
    got = f.readinto(memoryview(out).cast("B"))
    if got != 4 * n:  # the size check makes this unreachable unless the file changes under us
        raise ValueError(f"llama2.c checkpoint {os.fspath(path)!r}: unexpected end of file in {what}")
    return out.reshape(shape)


def permute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from llama2.c's interleaved RoPE layout to HF's half-split layout.

    w: [n_heads * head_size, in_features] (an ``nn.Linear`` weight). Returns a new array of the same shape
    where, within each head, rows 0,2,4,... come first and rows 1,3,5,... second (transformers'
    ``convert_llama_weights_to_hf.permute``).
    """
    out_features, in_features = w.shape
    if out_features % n_heads or (out_features // n_heads) % 2:
        raise ValueError(f"cannot permute rotary rows: {out_features} rows are not n_heads={n_heads} even-sized heads")
    hs = out_features // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, hs // 2, 2, in_features).transpose(0, 2, 1, 3).reshape(out_features, in_features))


def _check_rope_tables(cos: np.ndarray, sin: np.ndarray, header: Llama2cHeader, path: str | os.PathLike) -> None:
    """The stored tables must be llama2.c's precompute_freqs_cis(theta=10000); anything else means a misread file."""
    hs = header.head_size
    freqs = (1.0 / (_ROPE_THETA ** (np.arange(0, hs, 2, dtype=np.float64) / hs)))
    angles = np.arange(header.max_seq_len, dtype=np.float64)[:, None] * freqs[None, :]
    # float32 angles of up to max_seq_len radians carry ~max_seq_len * 6e-8 absolute error
    tol = 1e-4 + 2e-7 * header.max_seq_len
    err = max(float(np.max(np.abs(cos - np.cos(angles)))), float(np.max(np.abs(sin - np.sin(angles)))))
    if not np.isfinite(err) or err > tol:
        raise ValueError(f"llama2.c checkpoint {os.fspath(path)!r}: the stored RoPE tables (freq_cis_real/imag) "
                         f"differ from llama2.c's theta={_ROPE_THETA} tables by {err:.3g}: the file is corrupt or "
                         "its weights are not in llama2.c's legacy export order")


def iter_llama2c_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Stream the tensors of a llama2.c legacy checkpoint, one at a time, under HF LlamaForCausalLM names.

    Yields (name, float32 array) in file order, with HF shapes:
      model.embed_tokens.weight                      [vocab, dim]
      model.layers.{i}.input_layernorm.weight        [dim]
      model.layers.{i}.self_attn.q_proj.weight       [n_heads*head_size, dim]    rows permuted (docs/models.md#llama2c)
      model.layers.{i}.self_attn.k_proj.weight       [n_kv_heads*head_size, dim] rows permuted
      model.layers.{i}.self_attn.v_proj.weight       [n_kv_heads*head_size, dim]
      model.layers.{i}.self_attn.o_proj.weight       [dim, n_heads*head_size]
      model.layers.{i}.post_attention_layernorm.weight [dim]
      model.layers.{i}.mlp.gate_proj.weight          [hidden, dim]   (w1)
      model.layers.{i}.mlp.down_proj.weight          [dim, hidden]   (w2)
      model.layers.{i}.mlp.up_proj.weight            [hidden, dim]   (w3)
      model.norm.weight                              [dim]
      lm_head.weight                                 [vocab, dim]    only for an unshared classifier
    The RoPE tables are read, checked against theta=10000 and dropped. The header and file size are
    validated before anything is yielded (``ValueError`` naming the file).
    """
    hf_names = {
        "rms_att": "model.layers.{}.input_layernorm.weight",
        "wq": "model.layers.{}.self_attn.q_proj.weight",
        "wk": "model.layers.{}.self_attn.k_proj.weight",
        "wv": "model.layers.{}.self_attn.v_proj.weight",
        "wo": "model.layers.{}.self_attn.o_proj.weight",
        "rms_ffn": "model.layers.{}.post_attention_layernorm.weight",
        "w1": "model.layers.{}.mlp.gate_proj.weight",
        "w2": "model.layers.{}.mlp.down_proj.weight",
        "w3": "model.layers.{}.mlp.up_proj.weight",
        "token_embedding": "model.embed_tokens.weight",
        "rms_final": "model.norm.weight",
        "wcls": "lm_head.weight",
    }
    with open(path, "rb") as f:
        header = _read_header(f, path)
        cos = None
        for name, shape, count in header.tensor_layout():
            for i in range(count):
                what = name if count == 1 else f"{name} of layer {i}"
                w = _read_f32(f, shape, path, what)
                if name == "freq_cis_real":
                    cos = w
                    continue
                if name == "freq_cis_imag":
                    _check_rope_tables(cos, w, header, path)
                    cos = None
                    continue
                if name == "wq":
                    w = permute_rotary_rows(w, header.n_heads)
                elif name == "wk":
                    w = permute_rotary_rows(w, header.n_kv_heads)
                yield (hf_names[name].format(i) if count > 1 else hf_names[name]), w
        if f.read(1):  # the size check makes this unreachable unless the file changes under us
            raise ValueError(f"llama2.c checkpoint {os.fspath(path)!r}: trailing bytes after the last tensor")


def read_llama2c_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a llama2.c legacy checkpoint as (HF config.json dict, {HF tensor name: float32 array}).

    See ``iter_llama2c_tensors`` for names and shapes; q_proj/k_proj rows are already permuted to HF's
    half-split RoPE layout, and ``lm_head.weight`` is present only when the classifier is not shared
    (``config["tie_word_embeddings"]`` is False). Raises ``ValueError`` naming the file on a bad header or
    a size mismatch.
    """
    header = read_llama2c_header(path)
    tensors = dict(iter_llama2c_tensors(path))
    return header.hf_config(), tensors


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------
def _read_llama2c_tokenizer_pieces(path: str | os.PathLike) -> list[tuple[str, float]]:
    """(piece with U+2581 restored, score) for every entry of a llama2.c tokenizer.bin, validated."""
    where = f"llama2.c tokenizer {os.fspath(path)!r}"
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise ValueError(f"{where}: file is {len(data)} bytes, too short for the int32 max token length")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if max_len <= 0:
        raise ValueError(f"{where}: implausible max token length {max_len}")
    pieces: list[tuple[str, float]] = []
    off = 4
    while off < len(data):
        i = len(pieces)
        if off + 8 > len(data):
            raise ValueError(f"{where}: truncated at byte {off}: piece {i} has no complete (score, length) record")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if n < 0 or n > max_len:
            raise ValueError(f"{where}: piece {i} at byte {off - 4} has length {n}, outside 0..{max_len} "
                             "(the file's max token length)")
        if off + n > len(data):
            raise ValueError(f"{where}: truncated at byte {off}: piece {i} needs {n} bytes, "
                             f"{len(data) - off} remain")
        if not np.isfinite(score):
            raise ValueError(f"{where}: piece {i} has a non-finite score {score}")
        try:
            text = data[off:off + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: piece {i} at byte {off} is not valid UTF-8: {e}") from None
        off += n
        pieces.append((text, score))
    if len(pieces) <= _FIRST_NORMAL_ID:
        raise ValueError(f"{where}: only {len(pieces)} pieces; expected <unk>, <s>, </s>, 256 byte pieces "
                         "and the BPE pieces")
    for i, (expected, accepted) in enumerate([("<unk>", {"<unk>"}), ("<s>", {"<s>", "\n<s>\n"}),
                                              ("</s>", {"</s>", "\n</s>\n"})]):
        if pieces[i][0] not in accepted:
            raise ValueError(f"{where}: id {i} is {pieces[i][0]!r}, expected {expected!r}")
        pieces[i] = (expected, 0.0)
    for b in range(_N_BYTE_PIECES):
        want = f"<0x{b:02X}>"
        if pieces[3 + b][0] != want:
            raise ValueError(f"{where}: id {3 + b} is {pieces[3 + b][0]!r}, expected the byte-fallback piece {want!r}")
    seen: dict[str, int] = {}
    for i in range(_FIRST_NORMAL_ID, len(pieces)):
        text, score = pieces[i]
        if not text:
            raise ValueError(f"{where}: piece {i} is empty")
        text = text.replace(" ", "\u2581")
        if text in seen or text in ("<unk>", "<s>", "</s>") or (text.startswith("<0x") and len(text) == 6):
            raise ValueError(f"{where}: piece {i} {text!r} duplicates piece {seen.get(text, 'of a special id')}")
        seen[text] = i
        pieces[i] = (text, score)
    return pieces


def read_llama2c_tokenizer(path: str | os.PathLike):
    """Rebuild a sentencepiece ``ModelProto`` from a llama2.c ``tokenizer.bin`` (e.g. tok512.bin).

    The proto is a BPE model with byte fallback, pieces typed UNKNOWN (id 0), CONTROL (<s>, </s>),
    BYTE (<0x00>..<0xFF>) and NORMAL (the rest, with the file's scores), and LLaMA's settings: identity
    normalization, add_dummy_prefix, no removal of extra whitespace, split_digits, whitespace-only pieces
    allowed, unk surface " \u2047 ". ``proto.SerializeToString()`` is a ``tokenizer.model`` that
    ``sentencepiece.SentencePieceProcessor(model_proto=...)`` loads. Raises ``ValueError`` naming the file on
    a truncated file, an implausible length, invalid UTF-8, or special/byte pieces not where llama2.c puts them.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    pieces = _read_llama2c_tokenizer_pieces(path)
    proto = spm_pb2.ModelProto()
    Piece = spm_pb2.ModelProto.SentencePiece
    for i, (text, score) in enumerate(pieces):
        if i == 0:
            kind = Piece.UNKNOWN
        elif i < 3:
            kind = Piece.CONTROL
        elif i < _FIRST_NORMAL_ID:
            kind = Piece.BYTE
        else:
            kind = Piece.NORMAL
        proto.pieces.add(piece=text, score=float(score), type=kind)

    ts = proto.trainer_spec  # LLaMA's tokenizer.model trainer_spec, minus its corpus-specific fields
    ts.model_type = spm_pb2.TrainerSpec.BPE
    ts.vocab_size = len(pieces)
    ts.self_test_sample_size = 0
    ts.input_format = "text"
    ts.character_coverage = 1.0
    ts.max_sentencepiece_length = max(16, max(len(t) for t, _ in pieces[_FIRST_NORMAL_ID:]))
    ts.split_by_unicode_script = True
    ts.split_by_whitespace = True
    ts.split_by_number = True
    ts.treat_whitespace_as_suffix = False
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.vocabulary_output_piece_score = True
    ts.hard_vocab_limit = True
    ts.use_all_vocab = False
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    ts.unk_surface = " \u2047 "

    ns = proto.normalizer_spec  # LLaMA's: no normalization, a dummy prefix, whitespace kept as is
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False  # escape_whitespaces: left at its default (true), as in LLaMA
    ns.normalization_rule_tsv = ""
    return proto


def llama2c_tokenizer_json(proto) -> str:
    """A Hugging Face ``tokenizer.json`` that encodes exactly like sentencepiece with ``proto`` (BPE, dummy prefix).

    The BPE merges are derived from the NORMAL pieces in score order (the order sentencepiece merges
    in): for every piece, each split into two NORMAL pieces is a merge, ranked by the piece's id. The
    whitespace handling is a normalizer (prepend U+2581, then spaces -> U+2581) rather than transformers 5's
    ``Metaspace`` pre-tokenizer, because ``Metaspace`` adds no dummy prefix to a text that already starts
    with a space and so disagrees with sentencepiece on such texts. Decoding strips the dummy prefix and
    resolves byte-fallback pieces. BOS is added by the post-processor.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    NORMAL = spm_pb2.ModelProto.SentencePiece.NORMAL
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, i in normal.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
        ranked += [(i, normal[a], normal[b], a, b) for a, b in splits]
    merges = [(a, b) for *_, a, b in sorted(ranked)]
    unk, bos, eos = (proto.pieces[i].piece for i in range(3))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, bos, eos)])
    return tok.to_str(pretty=True)


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_llama2c_to_hf(model_bin: str | os.PathLike, tokenizer_bin: str | os.PathLike,
                          out_dir: str | os.PathLike) -> Path:
    """Convert a llama2.c legacy checkpoint and its tokenizer.bin into a Hugging Face LLaMA directory.

    Writes into ``out_dir`` (created if needed): config.json, generation_config.json, model.safetensors
    (float32; q/k rows permuted to HF's RoPE layout; no lm_head.weight when the classifier is shared),
    tokenizer.model (sentencepiece), tokenizer.json (see ``llama2c_tokenizer_json``), tokenizer_config.json and
    special_tokens_map.json, so that
    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` and ``LlamaForCausalLM.from_pretrained(out_dir)``
    load it offline without remote code. Tensors are read one at a time; the weights are held in memory
    once, while safetensors writes them. Everything is validated (header, size, RoPE tables, tokenizer,
    tokenizer size == vocab_size) before any file is written. Returns ``Path(out_dir)``.
    """
    from safetensors.numpy import save_file

    header = read_llama2c_header(model_bin)
    proto = read_llama2c_tokenizer(tokenizer_bin)
    if len(proto.pieces) != header.vocab_size:
        raise ValueError(f"llama2.c tokenizer {os.fspath(tokenizer_bin)!r} has {len(proto.pieces)} pieces but "
                         f"checkpoint {os.fspath(model_bin)!r} has vocab_size={header.vocab_size}")
    tensors = dict(iter_llama2c_tensors(model_bin))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_json(out / "config.json", header.hf_config())
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False})
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    (out / "tokenizer.json").write_text(llama2c_tokenizer_json(proto), encoding="utf-8")
    _write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    _write_json(out / "tokenizer_config.json", {
        # The generic fast tokenizer loads tokenizer.json as written; transformers 5's LlamaTokenizer would
        # rebuild it with a Metaspace pre-tokenizer that differs from sentencepiece on leading spaces.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": header.max_seq_len,
    })
    return out

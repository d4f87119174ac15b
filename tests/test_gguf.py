"""The GGUF converter and quantizer: metadata, vocabulary types, tensor layout, streaming
sources, determinism, and bad input."""

import json

import gguf  # a base dependency: the runtime reads GGUF with it
import numpy as np
import pytest
import torch

from spiritlm_edge.export.build import export_lm
from spiritlm_edge.export.checkpoints import CheckpointPaths
from spiritlm_edge.export.lm import load_lm_config
from spiritlm_edge.export.random_lm import write_tiny_lm as write_tiny
from spiritlm_edge.quant.gguf_convert import BYTE, CONTROL, UNUSED, USER_DEFINED, convert_lm, rope_permute
from spiritlm_edge.quant.llama_quantize import check_quant, quantize_gguf
from spiritlm_edge.runtime.errors import BundleError, CheckpointError, ModelError
from spiritlm_edge.runtime.gguf_file import (
    FORMAT_VERSION,
    Keys,
    decode_sentencepiece_model,
    read_gguf,
    read_spiritlm_gguf,
)
from spiritlm_edge.runtime.tokenizer import SpiritTokenizer


@pytest.fixture(scope="module")
def expressive(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    lm_dir = write_tiny(CheckpointPaths(root), "expressive", seed=5)
    out = convert_lm(lm_dir, root / "f16.gguf", "F16")
    return root, lm_dir, out


def test_metadata_and_vocabulary(expressive):
    root, lm_dir, out = expressive
    reader = gguf.GGUFReader(out)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    cfg = json.loads((lm_dir / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["llama.embedding_length"] == cfg["hidden_size"]
    assert fields["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert fields["llama.context_length"] == cfg["max_position_embeddings"]
    assert fields["llama.rope.dimension_count"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert fields["spiritlm.variant"] == "expressive"
    assert (fields["spiritlm.token.text"], fields["spiritlm.token.speech"]) == (1000, 1001)
    assert (fields["spiritlm.token.hubert_first"], fields["spiritlm.token.hubert_count"]) == (1002, 501)
    assert (fields["spiritlm.token.pitch_first"], fields["spiritlm.token.pitch_count"]) == (1503, 64)
    assert (fields["spiritlm.token.style_first"], fields["spiritlm.token.style_count"]) == (1567, 100)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg["vocab_size"] == 1792  # 1667 tokens padded to 7 * 256
    assert tokens[1001] == "[Speech]" and tokens[1002 + 42] == "[Hu42]" and tokens[1567 + 99] == "[St99]"
    assert all(t == USER_DEFINED for t in types[1000:1667])
    assert all(t == UNUSED for t in types[1667:])
    assert types[1] == types[2] == CONTROL and types[3] == BYTE and tokens[3] == "<0x00>"
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    # the embedded tokenizer is the checkpoint's, byte for byte
    assert fields[Keys.FORMAT_VERSION] == FORMAT_VERSION
    embedded = decode_sentencepiece_model(fields[Keys.Tokenizer.SENTENCEPIECE_MODEL])
    assert embedded == (lm_dir / "tokenizer.model").read_bytes()
    ours, from_gguf = SpiritTokenizer.from_dir(lm_dir), SpiritTokenizer.from_gguf(out)
    prompt = "[Text]hi there[Speech][St3][Pi7][Hu1][Hu9] ok"
    assert ours.encode(prompt) == from_gguf.encode(prompt)


def test_tensors_renamed_and_permuted(expressive):
    root, lm_dir, out = expressive
    sd = torch.load(lm_dir / "pytorch_model.bin", weights_only=True)
    cfg = load_lm_config(lm_dir, "expressive")
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 1 + cfg.num_layers * 9
    k = np.asarray(tensors["blk.1.attn_k.weight"].data)
    expected = rope_permute(sd["model.layers.1.self_attn.k_proj.weight"], cfg.num_kv_heads)
    np.testing.assert_array_equal(k, expected.to(torch.float16).numpy())  # f16 rounds bf16 subnormals
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # row h*d + 2i + j of llama.cpp's layout is HF row h*d + j*d/2 + i
    w = torch.arange(8 * 3).reshape(8, 3)
    p = rope_permute(w, 2)
    assert p[1].tolist() == w[2].tolist() and p[2].tolist() == w[1].tolist() and p[5].tolist() == w[6].tolist()


def test_conversion_is_deterministic_and_safetensors_equals_bin(expressive, tmp_path):
    from safetensors.torch import save_file

    root, lm_dir, out = expressive
    again = convert_lm(lm_dir, tmp_path / "again.gguf", "F16")
    assert again.read_bytes() == out.read_bytes()
    st_dir = tmp_path / "spirit-lm-expressive-7b"
    st_dir.mkdir()
    for f in lm_dir.iterdir():
        if f.name != "pytorch_model.bin":
            (st_dir / f.name).write_bytes(f.read_bytes())
    save_file(torch.load(lm_dir / "pytorch_model.bin", weights_only=True), st_dir / "model.safetensors")
    from_st = convert_lm(st_dir, tmp_path / "st.gguf", "F16")
    assert from_st.read_bytes() == out.read_bytes()
    assert not list(tmp_path.glob("*.part"))


def test_reader_sizes_every_tensor(expressive):
    root, lm_dir, out = expressive
    info = read_spiritlm_gguf(out)
    sd = torch.load(lm_dir / "pytorch_model.bin", weights_only=True)
    assert len(info.tensors) == len([n for n in sd if not n.endswith("rotary_emb.inv_freq")])
    embd = info.tensors["token_embd.weight"]
    assert embd.shape == tuple(reversed(sd["model.embed_tokens.weight"].shape))  # ggml order
    assert embd.n_bytes == sd["model.embed_tokens.weight"].numel() * 2  # f16
    assert info.tensors["output_norm.weight"].n_bytes == sd["model.norm.weight"].numel() * 4  # norms stay f32


def test_format_version_1_tokenizer_is_still_read(expressive, tmp_path):
    """Files written before the tokenizer model became a base64 string (a uint8 array)."""
    root, lm_dir, out = expressive
    reader = gguf.GGUFReader(out)
    writer = gguf.GGUFWriter(tmp_path / "v1.gguf", "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == Keys.Tokenizer.SENTENCEPIECE_MODEL:
            writer.add_array(name, decode_sentencepiece_model(value))
        elif name == Keys.FORMAT_VERSION:
            writer.add_uint32(name, 1)
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, field.types[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    old = SpiritTokenizer.from_metadata(read_spiritlm_gguf(tmp_path / "v1.gguf").metadata)
    assert old.model_proto == (lm_dir / "tokenizer.model").read_bytes()


def test_quantize_keeps_metadata_and_tokenizer(expressive, tmp_path):
    root, lm_dir, out = expressive
    q = quantize_gguf(out, tmp_path / "q4.gguf", "Q4_K_M", progress=False)
    info = read_spiritlm_gguf(q)
    assert info.metadata["general.file_type"] == 15
    assert info.metadata["spiritlm.token.style_first"] == 1567
    assert SpiritTokenizer.from_gguf(q).encode("[Speech][Hu3]") == SpiritTokenizer.from_dir(lm_dir).encode(
        "[Speech][Hu3]"
    )
    assert q.stat().st_size < out.stat().st_size / 2


def test_export_lm_records_bundle_component(tmp_path):
    root = tmp_path / "ckpt"
    write_tiny(CheckpointPaths(root), "base", seed=1)
    path = export_lm(root, "base", tmp_path / "bundle", quant="Q8_0", progress=False)
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    entry = manifest["components"]["lm"]
    assert manifest["variant"] == "base" and entry["file"] == path.name == "lm-Q8_0.gguf"
    assert entry["quant"] == "Q8_0" and entry["bytes"] == path.stat().st_size
    # the BF16 intermediate is gone
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["bundle.json", "lm-Q8_0.gguf"]


def test_unsupported_quant_is_a_clear_error(expressive, tmp_path):
    root, lm_dir, out = expressive
    with pytest.raises(ModelError, match="Q4_K_M"):
        check_quant("Q3_K_XS")
    with pytest.raises(ModelError, match="F16"):
        convert_lm(lm_dir, tmp_path / "x.gguf", "Q4_K_M")
    with pytest.raises(ModelError, match="Unsupported"):
        export_lm(root, "expressive", tmp_path / "b", quant="int4")


def test_vocab_size_disagreeing_with_tokenizer(expressive, tmp_path):
    root, lm_dir, out = expressive
    bad = tmp_path / "spirit-lm-expressive-7b"
    bad.mkdir()
    for f in lm_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1536}))
    with pytest.raises(CheckpointError, match="1667 tokens but config.json's vocab_size is 1536"):
        convert_lm(bad, tmp_path / "x.gguf")
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": 2048}))
    with pytest.raises(CheckpointError, match="embed_tokens.*expected \\(2048, 256\\)"):
        convert_lm(bad, tmp_path / "x.gguf")
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "special_tokens_map.json").unlink()
    with pytest.raises(CheckpointError, match="special_tokens_map.json"):
        convert_lm(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_truncated_and_foreign_gguf_are_detected(expressive, tmp_path):
    root, lm_dir, out = expressive
    data = out.read_bytes()
    for cut in (10, 5000, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(BundleError, match="truncated|not a GGUF"):
            read_gguf(tmp_path / "cut.gguf")
    writer = gguf.GGUFWriter(tmp_path / "plain.gguf", "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read_gguf(tmp_path / "plain.gguf")  # a valid GGUF ...
    with pytest.raises(BundleError, match="without Spirit LM metadata"):
        read_spiritlm_gguf(tmp_path / "plain.gguf")  # ... but not ours

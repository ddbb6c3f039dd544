"""GPTQ export on the trained tiny model: an independent dequantizer, quality vs RTN and fp32, the classic layout,
reproducibility, the runner backend, and one-line errors that leave nothing at --out.

Each artifact is built once per module (gptqmodel on two CPU cores: ~20-40 s each).
"""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from quantkit.agreement import Agreement
from quantkit.backends import open_backend
from quantkit.backends.gptq import open_gptq
from quantkit.calib import calibration_samples, default_calib, load_calibration, parse_calib_spec, share_out
from quantkit.chat import render_dialogue, stop_token_ids
from quantkit.cli import main
from quantkit import native
from quantkit.decode_linear import DecodeLinear
from quantkit.data import load_dataset
from quantkit.formats import serving_problems
from quantkit.errors import QuantkitError
from quantkit.evaluate import Method, perplexity
from quantkit.export import gptq as gptq_export
from quantkit.export.artifact import verify
from quantkit.export.gptq import GptqOptions, export_gptq
from quantkit.sources import load_tokenizer, model_folder

# Group 128, as the tiny recipes and the real StableLM recipes use.
GROUP = 128
CALIB = dict(calib_samples=32, calib_seqlen=256)
QUANTIZED = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
PACKED = ("qweight", "qzeros", "scales", "g_idx")
# Backend vs fp32 dequantized reference on the committed tiny model (logits up to |19|), group 128: measured max
# 0.266 (act-order 0.260), mean 0.0201 (0.0202); running that reference in bf16 gives max 0.253-0.305, mean 0.0201-
# 0.0204: bf16 activations are the whole error. A zero point off by one (v2 zeros read as v1) gives max 9.0-10.5,
# mean 0.95-1.28.
MAX_LOGIT_ERROR = 0.4
MEAN_LOGIT_ERROR = 0.025
# Top-1 of the backend and of the fp32 reference differ only at near-ties: on the two windows (512 positions) the
# export flips 3 and the act-order export 7 (the reference itself run in bf16 flips 6 and 8), at reference top-1/top-2
# margins of at most 0.058, measured on a 2-core Xeon; how many near-ties there are is the model's, not the
# kernel's, so the bound is on the margin of each flip.
NEAR_TIE = 0.1
# Held-out perplexity (head of tiny-heldout, HELDOUT_METHOD) of the committed tiny model, measured on a 2-core Xeon:
# fp32 102.12; 4-bit group 128: RTN +1.23 %, GPTQ (chat-format tiny-train calibration) +0.55 %; KL(fp32 || model)
# RTN 0.0208, GPTQ 0.0104 nats per token (ratio 0.50; 0.47 on the model committed before); 3-bit RTN +5.82 %,
# KL 0.100. Smaller than on real LLMs (4-bit RTN costs LLaMA-7B +10.7 %): a 5.7M-parameter model trained on 14M
# tokens has few outlier features for 4 bits to clip.
RTN_MIN_RISE = 1.01  # issue 12's bar: 4-bit RTN at the recipe's group size costs at least 1 % held-out perplexity
GPTQ_SHARE_OF_RTN_RISE = 0.7  # GPTQ must remove at least 30 % of RTN's perplexity rise
# The bar is a GPTQ KL below RTN's; measured 0.47-0.50 of it on the two committed models, so 0.6 keeps a
# margin for other CPUs' GPTQ arithmetic and still fails a GPTQ that only matches RTN.
GPTQ_KL_FRACTION_OF_RTN = 0.6
# Top-1 agreement the exporter records on its held-out slice: measured 0.949 on the committed model (above 0.95 on
# the less sensitive one before); on the whole split GPTQ agrees 93.2 % and 4-bit RTN 89.9 % (tiny_quality.md).
MIN_EXPORT_TOP1 = 0.92
HELDOUT_METHOD = Method(window=256, stride=192, batch_size=8)
HELDOUT = "tiny-heldout[:120000]"  # a head of the held-out split (about a quarter): ~30k scored tokens


def export(tmp_path_factory, name: str, **options) -> Path:
    out = tmp_path_factory.mktemp("gptq") / name
    return export_gptq("tiny", out, GptqOptions(**{"group_size": GROUP, **CALIB, **options}))


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory) -> Path:
    return export(tmp_path_factory, "gptq")


@pytest.fixture(scope="module")
def act_order_folder(tmp_path_factory) -> Path:
    return export(tmp_path_factory, "gptq-act-order", desc_act=True)


@pytest.fixture(scope="module")
def rtn_folder(tmp_path_factory) -> Path:
    return export(tmp_path_factory, "rtn", method="rtn")


@pytest.fixture(scope="module")
def rtn3_folder(tmp_path_factory) -> Path:
    return export(tmp_path_factory, "rtn3", method="rtn", bits=3)


@pytest.fixture(scope="module")
def heldout_tokens() -> torch.Tensor:
    """Two 256-token windows of the tiny model's held-out text."""
    ids = load_tokenizer(model_folder("tiny"))(load_dataset("tiny-heldout").text)["input_ids"]
    return torch.tensor([ids[1000:1256], ids[5000:5256]])


# ---- an independent dequantizer: plain torch, from the classic GPTQ layout's definition ----

def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-wide fields of int32 words, lowest bits first, laid out along `dim`."""
    fields = 32 // bits
    shape = [-1 if d == dim + 1 else 1 for d in range(packed.dim() + 1)]
    shifts = (torch.arange(fields, dtype=torch.int32) * bits).view(shape)
    values = (packed.unsqueeze(dim + 1) >> shifts) & ((1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= fields
    return values.reshape(shape)


def dequantize(tensors: dict[str, torch.Tensor], prefix: str, bits: int, zero_offset: int = 1) -> torch.Tensor:
    """W [out, in] = scales[g] * (q - (stored zero + 1)) for input row i in group g = g_idx[i] (v1 zeros)."""
    q = unpack(tensors[f"{prefix}.qweight"], bits, 0)  # [in, out]
    zeros = unpack(tensors[f"{prefix}.qzeros"], bits, 1) + zero_offset  # [groups, out]
    groups = tensors[f"{prefix}.g_idx"].long()
    return (tensors[f"{prefix}.scales"].float()[groups] * (q - zeros[groups]).float()).t()


def reference_model(folder: Path, zero_offset: int = 1) -> GPTNeoXForCausalLM:
    """An fp32 GPTNeoX built from the artifact's config and tensors alone, quantized linears dequantized."""
    tensors = load_file(folder / "model.safetensors")
    bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
    state = {}
    for name, tensor in tensors.items():
        prefix, _, field = name.rpartition(".")
        if field == "qweight":
            state[f"{prefix}.weight"] = dequantize(tensors, prefix, bits, zero_offset)
        elif field not in PACKED:
            state["lm_head.weight" if name == "embed_out.weight" else name] = tensor.float()
    model = GPTNeoXForCausalLM(GPTNeoXConfig.from_pretrained(folder)).float().eval()
    model.load_state_dict(state, strict=True)
    return model


def backend_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    backend = open_gptq(folder, "cpu")
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    logits, _ = backend.forward(ids, positions, mask, backend.new_cache(len(ids)), last_only=False)
    return logits


def check_logits(folder: Path, ids: torch.Tensor) -> None:
    """Backend logits vs the fp32 dequantized reference, within the bf16 noise measured above; the off-by-one
    zero point must land well outside the bounds, or they could not tell."""
    got = backend_logits(folder, ids)
    with torch.no_grad():
        want = reference_model(folder)(ids).logits
        off_by_one = reference_model(folder, zero_offset=0)(ids).logits
    error = (got - want).abs()
    assert error.max() < MAX_LOGIT_ERROR and error.mean() < MEAN_LOGIT_ERROR, (error.max(), error.mean())
    top2 = want.topk(2, dim=-1).values
    flipped = got.argmax(-1) != want.argmax(-1)
    assert (top2[..., 0] - top2[..., 1])[flipped].le(NEAR_TIE).all(), "top-1 differs where the reference is decided"
    broken = (off_by_one - want).abs()
    assert broken.max() > 2 * MAX_LOGIT_ERROR and broken.mean() > 2 * MEAN_LOGIT_ERROR


def test_logits_match_independent_dequantizer(gptq_folder, heldout_tokens):
    check_logits(gptq_folder, heldout_tokens)


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_steps_match_independent_dequantizer(gptq_folder, heldout_tokens, batch):
    """Decode steps within the same bounds: at batch 1 on quantkit's one-row layer kernel, at batch 2 on its few-row
    int4 product (rows.c, or amx.c's tiles with AMX)."""
    backend = open_gptq(gptq_folder, "cpu")
    assert any(isinstance(m, DecodeLinear) for m in backend.model.modules()) == native.available()
    ids, prompt = heldout_tokens[:batch, :64], 48
    cache = backend.new_cache(batch)
    positions = lambda start, end: torch.arange(start, end).expand(batch, -1)
    _, cache = backend.forward(ids[:, :prompt], positions(0, prompt), torch.ones(batch, prompt, dtype=torch.long),
                               cache)
    steps = []
    for position in range(prompt, ids.shape[1]):
        logits, cache = backend.forward(ids[:, position:position + 1], positions(position, position + 1),
                                        torch.ones(batch, position + 1, dtype=torch.long), cache)
        steps.append(logits[:, -1])
    got = torch.stack(steps, dim=1)
    with torch.no_grad():
        want = reference_model(gptq_folder)(ids).logits[:, prompt:]
    error = (got - want).abs()
    assert error.max() < MAX_LOGIT_ERROR and error.mean() < MEAN_LOGIT_ERROR, (error.max(), error.mean())
    top2 = want.topk(2, dim=-1).values
    flipped = got.argmax(-1) != want.argmax(-1)
    assert (top2[..., 0] - top2[..., 1])[flipped].le(NEAR_TIE).all(), "top-1 differs where the reference is decided"


def test_act_order_logits_match_independent_dequantizer(act_order_folder, heldout_tokens):
    g_idx = load_file(act_order_folder / "model.safetensors")["gpt_neox.layers.0.mlp.dense_4h_to_h.g_idx"]
    assert not torch.equal(g_idx, torch.arange(len(g_idx), dtype=g_idx.dtype) // GROUP)  # really reordered
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((len(g_idx) // GROUP,), GROUP))
    check_logits(act_order_folder, heldout_tokens)



def test_per_column_export_matches_independent_dequantizer(tmp_path_factory, heldout_tokens):
    """group_size -1 (the GPTQ paper's setting: one scale and zero point per output column) exports and runs;
    gptqmodel's group-aware reordering, on for grouped exports, must be off for it."""
    folder = export(tmp_path_factory, "gptq-per-column", group_size=-1)
    tensors = load_file(folder / "model.safetensors")
    assert tensors["gpt_neox.layers.0.mlp.dense_4h_to_h.scales"].shape[0] == 1
    assert not tensors["gpt_neox.layers.0.mlp.dense_4h_to_h.g_idx"].any()
    check_logits(folder, heldout_tokens)


# ---- quality ----

@pytest.fixture(scope="module")
def fp32_heldout(tiny_backend) -> tuple[float, list[torch.Tensor]]:
    """The fp32 model's held-out perplexity and its log-prob rows, batch by batch."""
    rows: list[torch.Tensor] = []
    ppl = perplexity(tiny_backend, load_dataset(HELDOUT), HELDOUT_METHOD,
                     on_batch=lambda logprobs, _: rows.append(logprobs))
    return ppl.as_dict()["token_perplexity"], rows


def heldout_scores(folder: Path, fp32_rows: list[torch.Tensor]) -> tuple[float, float]:
    """(held-out perplexity, mean KL(fp32 || artifact)) of an artifact through the runner backend."""
    agreement, reference = Agreement(), iter(fp32_rows)
    ppl = perplexity(open_gptq(folder, "cpu"), load_dataset(HELDOUT), HELDOUT_METHOD,
                     on_batch=lambda logprobs, targets: agreement.add(next(reference), logprobs, targets))
    return ppl.as_dict()["token_perplexity"], agreement.summary()["kl_mean"]


def test_quantization_costs_what_it_costs_real_models(gptq_folder, rtn_folder, rtn3_folder, fp32_heldout):
    """RTN raises perplexity, GPTQ removes a good part of that rise and of the KL, and 3 bits cost more than 4."""
    fp32, fp32_rows = fp32_heldout
    gptq, gptq_kl = heldout_scores(gptq_folder, fp32_rows)
    rtn, rtn_kl = heldout_scores(rtn_folder, fp32_rows)
    rtn3, rtn3_kl = heldout_scores(rtn3_folder, fp32_rows)
    figures = dict(fp32=fp32, gptq=gptq, rtn=rtn, rtn3=rtn3, gptq_kl=gptq_kl, rtn_kl=rtn_kl, rtn3_kl=rtn3_kl)
    assert rtn >= RTN_MIN_RISE * fp32, figures
    assert gptq - fp32 <= GPTQ_SHARE_OF_RTN_RISE * (rtn - fp32), figures
    assert gptq_kl < GPTQ_KL_FRACTION_OF_RTN * rtn_kl, figures
    assert rtn3 > rtn and rtn3_kl > rtn_kl, figures


def test_export_measures_quality_into_card_and_manifest(gptq_folder):
    manifest = json.loads((gptq_folder / "quantkit.json").read_text())
    quality = manifest["metrics"]["perplexity"]
    assert quality["data"].startswith("tiny-heldout") and quality["tokens"] > 500
    assert quality["quantized"]["perplexity"] < quality["source"]["perplexity"] * 1.02
    assert manifest["validation"]["top1_agreement"] > MIN_EXPORT_TOP1
    assert manifest["calibration"]["datasets"] == ["tiny-train"]  # the tiny presets' default
    assert manifest["calibration"]["samples"] == CALIB["calib_samples"]
    card = (gptq_folder / "README.md").read_text()
    assert "license: cc-by-nc-sa-4.0" in card and "tiny-train" in card
    assert f"{quality['quantized']['perplexity']:.3f}" in card
    assert verify(gptq_folder) == []


# ---- the classic, portable layout ----

def tensor_names(path: Path) -> set[str]:
    with safe_open(path, "pt") as handle:
        return set(handle.keys())


def test_tensor_names_and_dtypes_follow_the_source(gptq_folder):
    source = tensor_names(model_folder("tiny") / "model.safetensors")
    layers = json.loads((gptq_folder / "config.json").read_text())["num_hidden_layers"]
    quantized = {f"gpt_neox.layers.{i}.{module}" for i in range(layers) for module in QUANTIZED}
    assert {f"{name}.weight" for name in quantized} <= source
    expected = (source - {f"{name}.weight" for name in quantized}) | {f"{n}.{f}" for n in quantized for f in PACKED}
    assert tensor_names(gptq_folder / "model.safetensors") == expected
    assert "embed_out.weight" in expected
    tensors = load_file(gptq_folder / "model.safetensors")
    for name, tensor in tensors.items():
        packed_int = name.endswith((".qweight", ".qzeros", ".g_idx"))
        assert tensor.dtype == (torch.int32 if packed_int else torch.float16), name
    # symmetric 4-bit: every stored zero is 8 - 1
    assert all((t == 0x77777777).all() for n, t in tensors.items() if n.endswith(".qzeros"))


def test_config_carries_the_quantization_fields(gptq_folder):
    config = json.loads((gptq_folder / "config.json").read_text())
    source = json.loads((model_folder("tiny") / "config.json").read_text())
    expected = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": GROUP,
                "desc_act": False, "sym": True, "true_sequential": True, "damp_percent": 0.01}
    for qconfig in (config["quantization_config"], json.loads((gptq_folder / "quantize_config.json").read_text())):
        assert {key: qconfig.get(key) for key in expected} == expected
        assert "offload_to_disk_path" not in json.dumps(qconfig)
    assert config["rotary_pct"] == 0.25 and config["rotary_emb_base"] == 10000
    assert config["dtype"] == "float16" and config["architectures"] == ["GPTNeoXForCausalLM"]
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")} == {
        k: source[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}


def test_tokenizer_and_generation_config(gptq_folder):
    source = model_folder("tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (gptq_folder / name).read_bytes() == (source / name).read_bytes()
    backend = open_gptq(gptq_folder, "cpu")
    generation = json.loads((gptq_folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == stop_token_ids(backend.tokenizer)
    assert backend.max_positions == json.loads((gptq_folder / "config.json").read_text())[
        "max_position_embeddings"] == 256  # the runner's context limit comes from the artifact's config


def test_plain_transformers_reload_matches_backend(gptq_folder, heldout_tokens):
    """Default loader settings, no quantkit attention: fp16 as config.json says, SDPA. Measured max 0.137 from the
    backend (bf16 activations, fp32 attention scores): the same bf16-level noise as above."""
    model = AutoModelForCausalLM.from_pretrained(gptq_folder, device_map="cpu").eval()
    with torch.no_grad():
        plain = model(heldout_tokens).logits.float()
    assert (plain - backend_logits(gptq_folder, heldout_tokens)).abs().max() < MAX_LOGIT_ERROR


def test_same_seed_and_data_give_identical_bytes(gptq_folder, tmp_path):
    again = export_gptq("tiny", tmp_path / "again", GptqOptions(group_size=GROUP, **CALIB))
    assert (again / "model.safetensors").read_bytes() == (gptq_folder / "model.safetensors").read_bytes()
    for name in ("config.json", "quantize_config.json"):
        assert (again / name).read_bytes() == (gptq_folder / name).read_bytes()


# ---- the runner ----

def test_runner_generates_from_the_artifact(gptq_folder, capsys):
    assert open_backend(str(gptq_folder)).name == "gptq-4bit"
    code = main(["generate", "--model", str(gptq_folder), "--prompt", "Explain the assert statement.",
                 "--greedy", "--max-new-tokens", "8", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["backend"] == "gptq-4bit" and 0 < len(record["token_ids"]) <= 8


# ---- options and calibration ----

@pytest.mark.parametrize("options", [
    dict(bits=5), dict(group_size=7), dict(group_size=8), dict(group_size=96), dict(damp=0.0), dict(damp=1.0),
    dict(method="awq"), dict(method="rtn", desc_act=True), dict(calib=()), dict(calib=("tiny-train:-1",)),
    dict(calib_samples=0), dict(seed=-1),
])
def test_bad_options_are_refused(options):
    with pytest.raises(QuantkitError):
        GptqOptions(**options)


def test_good_options_are_accepted():
    for group_size in (-1, 16, 32, 128, 1024):
        GptqOptions(group_size=group_size)
    GptqOptions(bits=8, damp=0.1, calib=("tiny-train:3", "alpaca-sample:1"))


def test_calibration_specs_weights_and_defaults():
    assert parse_calib_spec("tiny-train:3").weight == 3.0
    assert parse_calib_spec("hub:org/data:train").dataset == "hub:org/data:train"  # a split, not a weight
    assert share_out(10, [3.0, 1.0]) == [8, 2] and share_out(3, [1.0, 1.0, 1.0]) == [1, 1, 1]
    assert default_calib("tiny", GptqOptions().calib) == ("tiny-train",)
    assert default_calib("stablelm-3b", GptqOptions().calib) == ("wikitext2-valid",)
    assert default_calib("tiny", ("my.txt",)) == ("my.txt",)


def test_calibration_samples_are_seeded_windows_and_chat_dialogues(tmp_path, tiny_backend):
    tokenizer = tiny_backend.tokenizer
    records = [{"instruction": f"Say {i}.", "output": f"{i} " * 30} for i in range(6)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    sources = load_calibration(("tiny-train:3", f"{tmp_path / 'chat.jsonl'}:1"), samples=8)
    first = calibration_samples(tokenizer, sources, seqlen=256, seed=0)
    assert first == calibration_samples(tokenizer, sources, seqlen=256, seed=0)
    assert first != calibration_samples(tokenizer, sources, seqlen=256, seed=1)
    text_rows, chat_rows = first[:6], first[6:]
    assert all(len(row["input_ids"]) == 256 and row["attention_mask"] == [1] * 256 for row in text_rows)
    rendered = [render_dialogue(tokenizer, [("user", r["instruction"]), ("assistant", r["output"])])[0][:256]
                for r in records]
    assert len(chat_rows) == 2 and all(row["input_ids"] in rendered for row in chat_rows)


def test_calibration_refuses_evaluation_splits_unless_forced(tmp_path):
    test_file = tmp_path / "test.txt"
    test_file.write_text("held back for evaluation only. " * 50)
    for spec in ("wikitext2-test", str(test_file), "hh-helpful-test:2"):
        with pytest.raises(QuantkitError, match="evaluation split"):
            load_calibration((spec,), samples=4)
    assert load_calibration((str(test_file),), samples=4, allow_eval_split=True)[0].count == 4


# ---- the CLI: one-line errors, and nothing at --out ----

def export_cli(capsys, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["export", "--fmt", "gptq", "--model", "tiny", "--out", str(out), "--group-size", str(GROUP), *extra])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A non-zero exit and one `error: ...` line, the last one, after at most gptqmodel's progress logging."""
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert all(needle in errors[0] for needle in needles), errors[0]


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_cli_rejects_bits_5(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--fmt", "gptq", "--model", "tiny", "--out", str(tmp_path / "a"), "--bits", "5"])
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, "--bits")
    assert_nothing_left(tmp_path / "a")


@pytest.mark.parametrize("make_args, needles", [
    (lambda tmp: ["--group-size", "7"], ("group size", "7")),
    (lambda tmp: ["--calib", str(tmp / "missing.txt")], ("not found", "missing.txt")),
    (lambda tmp: ["--calib", "wikitext2-test"], ("wikitext2-test", "evaluation split")),
    (lambda tmp: ["--calib", str(tmp / "test.jsonl")], ("test.jsonl", "evaluation split")),
])
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, make_args, needles):
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    out = tmp_path / "out"
    code, err = export_cli(capsys, out, *make_args(tmp_path))
    assert_one_line_error(code, err, *needles)
    assert_nothing_left(out)


def test_cli_refuses_an_existing_folder_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = export_cli(capsys, out, "--method", "rtn")
    assert_one_line_error(code, err, "exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_failure_mid_way_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full_disk(saved: Path, dst: Path) -> None:
        (dst / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gptq_export, "write_tensors", full_disk)
    out = tmp_path / "out"
    code, err = export_cli(capsys, out, "--method", "rtn")
    assert_one_line_error(code, err, "No space left")
    assert_nothing_left(out)


# ---- what vLLM / TGI / transformers expect of the folder (quantkit.downstream, also run by export and verify) ----

def rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    save_file(edit(tensors), folder / "model.safetensors")


def rewrite_json(folder: Path, name: str, edit) -> None:
    data = json.loads((folder / name).read_text())
    edit(data)
    (folder / name).write_text(json.dumps(data))


LAYER0_QKV = "gpt_neox.layers.0.attention.query_key_value"
BREAKAGES = {
    "head renamed": (lambda f: rewrite_tensors(f, lambda t: {("lm_head.weight" if k == "embed_out.weight" else k): v
                                                             for k, v in t.items()}), "tensor embed_out.weight: missing"),
    "g_idx dropped": (lambda f: rewrite_tensors(f, lambda t: {k: v for k, v in t.items() if k != f"{LAYER0_QKV}.g_idx"}),
                      f"{LAYER0_QKV}: missing g_idx"),
    "fp32 scales": (lambda f: rewrite_tensors(f, lambda t: {k: v.float() if k.endswith(".scales") else v
                                                             for k, v in t.items()}), "scales: dtype F32, expected F16"),
    "v2 format": (lambda f: rewrite_json(f, "config.json", lambda c: c["quantization_config"].update(
        checkpoint_format="gptq_v2")), "checkpoint_format 'gptq_v2' is not the classic 'gptq'"),
    "no quant_method": (lambda f: rewrite_json(f, "config.json", lambda c: c["quantization_config"].pop("quant_method")),
                        "quant_method is None"),
    "legacy config disagrees": (lambda f: rewrite_json(f, "quantize_config.json", lambda c: c.update(group_size=64)),
                                "quantize_config.json: 'group_size' differs from config.json"),
    "no rotary_pct": (lambda f: rewrite_json(f, "config.json", lambda c: c.pop("rotary_pct")), "'rotary_pct' missing"),
}


def test_serving_contract_holds_for_every_export(gptq_folder, act_order_folder, rtn_folder):
    for folder in (gptq_folder, act_order_folder, rtn_folder):
        assert serving_problems(folder, "gptq") == []


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_serving_contract_names_each_breakage(rtn_folder, tmp_path, capsys, breakage):
    broken = shutil.copytree(rtn_folder, tmp_path / "broken")
    edit, message = BREAKAGES[breakage]
    edit(broken)
    problems = serving_problems(broken, "gptq")
    assert any(message in p for p in problems), problems
    assert main(["verify", str(broken)]) == 1
    assert message in capsys.readouterr().out

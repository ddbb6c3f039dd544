"""What the downstream loaders expect of an artifact folder, checked field by field (`quantkit verify` runs this
after re-hashing). None of those servers can be imported here (vLLM and TGI need CUDA builds; optimum-onnx 0.1
pins transformers < 4.58), so their contracts are written down as checks:

GPTQ, for vLLM `--quantization gptq` (GPTQConfig reads bits, group_size, desc_act; gptq_marlin also sym and
checkpoint_format), TGI `--quantize gptq` (quantize_config.json or quantization_config: bits, group_size,
desc_act, sym, quant_method) and transformers + optimum/gptqmodel (quantization_config):
  - config.json: model_type gpt_neox, GPTNeoXForCausalLM, rotary_pct, rotary_emb_base, and quantization_config
    with quant_method "gptq", bits 2/3/4/8, group_size -1 or >= 1, desc_act and sym booleans, checkpoint_format "gptq";
  - quantize_config.json with the same bits / group_size / desc_act / sym;
  - per quantized linear (K inputs, N outputs): qweight int32 [K*bits/32, N], qzeros int32 [groups, ceil(N*bits/32)],
    scales fp16 [groups, N], g_idx int32 [K], and no leftover `.weight`;
  - the GPT-NeoX names vLLM's loader maps: gpt_neox.embed_in.weight and embed_out.weight.
ONNX, for onnxruntime, optimum's ORTModelForCausalLM and onnxruntime-genai:
  - model.onnx with inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value and outputs
    logits, present.{i}.key/.value for every layer of config.json (model_type gpt_neox);
  - every external data file the graph names exists beside it;
  - genai_config.json naming that graph, its IO names, the shapes of config.json and the stop ids of
    generation_config.json (onnxruntime-genai reads nothing else).
Every format: tokenizer_config.json carries the StableLM prompt as its `chat_template` (what
`tokenizer.apply_chat_template` and vLLM's /v1/chat/completions render) and generation_config.json stops on the
card's stop ids.
The downstream suite (tests_downstream/) proves these folders in the servers themselves.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from quantkit.chat import chat_template
from quantkit.export.genai import GENAI_CONFIG, MODEL_TYPE, PAST_NAMES, PRESENT_NAMES

PACKED = ("qweight", "qzeros", "scales", "g_idx")
PACKED_DTYPES = {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}
NEOX_NAMES = ("gpt_neox.embed_in.weight", "embed_out.weight")


def read_json(folder: Path, name: str, problems: list[str]) -> dict:
    path = folder / name
    if not path.is_file():
        problems.append(f"{name}: missing")
        return {}
    return json.loads(path.read_text())


def check_model_config(config: dict, problems: list[str]) -> None:
    if config.get("model_type") != "gpt_neox":
        problems.append(f"config.json: model_type is {config.get('model_type')!r}, loaders expect 'gpt_neox'")
    if config.get("architectures") != ["GPTNeoXForCausalLM"]:
        problems.append(f"config.json: architectures is {config.get('architectures')!r}, expected ['GPTNeoXForCausalLM']")
    for key in ("rotary_pct", "rotary_emb_base"):
        if not isinstance(config.get(key), (int, float)):
            problems.append(f"config.json: '{key}' missing (vLLM's GPT-NeoX reads it)")


def check_quantization_fields(name: str, fields: dict, problems: list[str]) -> None:
    expected = {
        "bits": lambda v: v in (2, 3, 4, 8),
        "group_size": lambda v: isinstance(v, int) and (v == -1 or v > 0),
        "desc_act": lambda v: isinstance(v, bool),
        "sym": lambda v: isinstance(v, bool),
    }
    for key, ok in expected.items():
        if not ok(fields.get(key)):
            problems.append(f"{name}: '{key}' is {fields.get(key)!r}")


def safetensors_layout(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) over every safetensors file of the folder, without reading tensor data."""
    layout = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                layout[name] = (view.get_dtype(), list(view.get_shape()))
    return layout


def check_packed_linear(prefix: str, layout: dict, bits: int, group_size: int, problems: list[str]) -> None:
    missing = [field for field in PACKED if f"{prefix}.{field}" not in layout]
    if missing:
        problems.append(f"{prefix}: missing {', '.join(missing)}")
        return
    for field, dtype in PACKED_DTYPES.items():
        if layout[f"{prefix}.{field}"][0] != dtype:
            problems.append(f"{prefix}.{field}: dtype {layout[f'{prefix}.{field}'][0]}, expected {dtype}")
    k = layout[f"{prefix}.g_idx"][1][0]
    n = layout[f"{prefix}.scales"][1][1]
    groups = 1 if group_size == -1 else -(-k // group_size)
    words = lambda count: -(-count * bits // 32)  # int32 words holding `count` fields
    shapes = {"qweight": [words(k), n], "qzeros": [groups, words(n)], "scales": [groups, n], "g_idx": [k]}
    for field, shape in shapes.items():
        if layout[f"{prefix}.{field}"][1] != shape:
            problems.append(f"{prefix}.{field}: shape {layout[f'{prefix}.{field}'][1]}, expected {shape}")
    if f"{prefix}.weight" in layout:
        problems.append(f"{prefix}.weight: an unquantized copy beside the packed tensors")


def check_gptq(folder: Path) -> list[str]:
    problems: list[str] = []
    config = read_json(folder, "config.json", problems)
    check_model_config(config, problems)
    quantization = config.get("quantization_config", {})
    if quantization.get("quant_method") != "gptq":
        problems.append(f"config.json: quantization_config.quant_method is {quantization.get('quant_method')!r}")
    if quantization.get("checkpoint_format", "gptq") != "gptq":
        problems.append(f"config.json: checkpoint_format {quantization['checkpoint_format']!r} is not the classic 'gptq'")
    check_quantization_fields("config.json quantization_config", quantization, problems)
    legacy = read_json(folder, "quantize_config.json", problems)
    if legacy:
        check_quantization_fields("quantize_config.json", legacy, problems)
        for key in ("bits", "group_size", "desc_act", "sym"):
            if legacy.get(key) != quantization.get(key):
                problems.append(f"quantize_config.json: '{key}' differs from config.json")
    layout = safetensors_layout(folder)
    problems += [f"tensor {name}: missing" for name in NEOX_NAMES if name not in layout]
    prefixes = sorted({name.rsplit(".", 1)[0] for name in layout if name.endswith(PACKED)})
    if not prefixes:
        problems.append("no quantized linears (qweight/qzeros/scales/g_idx) in the safetensors files")
    if quantization.get("bits") in (2, 4, 8) and isinstance(quantization.get("group_size"), int):
        for prefix in prefixes:
            check_packed_linear(prefix, layout, quantization["bits"], quantization["group_size"], problems)
    return problems


def check_onnx(folder: Path) -> list[str]:
    import onnx

    problems: list[str] = []
    config = read_json(folder, "config.json", problems)
    check_model_config(config, problems)
    if not (folder / "model.onnx").is_file():
        return problems + ["model.onnx: missing"]
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    layers = config.get("num_hidden_layers", 0)
    kv = [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    expected_inputs = ["input_ids", "attention_mask", "position_ids", *kv]
    expected_outputs = ["logits", *(name.replace("past_key_values", "present") for name in kv)]
    for kind, actual, expected in (("inputs", [i.name for i in graph.input], expected_inputs),
                                   ("outputs", [o.name for o in graph.output], expected_outputs)):
        if sorted(actual) != sorted(expected):
            extra, absent = sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual))
            problems.append(f"model.onnx {kind}: missing {absent or 'none'}, unexpected {extra or 'none'}")
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    problems += [f"external data {name}: missing beside model.onnx" for name in sorted(locations)
                 if not (folder / name).is_file()]
    check_genai_config(folder, config, problems)
    return problems


def check_genai_config(folder: Path, config: dict, problems: list[str]) -> None:
    genai = read_json(folder, GENAI_CONFIG, problems)
    if not genai:
        return
    model, stops = genai.get("model", {}), read_json(folder, "generation_config.json", problems).get("eos_token_id")
    decoder = model.get("decoder", {})
    heads, layers = config.get("num_attention_heads", 0), config.get("num_hidden_layers")
    expected = {
        "model.type": (model.get("type"), MODEL_TYPE),
        "model.context_length": (model.get("context_length"), config.get("max_position_embeddings")),
        "model.vocab_size": (model.get("vocab_size"), config.get("vocab_size")),
        "model.eos_token_id": (model.get("eos_token_id"), stops),
        "decoder.filename": (decoder.get("filename"), "model.onnx"),
        "decoder.hidden_size": (decoder.get("hidden_size"), config.get("hidden_size")),
        "decoder.num_attention_heads": (decoder.get("num_attention_heads"), heads),
        "decoder.num_key_value_heads": (decoder.get("num_key_value_heads"), heads),
        "decoder.num_hidden_layers": (decoder.get("num_hidden_layers"), layers),
        "decoder.head_size": (decoder.get("head_size"), config.get("hidden_size", 0) // max(heads, 1)),
        "decoder.inputs.past_key_names": (decoder.get("inputs", {}).get("past_key_names"), PAST_NAMES[0]),
        "decoder.inputs.past_value_names": (decoder.get("inputs", {}).get("past_value_names"), PAST_NAMES[1]),
        "decoder.outputs.present_key_names": (decoder.get("outputs", {}).get("present_key_names"), PRESENT_NAMES[0]),
        "decoder.outputs.present_value_names": (decoder.get("outputs", {}).get("present_value_names"),
                                                PRESENT_NAMES[1]),
    }
    for key, (actual, wanted) in expected.items():
        if actual != wanted:
            problems.append(f"{GENAI_CONFIG}: {key} is {actual!r}, expected {wanted!r}")


def check_chat_files(folder: Path) -> list[str]:
    """The prompt format and stop ids every server reads, whatever the format."""
    problems: list[str] = []
    tokenizer_config = read_json(folder, "tokenizer_config.json", problems)
    if tokenizer_config and tokenizer_config.get("chat_template") != chat_template():
        problems.append("tokenizer_config.json: chat_template is not the StableLM prompt format")
    generation = read_json(folder, "generation_config.json", problems)
    if generation and not generation.get("eos_token_id"):
        problems.append("generation_config.json: no eos_token_id (servers would not stop on the card's stop ids)")
    return problems

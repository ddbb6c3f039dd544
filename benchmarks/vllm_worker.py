"""One benchmark block in one process: the side-by-side method (`figures`) and vLLM's side of it.

Standard library only at import time, so `.venv-vllm/bin/python benchmarks/vllm_worker.py SPEC.json` runs in
vLLM's environment and quantkit's side imports `figures` from here: both engines are timed by the same code.
SPEC (JSON): folder, dtype, quantization (or null), threads, prompts {chat, prefill {length: ids}, decode},
batches, new_tokens, repeats. Prints one JSON line: the figures and the process's peak RSS.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Callable

Call = Callable[[list[list[int]], int], None]  # (prompts, new tokens): one greedy call, no stop tokens


def wall(call: Call, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    call(prompts, new_tokens)
    return time.perf_counter() - start


def figures(call: Call, spec: dict) -> dict:
    """TTFT (1-token call on the chat prompt), prefill tok/s (1-token call per length) and decode tok/s per batch
    ((N-1) x B tokens over an N-token call minus a 1-token call); a warm-up of each shape, then medians."""
    prompts, n = spec["prompts"], spec["new_tokens"]
    decode = {b: [prompts["decode"]] * b for b in spec["batches"]}
    for prompt in prompts["prefill"].values():
        call([prompt], 1)
    for batch_prompts in decode.values():
        call(batch_prompts, 4)
    samples: dict[str, list[float]] = {"ttft_ms": []}
    for _ in range(spec["repeats"]):
        samples["ttft_ms"].append(1000 * wall(call, [prompts["chat"]], 1))
        for length, prompt in prompts["prefill"].items():
            samples.setdefault(f"prefill_{length}", []).append(int(length) / wall(call, [prompt], 1))
        for batch, batch_prompts in decode.items():
            extra = wall(call, batch_prompts, n) - wall(call, batch_prompts, 1)
            samples.setdefault(f"decode_{batch}", []).append((n - 1) * batch / extra)
    result = {key: statistics.median(values) for key, values in samples.items()}
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def vllm_call(spec: dict) -> Call:
    """vLLM's offline engine on the folder, in this process (no engine-core subprocess), no prefix caching."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    options = {"quantization": spec["quantization"]} if spec["quantization"] else {}
    llm = LLM(model=spec["folder"], dtype=spec["dtype"], enforce_eager=True, enable_prefix_caching=False, seed=0,
              max_model_len=spec["max_model_len"], disable_log_stats=True, **options)

    def call(prompts: list[list[int]], new_tokens: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                                detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)

    return call


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    import torch

    torch.set_num_threads(spec["threads"])
    result = figures(vllm_call(spec), spec)
    result["threads"] = {"torch": torch.get_num_threads(),
                         **{k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_"))}}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

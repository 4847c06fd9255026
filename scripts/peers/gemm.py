#!/usr/bin/env python3
"""Peer GEMM rates on this machine: PyTorch f32 and bf16, ONNX Runtime f32, 2 threads.

Run with the reference venv, OpenBLAS tuning variables unset:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE ../ref-venv/bin/python scripts/peers/gemm.py [N] [--runs R] [--json]

Times C = A @ B for N x N x N (default 2048): median of R runs (default 10) after 2 warm-up
runs, printed as GFLOP/s (2 N^3 flops per product).
"""

import argparse
import json
import os

from common import THREADS, median_secs


def torch_rates(n, runs):
    import torch

    torch.set_num_threads(THREADS)
    out = {"torch_version": torch.__version__}
    g = torch.Generator().manual_seed(0)
    for name, dtype in (("torch_f32", torch.float32), ("torch_bf16", torch.bfloat16)):
        a = torch.rand(n, n, generator=g).to(dtype)
        b = torch.rand(n, n, generator=g).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        with torch.inference_mode():
            s = median_secs(lambda: torch.matmul(a, b, out=c), runs)
        out[name] = 2 * n**3 / s / 1e9
    return out


def ort_rate(n, runs):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    feeds = {
        "a": rng.random((n, n), dtype=np.float32),
        "b": rng.random((n, n), dtype=np.float32),
    }
    s = median_secs(lambda: sess.run(None, feeds), runs)
    return {"onnxruntime_version": ort.__version__, "ort_f32": 2 * n**3 / s / 1e9}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("n", nargs="?", type=int, default=2048)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = {"n": args.n, "threads": THREADS, "runs": args.runs}
    res.update(torch_rates(args.n, args.runs))
    res.update(ort_rate(args.n, args.runs))
    if args.json:
        print(json.dumps(res))
    else:
        for k in ("torch_f32", "torch_bf16", "ort_f32"):
            print(f"{k:12s} {args.n}^3: {res[k]:8.1f} GFLOP/s")
        print(
            f"torch {res['torch_version']}, onnxruntime {res['onnxruntime_version']}, "
            f"{THREADS} threads, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}"
        )


if __name__ == "__main__":
    main()

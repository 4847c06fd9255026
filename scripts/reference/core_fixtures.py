"""Reference fixtures for kiln's core numerics, generated with PyTorch (CPU) and transformers.

Writes into ``tests/fixtures/core/``:

* ``f8.json`` -- f32 -> fp8 casts as torch does them (``x.to(torch.float8_e4m3fn)`` and
  ``x.to(torch.float8_e5m2)``, viewed as uint8) for a few thousand inputs chosen to hit signed
  zeros, fp8 subnormals, every rounding tie between neighbouring fp8 values (and the f32 values
  just above and below each tie), the max finite values, the overflow region, huge values,
  infinities, NaN, f32 subnormals and random values over many magnitudes; plus the f32 value of
  every fp8 bit pattern 0..255 in both formats.
* ``ops.json`` -- elementwise / broadcasting / reduction / matmul op cases: for each case the op
  name, its attrs, the input tensors and torch's output tensor (flat row-major data).
* ``llama_block.safetensors`` + ``llama_block.json`` -- one transformers ``LlamaDecoderLayer``
  (GQA, RoPE, RMSNorm, SwiGLU MLP) with seeded random weights, its input hidden states and its
  output hidden states; the JSON holds the config values used.

JSON conventions: f32 values are written as Python's float repr of the exact f32 value (so they
parse back to that f32 exactly); non-finite values are the strings "inf", "-inf" and "nan";
bools are true/false; i64 values are JSON integers. Every JSON file has a "generated_by" entry
with the torch and transformers versions.

Run from the repository root (deterministic: every random draw is seeded):

    /work/ref-venv/bin/python scripts/reference/core_fixtures.py

Needs torch, transformers and safetensors.
"""

import json
import math
import os
import struct

import torch
import transformers
from safetensors.torch import save_file
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

OUT_DIR = os.path.join("tests", "fixtures", "core")

GENERATED_BY = {
    "script": "scripts/reference/core_fixtures.py",
    "torch": torch.__version__,
    "transformers": transformers.__version__,
}


# ----------------------------------------------------------------------------------------------
# helpers


def f32(x):
    """Rounds a Python float to the nearest f32 and returns it as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f32_from_bits(b):
    return struct.unpack("<f", struct.pack("<I", b))[0]


def next_up(x):
    """Next f32 towards +inf (x finite f32)."""
    b = f32_bits(x)
    if x == 0.0:
        return f32_from_bits(1)
    if x > 0:
        return f32_from_bits(b + 1)
    return f32_from_bits(b - 1)


def next_down(x):
    return -next_up(-x)


def enc_float(x):
    """JSON value of an f32: float repr, or "inf"/"-inf"/"nan"."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def tensor_json(t):
    """{"dtype", "shape", "data"} of a tensor (f32, i64 or bool)."""
    t = t.detach().contiguous()
    flat = t.reshape(-1).tolist()
    if t.dtype == torch.float32:
        dtype, data = "f32", [enc_float(v) for v in flat]
    elif t.dtype == torch.int64:
        dtype, data = "i64", [int(v) for v in flat]
    elif t.dtype == torch.bool:
        dtype, data = "bool", [bool(v) for v in flat]
    else:
        raise TypeError(f"unsupported dtype {t.dtype}")
    return {"dtype": dtype, "shape": list(t.shape), "data": data}


def write_json(name, obj):
    path = os.path.join(OUT_DIR, name)
    with open(path, "w") as f:
        # allow_nan=False: every non-finite value must already be a string.
        json.dump(obj, f, separators=(",", ":"), allow_nan=False)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


# ----------------------------------------------------------------------------------------------
# f8.json


def fp8_decode(dtype):
    return torch.arange(256, dtype=torch.uint8).view(dtype).float().tolist()


def f8_inputs():
    vals = [0.0, -0.0]
    pos_only = []
    for dtype, max_finite, overflow in (
        (torch.float8_e4m3fn, 448.0, [449.0, 456.0, 460.0, 464.0, 470.0, 479.0, 480.0, 496.0,
                                      512.0, 1000.0]),
        (torch.float8_e5m2, 57344.0, [57345.0, 59392.0, 60000.0, 61440.0, 62000.0, 65535.0,
                                      65536.0, 70000.0, 131072.0]),
    ):
        finite = sorted({v for v in fp8_decode(dtype) if math.isfinite(v) and v >= 0.0})
        # Every representable non-negative value, and every tie between neighbours plus the
        # f32 values just below and above it (ties go both ways under round-half-to-even).
        # The neighbours of only every third tie are negated too (sign handling is symmetric),
        # to keep the file small.
        vals += finite
        for i, (lo, hi) in enumerate(zip(finite, finite[1:])):
            mid = (lo + hi) / 2  # exact in f32: at most one more mantissa bit
            assert f32(mid) == mid
            vals += [mid]
            around = [next_down(mid), next_up(mid)]
            (vals if i % 3 == 0 else pos_only).extend(around)
        # Half a step above the max finite value is the overflow tie.
        vals += [next_up(max_finite)]
        for v in overflow:
            vals += [next_down(v), v, next_up(v)]
    # Huge values, f32 extremes, f32 subnormals.
    vals += [1e5, 1e6, 1e10, 1e20, 1e30, f32_from_bits(0x7F7FFFFF)]
    vals += [f32_from_bits(1), f32_from_bits(2), f32_from_bits(0x100), f32_from_bits(0x7FFFFF),
             f32_from_bits(0x800000), 1e-40, 1e-30, 1e-20, 1e-10, 1e-7]
    # Negative versions of everything so far (dedup keeps the list short).
    vals += [-v for v in vals] + pos_only
    # Random values over many magnitudes, both signs.
    g = torch.Generator().manual_seed(8)
    mant = torch.rand(300, generator=g, dtype=torch.float64) + 1.0
    expo = torch.randint(-28, 22, (300,), generator=g)
    sign = torch.randint(0, 2, (300,), generator=g) * 2 - 1
    rnd = (sign * mant * torch.pow(2.0, expo.double())).tolist()
    vals += rnd
    vals = [f32(v) for v in vals]
    # Dedup by bit pattern, keeping the order.
    seen, out = set(), []
    for v in vals:
        b = f32_bits(v)
        if b not in seen:
            seen.add(b)
            out.append(v)
    out += [math.inf, -math.inf, math.nan]
    return out


def make_f8():
    inputs = f8_inputs()
    x = torch.tensor(inputs, dtype=torch.float32)
    # The tensor holds exactly the f32 values we write.
    assert all(
        (a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(x.tolist(), inputs)
    )
    assert all(
        math.copysign(1.0, a) == math.copysign(1.0, b)
        for a, b in zip(x.tolist(), inputs) if not math.isnan(a)
    )
    e4 = x.to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    e5 = x.to(torch.float8_e5m2).view(torch.uint8).tolist()
    write_json("f8.json", {
        "generated_by": GENERATED_BY,
        "inputs": [enc_float(v) for v in inputs],
        "e4m3fn_bits": e4,
        "e5m2_bits": e5,
        "e4m3fn_decode": [enc_float(v) for v in fp8_decode(torch.float8_e4m3fn)],
        "e5m2_decode": [enc_float(v) for v in fp8_decode(torch.float8_e5m2)],
    })
    return x, e4, e5


# ----------------------------------------------------------------------------------------------
# ops.json


class Cases:
    def __init__(self):
        self.cases = []
        self.names = set()

    def add(self, name, op, attrs, inputs, output):
        assert name not in self.names, name
        self.names.add(name)
        self.cases.append({
            "name": name,
            "op": op,
            "attrs": attrs,
            "inputs": [tensor_json(t) for t in inputs],
            "output": tensor_json(output),
        })


def shape_tag(shape):
    return "s" if len(shape) == 0 else "x".join(str(d) for d in shape)


def make_ops():
    g = torch.Generator().manual_seed(1)

    def randn(*shape, scale=1.0):
        return (torch.randn(tuple(shape), generator=g, dtype=torch.float32) * scale).float()

    c = Cases()

    # -- unary elementwise ----------------------------------------------------------------
    fixed = [-10.0, -5.0, -3.0, -2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0,
             30.0, -30.0, 100.0, -100.0]
    rnd = (torch.rand(26, generator=g, dtype=torch.float32) * 20.0 - 10.0).tolist()
    x = torch.tensor(fixed + rnd, dtype=torch.float32)
    unary = {
        "gelu": lambda t: torch.nn.functional.gelu(t),
        "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
        "erf": torch.erf,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "silu": torch.nn.functional.silu,
        "exp": torch.exp,
        "log": torch.log,
        "rsqrt": torch.rsqrt,
        "sqrt": torch.sqrt,
        "recip": torch.reciprocal,
        "sin": torch.sin,
        "cos": torch.cos,
    }
    for op, fn in unary.items():
        c.add(op, op, {}, [x], fn(x))

    # -- softmax / log_softmax ------------------------------------------------------------
    ninf = -math.inf
    sm = torch.tensor([
        [0.5, -1.25, 2.0, 0.0, 1.5, -0.75],          # normal values
        [1e4, -1e4, 5e3, ninf, 0.0, 9999.0],          # large spread, one -inf
        [ninf, 1.0, ninf, ninf, -2.0, ninf],          # several -inf
        [ninf, ninf, ninf, ninf, ninf, ninf],         # all -inf: torch gives nan
    ], dtype=torch.float32)
    for axis in (1, 0, -1):
        tag = f"axis{axis}" if axis >= 0 else "axis_neg1"
        c.add(f"softmax_{tag}", "softmax", {"axis": axis}, [sm], torch.softmax(sm, dim=axis))
        c.add(f"log_softmax_{tag}", "log_softmax", {"axis": axis}, [sm],
              torch.log_softmax(sm, dim=axis))

    # -- binary elementwise with broadcasting ---------------------------------------------
    shape_pairs = [([3, 1], [4]), ([2, 1, 4], [3, 1]), ([], [2, 3]), ([1], [5]), ([2, 3], [2, 3]),
                   ([1, 4, 1], [3, 1, 5])]
    exponents = [2.0, 3.0, -1.0, 0.5, 0.0, -2.0, 1.5, 1.0, 4.0, -0.5, 3.0, 2.0]
    binary = {
        "add": torch.add,
        "mul": torch.mul,
        "sub": torch.sub,
        "div": torch.div,
        "max": torch.maximum,
        "min": torch.minimum,
        "pow": torch.pow,
    }
    for op, fn in binary.items():
        for sa, sb in shape_pairs:
            a = randn(*sa)
            b = randn(*sb)
            af, bf = a.view(-1), b.view(-1)
            if op in ("add", "sub", "mul") and sa == sb:
                af[:4] = torch.tensor([math.inf, -math.inf, math.nan, 0.0])
                bf[:4] = torch.tensor([-math.inf, -math.inf, 1.0, math.inf])
            elif op == "div":
                if bf.numel() >= 3:
                    bf[0], bf[-1] = 0.0, -0.0
                    af[0] = 0.0  # 0/0 = nan somewhere in the broadcast output
                else:
                    bf[0] = 0.0
            elif op in ("max", "min"):
                if af.numel() > 1:
                    af[1] = math.nan
                if bf.numel() > 1:
                    bf[-1] = math.nan
            elif op == "pow":
                # Base: mixed signs, incl. zero; exponent: integers and non-integers.
                a = randn(*sa, scale=2.0)
                af = a.view(-1)
                if af.numel() > 2:
                    af[2] = 0.0
                b = torch.tensor(
                    [exponents[i % len(exponents)] for i in range(max(1, bf.numel()))],
                    dtype=torch.float32).reshape(sb)
                if sa == []:
                    a = torch.tensor(-1.5, dtype=torch.float32)
            name = f"{op}_{shape_tag(sa)}_{shape_tag(sb)}"
            c.add(name, op, {}, [a, b], fn(a, b))

    # -- where ------------------------------------------------------------------------------
    cond = torch.tensor([[True], [False]])
    a = randn(3)
    b = randn(2, 3)
    c.add("where_2x1_3_2x3", "where", {}, [cond, a, b], torch.where(cond, a, b))
    cond = torch.tensor([True, False, True])
    a = randn(2, 1)
    b = torch.tensor(7.5, dtype=torch.float32)
    c.add("where_3_2x1_s", "where", {}, [cond, a, b], torch.where(cond, a, b))

    # -- comparisons ------------------------------------------------------------------------
    def small_ints(*shape):
        return torch.randint(-2, 3, tuple(shape), generator=g).float()

    for op, fn in (("lt", torch.lt), ("le", torch.le), ("eq", torch.eq)):
        for sa, sb in ([[3, 1], [4]], [[2, 3], [2, 3]], [[], [2, 3]]):
            a = small_ints(*sa)
            b = small_ints(*sb)
            if sa == sb:
                a.view(-1)[:3] = torch.tensor([math.nan, math.inf, -math.inf])
                b.view(-1)[:3] = torch.tensor([math.nan, math.inf, 1.0])
            c.add(f"{op}_{shape_tag(sa)}_{shape_tag(sb)}", op, {}, [a, b], fn(a, b))

    # -- argmax -----------------------------------------------------------------------------
    am = torch.tensor([
        [1.0, 3.0, 3.0, 2.0, 0.0],                    # tie: first max index (1)
        [2.0, 2.0, 2.0, 2.0, 2.0],                    # all equal: 0
        [ninf, ninf, -1.0, ninf, -1.0],               # -inf plus tie: 2
        [ninf, ninf, ninf, ninf, ninf],               # all -inf: 0
    ], dtype=torch.float32)
    for axis, keepdim in ((1, False), (1, True), (0, False), (0, True)):
        c.add(f"argmax_axis{axis}_keepdim{int(keepdim)}", "argmax",
              {"axis": axis, "keepdim": keepdim}, [am],
              torch.argmax(am, dim=axis, keepdim=keepdim))

    # -- reductions -------------------------------------------------------------------------
    r = randn(2, 3, 4)
    reductions = {
        "sum": torch.sum,
        "mean": torch.mean,
        "reduce_max": torch.amax,
        "reduce_min": torch.amin,
    }
    axis_sets = [([0], False), ([1], False), ([2], False), ([0, 2], False), ([1, 2], False),
                 ([0, 1, 2], False), ([1], True), ([0, 2], True)]
    for op, fn in reductions.items():
        for axes, keepdim in axis_sets:
            name = f"{op}_axes{''.join(map(str, axes))}_keepdim{int(keepdim)}"
            c.add(name, op, {"axes": axes, "keepdim": keepdim}, [r],
                  fn(r, dim=tuple(axes), keepdim=keepdim))

    # -- matmul -----------------------------------------------------------------------------
    for sa, sb in (([3, 4], [4, 5]), ([2, 3, 4], [4, 5]), ([2, 1, 3, 4], [5, 4, 2]),
                   ([1, 7], [7, 1])):
        a = randn(*sa)
        b = randn(*sb)
        c.add(f"matmul_{shape_tag(sa)}_{shape_tag(sb)}", "matmul", {}, [a, b],
              torch.matmul(a, b))

    write_json("ops.json", {"generated_by": GENERATED_BY, "cases": c.cases})


# ----------------------------------------------------------------------------------------------
# llama_block.safetensors / llama_block.json


def make_llama_block():
    cfg = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=128)
    config = transformers.LlamaConfig(**cfg, attn_implementation="eager")
    # transformers 5 moved rope_theta into rope_parameters; make sure it was taken.
    rope = getattr(config, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(config, "rope_theta", None)) == 10000.0, rope
    assert rope.get("rope_type", "default") == "default", rope
    assert config._attn_implementation == "eager"
    assert config.hidden_act == "silu" and not config.attention_bias and not config.mlp_bias

    layer = LlamaDecoderLayer(config, layer_idx=0).to(torch.float32).eval()
    # Every parameter is overwritten from seed 0, in named_parameters() order.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(0.2 * torch.randn(p.shape))
    batch, seq = 2, 7
    hidden = torch.randn(batch, seq, cfg["hidden_size"], dtype=torch.float32)
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    rotary = LlamaRotaryEmbedding(config)
    min_val = torch.finfo(torch.float32).min
    causal = torch.triu(torch.full((seq, seq), min_val, dtype=torch.float32), diagonal=1)
    mask = causal[None, None].expand(batch, 1, seq, seq).contiguous()

    with torch.no_grad():
        position_embeddings = rotary(hidden, position_ids)
        out = layer(hidden, attention_mask=mask, position_ids=position_ids,
                    position_embeddings=position_embeddings)
    if isinstance(out, tuple):  # transformers < 4.54 returned (hidden_states, ...)
        out = out[0]
    assert out.shape == hidden.shape and torch.isfinite(out).all()

    tensors = {name: p.detach().contiguous() for name, p in layer.named_parameters()}
    tensors["input.hidden_states"] = hidden.contiguous()
    tensors["output.hidden_states"] = out.detach().contiguous()
    path = os.path.join(OUT_DIR, "llama_block.safetensors")
    # No safetensors metadata: its key order is not stable between runs. The versions are in
    # llama_block.json.
    save_file(tensors, path)
    os.chmod(path, 0o644)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")

    write_json("llama_block.json", {
        "generated_by": GENERATED_BY,
        **cfg,
        "hidden_act": config.hidden_act,
        "attention_bias": bool(config.attention_bias),
        "mlp_bias": bool(config.mlp_bias),
        "batch": batch,
        "seq": seq,
        "position_ids": list(range(seq)),
        "attention_mask": "causal additive [batch,1,seq,seq]: 0 on/below the diagonal, "
                          "finfo(float32).min above",
        "tensors": {name: list(t.shape) for name, t in sorted(tensors.items())},
    })


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    torch.set_num_threads(1)
    make_f8()
    make_ops()
    make_llama_block()


if __name__ == "__main__":
    main()

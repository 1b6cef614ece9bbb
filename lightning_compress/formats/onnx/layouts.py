"""Integer weight layouts in ONNX: which op computes a grid, and how its tensors are laid out.

Per bit width:

- **int4** (group size a power of two >= 16, per channel, or per tensor): onnxruntime's
  contrib op ``com.microsoft.MatMulNBits`` (``Y = A @ dequant(B)^T``). Its codes are
  *unsigned* nibbles with a default zero point of 8, so our signed code ``q`` in
  ``[-8, 7]`` is stored as ``q + 8`` and an asymmetric zero point ``z`` as ``z + 8``:
  ``(q + 8 - (z + 8)) * s == (q - z) * s``, the same dequantized weight bit for bit.
  ``B`` is uint8 ``[N, n_blocks, block_size / 2]``, two codes a byte, the first (lower
  ``k``) in the low nibble; ``scales`` is float ``[N * n_blocks]``; zero points (only
  for asymmetric grids, since 8 is the default) are uint8 ``[N * ceil(n_blocks / 2)]``,
  packed the same way row by row. ORT wants ``block_size`` a power of two >= 16, so a
  group size is used as is, and a per-channel (or per-tensor, broadcast to every row)
  grid becomes one block per row of ``K`` rounded up to a power of two, the tail padded
  with code 0 (never read: ``A`` has only ``K`` columns).
- **int8** (per channel or per tensor), the default: QDQ, ``DequantizeLinear`` of an int8
  initializer feeding a plain ``MatMul``. The initializer holds the *transposed* codes
  ``[K, N]`` (MatMul's ``B`` layout, which also serves 3-D inputs, where ``Gemm`` would
  not), so the per-channel axis is 1. The dequantization is ``(q - z) * s``, exact: the
  output differs from PyTorch by float accumulation order only. Caveat: onnxruntime's
  default session (1.2x) fuses a symmetric per-channel DequantizeLinear + MatMul into a
  ``MatMulNBits`` with ``accuracy_level=4``, which rounds the activations to int8 as well;
  the session config ``session.qdq_matmulnbits_accuracy_level=0`` keeps it weight-only,
  and :func:`~lightning_compress.formats.onnx.io.run_onnx` sets it.
- **int4 with** ``dynamic_int8_activations=True``: ``MatMulNBits`` with
  ``accuracy_level=4``: onnxruntime rounds the activations to int8 (one scale per block of
  ``block_size``) and multiplies integers, an approximation (36 dB SQNR on a GELU MLP)
  that ran 3.5x faster than float32 PyTorch at batch 1 here, against 1.9x weight-only
  (BENCHMARKS.md, export_inference).
- **int8 with** ``dynamic_int8_activations=True``: each token (row of the activations)
  rounded to uint8 on the grid int8 dynamic training uses (its own scale and zero point
  from its min and max, ``round(x * (1 / scale)) + zero``: the same float32 operations,
  so the same codes), ``MatMulInteger`` with the weight, the token's zero point taken
  out in int32 with the weight's column sums, then a rescale by ``x_scale * w_scale``.
  One scale per token keeps each sample's output independent of the rest of the batch
  (``DynamicQuantizeLinear``'s one scale per tensor did not: 37 dB alone, 9 dB beside a
  sample 50x louder). Weights are int8 codes with an int8 ``b_zero_point``, the uint8 x
  int8 layout onnxruntime's own ``quantize_dynamic`` writes: its kernel for it (VNNI, AMX)
  was 10x its uint8 x uint8 one at 128 tokens here (144 us against 1,538 us for a
  768 x 3072 weight). On x86 CPUs without VNNI (Intel before Cascade Lake, AMD before
  Zen 4) that kernel adds pairs of products in saturating int16 (``vpmaddubsw``), which
  full-range codes overflow (12 dB SQNR on an MLP here): where
  :func:`uint8_int8_matmul_exact` finds that on the exporting machine, the weights are
  written as uint8 codes shifted by 128 with a uint8 zero point instead, the same
  products, which onnxruntime sums exactly there (and as fast, on an AVX2 CPU). A file
  with int8 weights served on a CPU without VNNI saturates as onnxruntime's own do:
  export on (a CPU like) the serving machine; the export's check runs the file there.

Linear layers of other widths (int2/3/5/6/7) stay float in the graph, as their
dequantized weights (:data:`INTEGER_BITS`), as Conv layers do. int8 groups and int4
groups that are not a power of two >= 16 are refused with a ``ValueError`` naming the
layer, before anything is exported.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.spec import QuantSpec

MATMUL_NBITS = "MatMulNBits"
QDQ = "QDQ"
MATMUL_INTEGER = "MatMulInteger"

SUPPORTED = (
    "int4 per group (group_size a power of two >= 16), per channel or per tensor, symmetric or"
    " asymmetric (MatMulNBits); int8 per channel or per tensor (QDQ, or MatMulInteger with"
    " onnx_activations=\"int8\")"
)

INTEGER_BITS = (4, 8)
"""The widths whose Linear layers ``model.onnx`` holds as integers; others stay float."""

MS_DOMAIN = "com.microsoft"
"""The opset domain of onnxruntime's contrib ops (``MatMulNBits``)."""


@dataclass
class LayerPlan:
    """One quantized Linear layer to store as integers: its name, the op that computes it
    (:func:`onnx_op`), its codes and grid, and the float weight the plain export holds."""

    name: str
    op: str
    q: QuantizedWeight
    dequantized: np.ndarray  # [N, K] float32, what the float export holds
    int8_activations: bool = False  # MatMulNBits: accuracy_level 4 (see the module docstring)


def onnx_op(name: str, spec: QuantSpec, dynamic: bool = False) -> str:
    """The op that computes layer ``name`` quantized with ``spec`` in the ONNX graph.

    Raises:
        ValueError: naming the layer, for a grid this export cannot write.
    """
    if spec.bits == 4:
        if spec.granularity in ("channel", "tensor"):
            return MATMUL_NBITS
        size = spec.group_size
        if size >= 16 and size & (size - 1) == 0:
            return MATMUL_NBITS
    elif spec.bits == 8 and spec.granularity in ("channel", "tensor"):
        return MATMUL_INTEGER if dynamic else QDQ
    raise ValueError(f"layer {name!r} is {spec.describe()}, which this ONNX export does not support. Supported: {SUPPORTED}")


def pack_int4(codes: np.ndarray, block_size: int) -> np.ndarray:
    """MatMulNBits' ``B``: signed int4 codes ``[N, K]`` -> uint8 ``[N, n_blocks, block_size / 2]``.

    Each code is stored as ``q + 8`` (ORT's nibbles are unsigned, zero point 8); two per
    byte, the lower ``k`` in the low nibble; ``K`` is padded to ``n_blocks * block_size``
    with code 0.
    """
    codes = np.asarray(codes)
    rows, k = codes.shape
    n_blocks = -(-k // block_size)
    unsigned = np.full((rows, n_blocks * block_size), 8, dtype=np.uint8)
    unsigned[:, :k] = (codes.astype(np.int16) + 8).astype(np.uint8)
    packed = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
    return packed.reshape(rows, n_blocks, block_size // 2)


def pack_int4_zero_points(zero_point: np.ndarray) -> np.ndarray:
    """MatMulNBits' ``zero_points``: signed int4 ``[N, n_blocks]`` -> uint8
    ``[N * ceil(n_blocks / 2)]``, ``z + 8`` packed two a byte (low nibble first), each row
    padded to whole bytes."""
    zero_point = np.asarray(zero_point)
    rows, n_blocks = zero_point.shape
    unsigned = np.zeros((rows, n_blocks + n_blocks % 2), dtype=np.uint8)
    unsigned[:, :n_blocks] = (zero_point.astype(np.int16) + 8).astype(np.uint8)
    return (unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)).reshape(-1)


def layer_nodes(plan: LayerPlan, a: str, y: str, prefix: str, elem_type: int, initializers: dict,
                opset: int = 17) -> list:
    """The nodes computing ``y = a @ W^T`` for ``plan``'s layer in its op's layout.

    Args:
        plan: the layer.
        a: the name of the activation input.
        y: the name of the output.
        prefix: the node name prefix (unique per call of the layer).
        elem_type: the ONNX element type of the float weight being replaced (scales are
            stored in it).
        initializers: ``{name: TensorProto}`` collecting the integer initializers; a layer
            called twice adds its initializers once.
        opset: the graph's default-domain opset (``ReduceMin`` takes its axes as an input
            from 18).
    """
    if plan.op == MATMUL_INTEGER:
        return _dynamic_nodes(plan, a, y, prefix, elem_type, initializers, opset)
    builder = {MATMUL_NBITS: _nbits_nodes, QDQ: _qdq_nodes}[plan.op]
    return builder(plan, a, y, prefix, elem_type, initializers)


def _nbits_nodes(plan: LayerPlan, a: str, y: str, prefix: str, elem_type: int, inits: dict) -> list:
    from onnx import helper

    q = plan.q
    spec = q.spec
    n, k = q.codes.shape
    codes = q.codes.cpu().numpy()
    scale = q.scale.detach().float().cpu().numpy()
    zero_point = q.zero_point.cpu().numpy().astype(np.int32)
    if spec.granularity == "group":
        block_size = spec.group_size
    else:
        # One block per row, K rounded up to a power of two (ORT's block size rule).
        block_size = max(16, 1 << (k - 1).bit_length())
        scale = np.broadcast_to(scale.reshape(-1, 1), (n, 1))
        zero_point = np.broadcast_to(zero_point.reshape(-1, 1), (n, 1))
    names = [f"{plan.name}.weight_q4", f"{plan.name}.weight_scales"]
    inputs = [a, *names]
    if names[0] not in inits:
        inits[names[0]] = _tensor(names[0], pack_int4(codes, block_size))
        inits[names[1]] = _tensor(names[1], scale.reshape(-1), elem_type)
    if not spec.symmetric:  # symmetric: ORT's default zero point 8 is our 0
        zp_name = f"{plan.name}.weight_zero_points"
        if zp_name not in inits:
            inits[zp_name] = _tensor(zp_name, pack_int4_zero_points(zero_point))
        inputs.append(zp_name)
    return [
        helper.make_node(
            MATMUL_NBITS,
            inputs,
            [y],
            name=prefix,
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=block_size,
            # 4: onnxruntime rounds each block of activations to int8 and runs int8 dot
            # products (3.5x float32 at batch 1 here, 37 dB); unset: float activations, exact.
            **({"accuracy_level": 4} if plan.int8_activations else {}),
        )
    ]


def _qdq_nodes(plan: LayerPlan, a: str, y: str, prefix: str, elem_type: int, inits: dict) -> list:
    from onnx import helper

    q = plan.q
    weight, scale, zp = f"{plan.name}.weight_int8", f"{plan.name}.weight_scale", f"{plan.name}.weight_zero_point"
    per_channel = q.spec.granularity == "channel"
    if weight not in inits:
        # MatMul's B is [K, N]: transposed codes, one scale per column (axis 1).
        inits[weight] = _tensor(weight, q.codes.cpu().numpy().T.astype(np.int8))
        scales = q.scale.detach().float().cpu().numpy().reshape(-1)
        points = q.zero_point.cpu().numpy().reshape(-1).astype(np.int8)
        inits[scale] = _tensor(scale, scales if per_channel else scales.reshape(()), elem_type)
        inits[zp] = _tensor(zp, points if per_channel else points.reshape(()))
    dequantized = f"{prefix}/weight"
    attrs = {"axis": 1} if per_channel else {}
    return [
        helper.make_node("DequantizeLinear", [weight, scale, zp], [dequantized], name=f"{prefix}/dequantize", **attrs),
        helper.make_node("MatMul", [a, dequantized], [y], name=f"{prefix}/matmul"),
    ]


def _dynamic_nodes(plan: LayerPlan, a: str, y: str, prefix: str, elem_type: int, inits: dict, opset: int) -> list:
    from onnx import TensorProto, helper

    if elem_type != TensorProto.FLOAT:
        raise ValueError(
            f"layer {plan.name!r}: int8 activations need a float32 model (training's grid is float32)")
    q = plan.q
    weight, wzp, wscale = f"{plan.name}.weight_int8", f"{plan.name}.weight_zero_point", f"{plan.name}.weight_scale"
    sums, consts = f"{plan.name}.weight_column_sums", "lightning_compress.token_grid"
    per_channel = q.spec.granularity == "channel"
    if weight not in inits:
        # int8 codes and zero points: onnxruntime's fast uint8 x int8 kernel, or both shifted
        # to uint8 where that kernel saturates (module docstring); (q + 128) - (z + 128) = q - z.
        codes = q.codes.cpu().numpy().T.astype(np.int32)  # [K, N]
        points = q.zero_point.cpu().numpy().reshape(-1).astype(np.int32)
        shift, dtype = (0, np.int8) if uint8_int8_matmul_exact() else (128, np.uint8)
        inits[weight] = _tensor(weight, (codes + shift).astype(dtype))
        inits[wzp] = _tensor(wzp, (points + shift).astype(dtype) if per_channel else dtype(points[0] + shift))
        inits[sums] = _tensor(sums, (codes - points).sum(axis=0).astype(np.int32))  # sum_k (q - zero_point)
        scales = q.scale.detach().float().cpu().numpy().reshape(-1)
        inits[wscale] = _tensor(wscale, scales if per_channel else scales.reshape(()))
    for name, value in (("zero", 0.0), ("levels", 255.0),
                        ("smallest", float(np.finfo(np.float32).tiny))):
        if f"{consts}.{name}" not in inits:
            inits[f"{consts}.{name}"] = _tensor(f"{consts}.{name}", np.float32(value))
    if f"{consts}.zero_uint8" not in inits:
        inits[f"{consts}.zero_uint8"] = _tensor(f"{consts}.zero_uint8", np.uint8(0))
        inits[f"{consts}.last_axis"] = _tensor(f"{consts}.last_axis", np.array([-1], dtype=np.int64))
    zero, levels, smallest = (f"{consts}.{n}" for n in ("zero", "levels", "smallest"))
    t = {n: f"{prefix}/{n}" for n in ("low", "high", "low0", "high0", "range", "raw_scale", "scale", "shifted",
                                       "rounded", "neg", "x_zero", "inverse", "scaled", "codes_f", "moved",
                                       "clipped", "codes", "acc", "zero_i", "correction", "exact", "float",
                                       "nan_probe", "nan_sum", "checked_scale", "channel_scaled")}

    def node(op, inputs, output, **attrs):
        return helper.make_node(op, inputs, [t[output]], name=t[output], **attrs)

    # Training's per-token grid (DynamicTokenQuantizer), the same float32 operations:
    # scale = max(max(high, 0) - min(low, 0), ...) / 255, zero = clamp(-round(low / scale), 0, 255),
    # codes = clamp(round(x * (1 / scale)) + zero, 0, 255).
    reduce = ({"axes": [-1]} if opset < 18 else {})
    reduce_inputs = [] if opset < 18 else [f"{consts}.last_axis"]
    return [
        node("ReduceMin", [a, *reduce_inputs], "low", keepdims=1, **reduce),
        node("ReduceMax", [a, *reduce_inputs], "high", keepdims=1, **reduce),
        node("Min", [t["low"], zero], "low0"),
        node("Max", [t["high"], zero], "high0"),
        node("Sub", [t["high0"], t["low0"]], "range"),
        node("Div", [t["range"], levels], "raw_scale"),
        node("Max", [t["raw_scale"], smallest], "scale"),
        node("Div", [t["low0"], t["scale"]], "shifted"),
        node("Round", [t["shifted"]], "rounded"),
        node("Neg", [t["rounded"]], "neg"),
        node("Clip", [t["neg"], zero, levels], "x_zero"),
        # Reciprocal, not Div(1, scale): onnxruntime's optimizer turns Mul(x, Div(1, s)) into
        # Div(x, s), which rounds otherwise (40% of a token of integers moved a code).
        node("Reciprocal", [t["scale"]], "inverse"),
        node("Mul", [a, t["inverse"]], "scaled"),
        node("Round", [t["scaled"]], "codes_f"),
        node("Add", [t["codes_f"], t["x_zero"]], "moved"),
        node("Clip", [t["moved"], zero, levels], "clipped"),
        node("Cast", [t["clipped"]], "codes", to=TensorProto.UINT8),
        # sum_k (codes - zero) (q - zero_point) = sum_k codes (q - zero_point) - zero * sum_k (q - zero_point), in int32.
        node("MatMulInteger", [t["codes"], weight, f"{consts}.zero_uint8", wzp], "acc"),
        node("Cast", [t["x_zero"]], "zero_i", to=TensorProto.INT32),
        node("Mul", [t["zero_i"], sums], "correction"),
        node("Sub", [t["acc"], t["correction"]], "exact"),
        node("Cast", [t["exact"]], "float", to=TensorProto.FLOAT),
        # A NaN value vanishes in ReduceMin/Max and in the uint8 cast. Its rounded step is NaN
        # (an infinity's too: its scale is infinite, and inf * 0 is NaN); the steps of any
        # other token are integers within +-256, whose sum is finite: sum - sum is NaN for a
        # token holding one, 0 otherwise, and goes into its scale.
        node("ReduceSum", [t["codes_f"], f"{consts}.last_axis"], "nan_sum", keepdims=1),  # axes an input from 13
        node("Sub", [t["nan_sum"], t["nan_sum"]], "nan_probe"),
        node("Add", [t["scale"], t["nan_probe"]], "checked_scale"),
        # The weight's scale first, as the int8 GEMM in PyTorch applies them: the sums times
        # a huge token's scale overflowed float32 (inf at |x| ~ 1e36) before it came down.
        node("Mul", [t["float"], wscale], "channel_scaled"),
        helper.make_node("Mul", [t["channel_scaled"], t["checked_scale"]], [y], name=f"{prefix}/rescale"),
    ]


@functools.lru_cache(maxsize=None)
def uint8_int8_matmul_exact() -> bool:
    """Whether onnxruntime's uint8 x int8 ``MatMulInteger`` sums exactly on this CPU
    (checked once, on products that overflow int16 in pairs: 255 * 127 + 255 * 127);
    ``True`` without onnxruntime, whose absence the export reports on its own."""
    try:
        import onnxruntime
        from onnx import TensorProto, helper
    except ImportError:
        return True
    codes = np.array([[127] * 64, [-128] * 64, [127, -128] * 32], dtype=np.int8).T  # [K, N]
    inputs = np.array([[255] * 64, [255, 0] * 32], dtype=np.uint8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])],
        [_tensor("w", codes)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": inputs})[0]
    exact = bool(np.array_equal(got, inputs.astype(np.int64) @ codes.astype(np.int64)))
    if not exact:  # said once per process: the file's layout follows this machine
        warnings.warn(
            "onnxruntime's uint8 x int8 MatMulInteger saturates on this CPU (no VNNI): model.onnx gets uint8 int8-layer"
            " weights, exact here and on any CPU, but about 10x slower at 128 tokens than int8 weights on a VNNI CPU;"
            " export on a CPU like the serving machine's", UserWarning, stacklevel=2)
    return exact


def _tensor(name: str, array: np.ndarray, elem_type: int | None = None):
    from onnx import helper, numpy_helper

    array = np.ascontiguousarray(array)
    if elem_type is not None:
        array = array.astype(helper.tensor_dtype_to_np_dtype(elem_type))
    return numpy_helper.from_array(array, name)


__all__ = [
    "INTEGER_BITS",
    "MATMUL_INTEGER",
    "MATMUL_NBITS",
    "MS_DOMAIN",
    "QDQ",
    "SUPPORTED",
    "LayerPlan",
    "layer_nodes",
    "onnx_op",
    "pack_int4",
    "pack_int4_zero_points",
]

"""The fast decoder graph for onnxruntime: Qwen2 layers written node by node from the checkpoint's tensors around
onnxruntime's GroupQueryAttention contrib op, with KV buffers that the runtime preallocates and onnxruntime updates
in place (past and present bound to the same buffer), no materialised KV head repeats, and rotary applied inside
the attention op from per-request cos/sin tables that the runtime computes from the TMRoPE position ids.

It uses onnxruntime-only ops (com.microsoft GroupQueryAttention, SkipSimplifiedLayerNormalization and
SimplifiedLayerNormalization), so the bundle keeps the standard-ops `decoder` graph for other backends
(TensorRT); both are validated against transformers at export.

Inputs: inputs_embeds [batch, seq, hidden] float32; seqlens_k [batch] int32 (tokens in each row's cache after this
run, minus 1); total_sequence_length [] int32 (the largest of them plus 1); cos_cache, sin_cache [rows, head_dim/2]
float32 and position_ids [batch, seq] int64: the rotary of each new token is row position_ids of the tables (one
request: per-request TMRoPE tables by cache index; a batch of decode steps: a plain table by position, as decode
tokens are text); past_key_i / past_value_i [batch, kv_heads, capacity, head_dim] float32, the buffers. Outputs:
hidden [batch, hidden], the last position's final-normalised state (the output layer is its own graph,
decoder_gqa_head.onnx over lm_head.npy, so the runtime can compute only the allowed rows' logits where the
answer grammar allows few tokens); present_key_i / present_value_i, bound by the runtime to the same
buffers as the past (in place). onnxruntime's CPU kernel takes several new tokens after a past only with batch 1:
batches are decode steps (seq 1), and each request is prefilled on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..onnx_io import DataWriter

NAME = "decoder_gqa"


def supported(cfg) -> str | None:
    """None when the fast graph can be built for this text config, else why not."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16 (onnxruntime's GroupQueryAttention rotary needs it)"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope_type {rope.get('rope_type')!r} (only the default rotary is written)"
    return None


def io_names(layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{p}_{part}_{i}" for p in ("past",) for i in range(layers) for part in ("key", "value")]
    present = [f"present_{part}_{i}" for i in range(layers) for part in ("key", "value")]
    inputs = ["inputs_embeds", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache", "position_ids"] + kv
    return inputs, ["hidden"] + present


HEAD_NAME = "decoder_gqa_head"
HEAD_FILE = "lm_head.npy"  # [vocab, hidden] float32: the head graph's weight, and memory-mapped by the runtime


def build_head(parts, work: Path) -> list[str]:
    """The output layer on its own: `lm_head.npy` ([vocab, hidden], one row per token, so the runtime can compute
    the logits of a few allowed tokens from their rows alone) and `decoder_gqa_head.onnx` (Gemm with transB,
    hidden [batch, hidden] -> logits [batch, vocab]) whose weight is that file's data, at the .npy header's offset:
    one copy on disk for both uses."""
    import onnx
    from onnx import TensorProto, helper

    head = np.ascontiguousarray(_np(parts.lm_head.weight), dtype=np.float32)
    vocab, hidden = head.shape
    path = work / HEAD_FILE
    np.save(path, head)
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
    del head
    weight = TensorProto(name="lm_head", data_type=TensorProto.FLOAT, dims=[vocab, hidden])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", HEAD_FILE), ("offset", str(offset)), ("length", str(vocab * hidden * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Gemm", ["hidden", "lm_head"], ["logits"], transB=1)], HEAD_NAME,
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", hidden])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab])],
                              initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="omniguard-edge")
    model.ir_version = 8
    onnx.save(model, str(work / f"{HEAD_NAME}.onnx"))
    return [f"{HEAD_NAME}.onnx", HEAD_FILE]


def _np(t) -> np.ndarray:
    return t.detach().float().numpy()


def build(parts, dest: Path, progress=None) -> list[str]:
    """Write the fast graph to `dest` (and `dest`.data) from the checkpoint, one decoder layer at a time;
    returns the files written."""
    import onnx
    from onnx import TensorProto, helper

    cfg = parts.ckpt.thinker_config.text_config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim, eps = hidden // heads, float(cfg.rms_norm_eps)
    inputs, outputs = io_names(layers)
    data = dest.with_name(dest.name + ".data")
    w = DataWriter(data)
    nodes = []

    def node(op, ins, outs, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, domain=domain or None, **attrs))
        return outs[0]

    try:
        residual, mlp_out = "inputs_embeds", None
        for i in range(layers):
            layer = parts.decoder_layer(i)
            attn, mlp = layer.self_attn, layer.mlp
            p = f"l{i}."
            if mlp_out is None:
                x = node("SimplifiedLayerNormalization", [residual, w.add(p + "ln_in", _np(layer.input_layernorm.weight))],
                         [p + "x"], axis=-1, epsilon=eps)
            else:  # the previous layer's MLP output joins the residual stream and is normalised in one op
                x = node("SkipSimplifiedLayerNormalization",
                         [mlp_out, residual, w.add(p + "ln_in", _np(layer.input_layernorm.weight))],
                         [p + "x", "", "", p + "res_in"], domain="com.microsoft", epsilon=eps)
                residual = p + "res_in"
            qkv_w = np.concatenate([_np(attn.q_proj.weight), _np(attn.k_proj.weight), _np(attn.v_proj.weight)]).T
            qkv_b = np.concatenate([_np(attn.q_proj.bias), _np(attn.k_proj.bias), _np(attn.v_proj.bias)])
            qkv = node("MatMul", [x, w.add(p + "qkv_w", qkv_w)], [p + "qkv_mm"])
            qkv = node("Add", [qkv, w.add(p + "qkv_b", qkv_b)], [p + "qkv"])
            node("GroupQueryAttention",
                 [qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length",
                  "cos_cache", "sin_cache", "position_ids"],
                 [p + "attn", f"present_key_{i}", f"present_value_{i}"], domain="com.microsoft",
                 num_heads=heads, kv_num_heads=kv_heads, scale=float(attn.scaling), do_rotary=1, rotary_interleaved=0)
            o = node("MatMul", [p + "attn", w.add(p + "o_w", _np(attn.o_proj.weight).T)], [p + "o"])
            x2 = node("SkipSimplifiedLayerNormalization",
                      [o, residual, w.add(p + "ln_post", _np(layer.post_attention_layernorm.weight))],
                      [p + "x2", "", "", p + "res_mid"], domain="com.microsoft", epsilon=eps)
            residual = p + "res_mid"
            ffn = mlp.gate_proj.weight.shape[0]
            gu_w = np.concatenate([_np(mlp.gate_proj.weight), _np(mlp.up_proj.weight)]).T
            gu = node("MatMul", [x2, w.add(p + "gu_w", gu_w)], [p + "gu"])
            split = w_split = p + "split"
            nodes.append(helper.make_node("Constant", [], [w_split], value=helper.make_tensor(
                w_split, TensorProto.INT64, [2], [ffn, ffn])))
            node("Split", [gu, split], [p + "gate", p + "up"], axis=-1)
            sig = node("Sigmoid", [p + "gate"], [p + "sig"])
            act = node("Mul", [p + "gate", sig], [p + "act"])
            prod = node("Mul", [act, p + "up"], [p + "prod"])
            mlp_out = node("MatMul", [prod, w.add(p + "down_w", _np(mlp.down_proj.weight).T)], [p + "mlp"])
            del layer, attn, mlp
            if progress is not None:
                progress(i + 1, layers)
        norm = parts.final_norm()
        last = helper.make_tensor("last_index", TensorProto.INT64, [1], [-1])
        nodes.append(helper.make_node("Constant", [], ["last"], value=last))
        h_last = node("Gather", [mlp_out, "last"], ["mlp_last"], axis=1)
        r_last = node("Gather", [residual, "last"], ["res_last"], axis=1)
        normed = node("SkipSimplifiedLayerNormalization", [h_last, r_last, w.add("norm", _np(norm.weight))],
                      ["normed"], domain="com.microsoft", epsilon=eps)
        axes = helper.make_tensor("squeeze_axes", TensorProto.INT64, [1], [1])
        nodes.append(helper.make_node("Constant", [], ["sq_axes"], value=axes))
        node("Squeeze", [normed, "sq_axes"], ["hidden"])  # the head is its own graph (build_head)
    finally:
        w.close()
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    kv_shape = ["batch", kv_heads, "capacity", head_dim]
    graph_inputs = [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", hidden]),
                    helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
                    helper.make_tensor_value_info("total_sequence_length", i32, []),
                    helper.make_tensor_value_info("cos_cache", f32, ["rows", head_dim // 2]),
                    helper.make_tensor_value_info("sin_cache", f32, ["rows", head_dim // 2]),
                    helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    graph_inputs += [helper.make_tensor_value_info(n, f32, kv_shape) for n in inputs[6:]]
    graph_outputs = [helper.make_tensor_value_info("hidden", f32, ["batch", hidden])]
    graph_outputs += [helper.make_tensor_value_info(n, f32, kv_shape) for n in outputs[1:]]
    graph = helper.make_graph(nodes, NAME, graph_inputs, graph_outputs, initializer=w.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="omniguard-edge")
    model.ir_version = 8
    onnx.save(model, str(dest))
    return [dest.name, data.name]


def fast_feeds(feeds: dict, layers: int, sections, freqs: np.ndarray, capacity: int | None = None) -> dict:
    """A batch-1 case of the standard decoder graph (inputs_embeds, attention_mask of ones, position_ids, past KV)
    as the fast graph's feeds: KV buffers of `capacity` rows (default: exactly the total) holding the past, and
    the rotary tables of the new tokens at their cache rows."""
    from ...runtime.rotary import rope_tables

    embeds, pos = feeds["inputs_embeds"], feeds["position_ids"]
    past = feeds["past_key_0"].shape[2]
    seq = embeds.shape[1]
    total = past + seq
    capacity = capacity or total
    out = {"inputs_embeds": embeds, "seqlens_k": np.array([total - 1], np.int32),
           "total_sequence_length": np.array(total, np.int32)}
    cos = np.zeros((capacity, freqs.size), np.float32)
    sin = np.zeros_like(cos)
    cos[past:total], sin[past:total] = rope_tables(pos[:, 0, :], freqs, sections)
    out["cos_cache"], out["sin_cache"] = cos, sin
    out["position_ids"] = np.arange(past, total, dtype=np.int64)[None]  # one request: tables by cache index
    for i in range(layers):
        for part in ("key", "value"):
            buf = np.zeros((1, *feeds[f"past_{part}_{i}"].shape[1:2], capacity, feeds[f"past_{part}_{i}"].shape[3]),
                           np.float32)
            buf[:, :, :past] = feeds[f"past_{part}_{i}"]
            out[f"past_{part}_{i}"] = buf
    return out

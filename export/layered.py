"""Low-memory decoder export: trace the decoder piece by piece and stitch one ONNX graph.

The whole-graph export holds the fp32 decoder in torch and then in onnx at once (3B: 18.1 GiB peak);
a 7B decoder is 28 GB in fp32. Here the prologue (rope + mask), each layer and the epilogue (norm + head)
are built from only their own tensors, traced, checked in onnxruntime against transformers' own layer,
and their weights streamed into the single `decoder.onnx.data` before the next piece is loaded.
The stitched graph has the same interface as the whole-graph export (decoder.interface).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..runtime.manifest import GraphSpec, TensorSpec
from .graphs.decoder import interface
from .onnx_io import OPSET, DataWriter, run_onnx, trace_to_onnx
from .validate import FP32_TOLERANCE, record

def _rename(graph, mapping: dict[str, str], prefix: str):
    """Rename every value of `graph`: names in `mapping` to their global name, the rest prefixed."""

    def r(name: str) -> str:
        return name if not name else mapping.get(name, prefix + name)

    for node in graph.node:
        if any(a.type in (5, 10) for a in node.attribute):  # GRAPH / GRAPHS attributes: none expected
            raise RuntimeError(f"node {node.name} has a subgraph; the stitcher does not rename inside subgraphs")
        node.input[:] = [r(x) for x in node.input]
        node.output[:] = [r(x) for x in node.output]
        node.name = prefix + node.name
    for init in graph.initializer:
        init.name = r(init.name)
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        vi.name = r(vi.name)
    return graph


def _stripped_graph(traced: Path, writer: DataWriter):
    """Load a traced piece, stream its weights out, and return a copy of the graph that owns no weights.

    The copy matters: protobuf keeps a loaded model's memory in one arena for as long as any part of it
    is referenced, cleared fields included, so holding the original graph would hold every layer's
    weights until the end (the first 7B run was killed at layer 23 of 28 this way).
    """
    import onnx

    model = onnx.load(str(traced), load_external_data=True)
    writer.take(model.graph)
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del model
    return graph


def _export_piece(name, module, inputs, outputs, axes, example, cases, work: Path, writer: DataWriter,
                  mapping: dict[str, str], report: list):
    """Trace one piece, validate it in onnxruntime, stream its weights out; returns its renamed graph."""
    scratch = Path(tempfile.mkdtemp(prefix=f"trace-{name}-", dir=work))
    try:
        traced = trace_to_onnx(module, example, inputs, outputs, axes, scratch)
        refs = [(case, feeds, ref()) for case, feeds, ref in cases]
        del module
        gc.collect()
        results = run_onnx(traced, [feeds for _, feeds, _ in refs])
        for (case, _, ref), got in zip(refs, results):
            record("decoder", f"{name}/{case}", outputs, got, ref, FP32_TOLERANCE, report)
        return _rename(_stripped_graph(traced, writer), mapping, f"{name}/")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _layer_cases(layer_module, cfg, index: int, rng, prologue):
    """Prefill (batch 1, empty past), decode (batch 2, past 5, left padding) and extend (batch 1, past 7, 6 new
    tokens: a cached prefix) for one layer, with transformers' own decoder layer as the reference."""
    import torch
    from transformers import DynamicCache

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    out = []
    for case, batch, seq, past in (("prefill_b1", 1, 7, 0), ("decode_b2_leftpad", 2, 1, 5), ("extend_b1", 1, 6, 7)):
        mask = np.ones((batch, past + seq), np.int64)
        if batch > 1:
            mask[1, :2] = 0
        pos = np.broadcast_to(np.arange(past, past + seq), (3, batch, seq)).astype(np.int64).copy()
        h = rng.standard_normal((batch, seq, cfg.hidden_size)).astype(np.float32)
        pk = rng.standard_normal((batch, cfg.num_key_value_heads, past, head_dim)).astype(np.float32)
        pv = rng.standard_normal(pk.shape).astype(np.float32)
        with torch.no_grad():
            cos, sin, bias = prologue(torch.from_numpy(h), torch.from_numpy(mask), torch.from_numpy(pos), torch.from_numpy(pk))
        feeds = {"hidden_in": h, "rope_cos": cos.numpy(), "rope_sin": sin.numpy(), "attn_bias": bias.numpy(),
                 "past_key": pk, "past_value": pv}

        def reference(feeds=feeds, cos=cos, sin=sin, bias=bias):
            cache = DynamicCache(config=cfg)
            cache.update(torch.from_numpy(feeds["past_key"]), torch.from_numpy(feeds["past_value"]), index)
            with torch.no_grad():
                hidden = layer_module(torch.from_numpy(feeds["hidden_in"]), attention_mask=bias,
                                      position_embeddings=(cos[:, 0], sin[:, 0]), cache=cache, use_cache=True)
            layer = cache.layers[index]
            return {"hidden_out": hidden.numpy(), "present_key": layer.keys.numpy(), "present_value": layer.values.numpy()}

        out.append((case, feeds, reference))
    return out


def export_decoder_layered(parts, work: Path, bar, rng, metadata: dict) -> tuple[GraphSpec, list[str]]:
    """Write decoder.onnx + decoder.onnx.data piece by piece; returns the spec and files written."""
    import onnx
    import torch

    from .graphs.decoder_modules import DecoderEpilogue, DecoderLayer, DecoderPrologue

    cfg = parts.ckpt.thinker_config.text_config
    n, head_dim = cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
    inputs, outputs, axes = interface(parts)
    writer, report, graphs = DataWriter(work / "decoder.onnx.data"), [], []
    act = {0: "batch", 1: "seq"}
    rope_axes = {0: "batch", 2: "seq"}
    bias_axes = {0: "batch", 2: "seq", 3: "total"}
    try:
        bar.set_postfix_str("decoder: prologue")
        prologue = DecoderPrologue(parts.rotary_inv_freq(), cfg.rope_parameters["mrope_section"]).eval()
        ex_pos = np.broadcast_to(np.arange(2, 5), (3, 2, 3)).astype(np.int64).copy()
        ex = {"inputs_embeds": np.zeros((2, 3, cfg.hidden_size), np.float32), "attention_mask": np.ones((2, 5), np.int64),
              "position_ids": ex_pos, "past_key_0": np.zeros((2, cfg.num_key_value_heads, 2, head_dim), np.float32)}

        def prologue_ref(feeds=ex):
            with torch.no_grad():
                c, s, b = prologue(*(torch.from_numpy(feeds[k]) for k in ex))
            return {"rope_cos": c.numpy(), "rope_sin": s.numpy(), "attn_bias": b.numpy()}

        pro_names = ["rope_cos", "rope_sin", "attn_bias"]
        pro_axes = {"inputs_embeds": act, "attention_mask": {0: "batch", 1: "total"}, "position_ids": {1: "batch", 2: "seq"},
                    "past_key_0": {0: "batch", 2: "past"}, "rope_cos": rope_axes, "rope_sin": rope_axes, "attn_bias": bias_axes}
        graphs.append(_export_piece("prologue", prologue, list(ex), pro_names, pro_axes, ex, [("example", ex, prologue_ref)],
                             work, writer, {k: k for k in list(ex) + pro_names}, report))
        layer_in = ["hidden_in", "rope_cos", "rope_sin", "attn_bias", "past_key", "past_value"]
        layer_out = ["hidden_out", "present_key", "present_value"]
        kv_past, kv_total = {0: "batch", 2: "past"}, {0: "batch", 2: "total"}
        layer_axes = {"hidden_in": act, "rope_cos": rope_axes, "rope_sin": rope_axes, "attn_bias": bias_axes,
                      "past_key": kv_past, "past_value": kv_past, "hidden_out": act,
                      "present_key": kv_total, "present_value": kv_total}
        for i in range(n):
            bar.set_postfix_str(f"decoder: layer {i + 1}/{n}")
            hf_layer = parts.decoder_layer(i)
            cases = _layer_cases(hf_layer, cfg, i, rng, prologue)
            mapping = {"hidden_in": "inputs_embeds" if i == 0 else f"hidden_{i}", "hidden_out": f"hidden_{i + 1}",
                       "rope_cos": "rope_cos", "rope_sin": "rope_sin", "attn_bias": "attn_bias",
                       "past_key": f"past_key_{i}", "past_value": f"past_value_{i}",
                       "present_key": f"present_key_{i}", "present_value": f"present_value_{i}"}
            graphs.append(_export_piece(f"layer_{i}", DecoderLayer(hf_layer).eval(), layer_in, layer_out, layer_axes,
                                 cases[1][1], cases, work, writer, mapping, report))
            del hf_layer, cases
        bar.set_postfix_str("decoder: norm and head")
        epilogue = DecoderEpilogue(parts.final_norm(), parts.lm_head).eval()
        h = rng.standard_normal((2, 3, cfg.hidden_size)).astype(np.float32)

        def epilogue_ref(h=h):
            with torch.no_grad():
                return {"logits": epilogue(torch.from_numpy(h)).numpy()}

        graphs.append(_export_piece("epilogue", epilogue, ["hidden"], ["logits"], {"hidden": act, "logits": {0: "batch"}},
                             {"hidden": h}, [("example", {"hidden": h}, epilogue_ref)], work, writer,
                             {"hidden": f"hidden_{n}", "logits": "logits"}, report))
        parts.release("lm_head")
    finally:
        writer.close()
    stitched = _stitch(graphs, inputs, outputs)
    model = onnx.helper.make_model(stitched, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="omniguard-edge (layered)", ir_version=8)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(work / "decoder.onnx"))
    return _spec(cfg, inputs, outputs, axes, report), ["decoder.onnx", "decoder.onnx.data"]


def _stitch(graphs, inputs: list[str], outputs: list[str]):
    """One graph from the renamed pieces; graph inputs/outputs in the interface's order."""
    import onnx

    infos = {}
    for g in graphs:
        for vi in list(g.input) + list(g.output):
            infos.setdefault(vi.name, vi)
    nodes = [node for g in graphs for node in g.node]
    inits = [init for g in graphs for init in g.initializer]
    return onnx.helper.make_graph(nodes, "decoder", [infos[n] for n in inputs], [infos[n] for n in outputs], inits)


def _spec(cfg, inputs, outputs, axes, report) -> GraphSpec:
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    def shape(name):
        if name == "inputs_embeds":
            return ["batch", "seq", cfg.hidden_size]
        if name == "attention_mask":
            return ["batch", "total"]
        if name == "position_ids":
            return [3, "batch", "seq"]
        if name == "logits":
            return ["batch", cfg.vocab_size]
        return ["batch", cfg.num_key_value_heads, axes[name][2], head_dim]

    dtype = {"attention_mask": "int64", "position_ids": "int64"}
    return GraphSpec(
        file="decoder.onnx", precision="fp32", opset=OPSET,
        inputs=[TensorSpec(n, dtype.get(n, "float32"), shape(n)) for n in inputs],
        outputs=[TensorSpec(n, "float32", shape(n)) for n in outputs],
        tolerance=FP32_TOLERANCE, data_file="decoder.onnx.data", validation=report,
    )


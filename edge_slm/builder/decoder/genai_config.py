"""`genai_config.json`: what onnxruntime-genai needs to run a bundle's decoder with its own loop.
The bundle's graph already has genai's signature (input_ids, attention_mask, position_ids,
past_key_values.%d.key/value in, logits and present.%d.key/value out), so the file only names them
and gives the model's shape, special ids and greedy search defaults."""

from __future__ import annotations

from edge_slm.builder.decoder.architectures import genai_model_type
from edge_slm.builder.decoder.export import ModelShape

GENAI_CONFIG = "genai_config.json"


def genai_config(shape: ModelShape, generation: dict, graph_kind: str, model_file: str = "model.onnx") -> dict:
    eos = generation["eos_token_ids"]
    context = shape.context_length
    return {
        "model": {
            "type": genai_model_type(shape.architecture),
            "bos_token_id": generation.get("bos_token_id") if generation.get("bos_token_id") is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": generation.get("pad_token_id", eos[0]),
            "context_length": context,
            "vocab_size": shape.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": shape.head_dim,
                "hidden_size": shape.hidden_size,
                "num_attention_heads": shape.num_heads,
                "num_hidden_layers": shape.num_layers,
                "num_key_value_heads": shape.num_kv_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "early_stopping": True,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention writes present into past in place: genai may share the buffers.
            "past_present_share_buffer": graph_kind == "fused",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }

"""transformers' Phi3ForCausalLM holding a phi3v decoder's weights (the reference for parity tests)."""
import pytest

from phi3v import Phi3VConfig


def transformers_phi3(cfg: Phi3VConfig, hf_state: dict, eos_token_id: int):
    """Phi3ForCausalLM (eager, fp32) with the decoder of `cfg`, loaded from HF-named tensors."""
    transformers = pytest.importorskip("transformers")
    hcfg = transformers.Phi3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=cfg.original_max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "longrope", "rope_theta": cfg.rope_theta,
                         "short_factor": list(cfg.rope_short_factor), "long_factor": list(cfg.rope_long_factor)},
        pad_token_id=cfg.pad_token_id, eos_token_id=eos_token_id, tie_word_embeddings=False)
    hcfg._attn_implementation = "eager"
    ref = transformers.Phi3ForCausalLM(hcfg).float().eval()
    decoder = {k: v for k, v in hf_state.items() if not k.startswith("model.vision_embed_tokens.")}
    missing, unexpected = ref.load_state_dict(decoder, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ref

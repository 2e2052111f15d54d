"""Zoo rows for more of the families people train (tiny random-init configs, float64): q/k norms,
logit softcapping, sliding windows, multi-query and latent attention, state-space and linear-time
models, mixture-of-experts families, relative-position and pooling encoders, speech, contrastive
vision towers, vision backbones."""

from __future__ import annotations

from zoo import DEC, ENC, KV, ZooCase, causal_lm, hf, image_classifier, sequence_classifier

SMALL = {**DEC, **KV}
EAGER = {"experts_implementation": "eager"}  # float64: grouped matmul has no float64 kernel
MLA = {"kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4, "n_routed_experts": 4,
       "num_experts_per_tok": 2, "moe_intermediate_size": 16, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 8, "patch_size": 4}
TOWERS = {"vision_config": VISION, "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                                   "num_attention_heads": 4, "vocab_size": 40}, "num_labels": 3}
ROUTED = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}

FAMILIES: list[ZooCase] = [
    causal_lm("qwen3", hf("Qwen3Config", "Qwen3ForCausalLM", **SMALL, head_dim=4)),
    causal_lm("olmo2", hf("Olmo2Config", "Olmo2ForCausalLM", **SMALL)),
    causal_lm("gemma2", hf("Gemma2Config", "Gemma2ForCausalLM", **SMALL, head_dim=4, sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    causal_lm("gemma3", hf("Gemma3TextConfig", "Gemma3ForCausalLM", **SMALL, head_dim=4, sliding_window=4)),
    causal_lm("cohere2", hf("Cohere2Config", "Cohere2ForCausalLM", **SMALL, sliding_window=4)),
    causal_lm("starcoder2", hf("Starcoder2Config", "Starcoder2ForCausalLM", **SMALL, sliding_window=4)),
    causal_lm("gpt-bigcode-mqa", hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=16, n_layer=2, n_head=4, vocab_size=40, n_positions=32, multi_query=True)),
    causal_lm("deepseek-v2", hf("DeepseekV2Config", "DeepseekV2ForCausalLM", **DEC, **EAGER, **MLA, q_lora_rank=None)),
    causal_lm("deepseek-v3", hf("DeepseekV3Config", "DeepseekV3ForCausalLM", **DEC, **EAGER, **MLA, q_lora_rank=8)),
    causal_lm("mamba", hf("MambaConfig", "MambaForCausalLM", hidden_size=16, num_hidden_layers=2, vocab_size=40, state_size=4, expand=2, conv_kernel=2, time_step_rank=4)),
    # Its scan computes in float32 inside a float64 model (A = -exp(A_log.float()), B, C): float32-level error.
    causal_lm("mamba2", hf("Mamba2Config", "Mamba2ForCausalLM", hidden_size=16, num_hidden_layers=2, vocab_size=40, state_size=4, expand=2, conv_kernel=2, num_heads=4, head_dim=8, n_groups=1, chunk_size=4), tol=1e-6),
    # RWKV keeps its recurrent state in place when use_cache is on (its default in eval mode).
    causal_lm("rwkv", hf("RwkvConfig", "RwkvForCausalLM", hidden_size=16, num_hidden_layers=2, vocab_size=40, attention_hidden_size=16, intermediate_size=32, context_length=32, use_cache=False)),
    causal_lm("qwen2-moe", hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **SMALL, **EAGER, **ROUTED, shared_expert_intermediate_size=16)),
    causal_lm("qwen3-moe", hf("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **SMALL, **EAGER, **ROUTED, head_dim=4)),
    causal_lm("jetmoe", hf("JetMoeConfig", "JetMoeForCausalLM", **EAGER, hidden_size=16, num_hidden_layers=2, num_key_value_heads=2, kv_channels=4, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=40, max_position_embeddings=32)),
    causal_lm("granitemoe", hf("GraniteMoeConfig", "GraniteMoeForCausalLM", **SMALL, **EAGER, num_local_experts=4, num_experts_per_tok=2)),
    # Jitter noise off: the oracle runs each example alone, with other random numbers than the batch.
    causal_lm("phimoe", hf("PhimoeConfig", "PhimoeForCausalLM", **SMALL, **EAGER, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0, input_jitter_noise=0.0)),
    sequence_classifier("deberta", hf("DebertaConfig", "DebertaForSequenceClassification", **ENC, num_labels=3, relative_attention=True, pos_att_type=["p2c", "c2p"])),
    sequence_classifier("deberta-v2", hf("DebertaV2Config", "DebertaV2ForSequenceClassification", **ENC, num_labels=3, relative_attention=True, position_buckets=4, pos_att_type=["p2c", "c2p"])),
    sequence_classifier("funnel", hf("FunnelConfig", "FunnelForSequenceClassification", d_model=16, d_inner=32, n_head=4, d_head=4, block_sizes=[1, 1], vocab_size=40, num_labels=3)),
    image_classifier("clip-vision", hf("CLIPConfig", "CLIPForImageClassification", **TOWERS)),
    image_classifier("siglip-vision", hf("SiglipConfig", "SiglipForImageClassification", **TOWERS)),
    image_classifier("dinov2", hf("Dinov2Config", "Dinov2ForImageClassification", **VISION, num_labels=3)),
    image_classifier("beit", hf("BeitConfig", "BeitForImageClassification", **VISION, num_labels=3, use_relative_position_bias=True)),
    image_classifier("convnextv2", hf("ConvNextV2Config", "ConvNextV2ForImageClassification", num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=16), shape=(3, 16, 16)),
    image_classifier("bit", hf("BitConfig", "BitForImageClassification", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, layer_type="preactivation", global_padding="SAME", num_groups=4), shape=(3, 16, 16)),
]

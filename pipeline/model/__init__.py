"""Models as the stages need them: loading.py loads tokenizers and models (dtype, 4/8-bit quantization,
RoPE scaling, attention, causal-LM or reward head), adapters.py attaches LoRA / DoRA / QLoRA / prefix
tuning, merge.py merges an adapter into its base between stages, tiny_model.py builds the embedded
demo model. No data handling and no training logic live here.
"""

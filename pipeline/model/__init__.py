"""Models as the stages need them: loading.py loads tokenizers and models (dtype, 4/8-bit
quantization, RoPE scaling, attention, causal-LM or reward head), attention.py registers the
varlen attention of packed rows, compiled.py compiles the decoder layers (--compile_layers),
unpadding.py lays a padded batch end to end and back, stops.py holds the stop tokens (template ->
ids -> generation config -> answer mask), patches.py holds every run-time change to a library
(named, logged once), adapters.py attaches LoRA / DoRA / QLoRA / prefix tuning (and switches them
off for a frozen read), merge.py merges an adapter into its base between stages, integrity.py
checks a model folder is whole before it loads, tiny_model.py builds the embedded demo model. No
data handling and no training logic live here.
"""

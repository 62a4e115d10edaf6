"""GPU check of the packed path: packed_varlen attention (torch's varlen kernel) gives each sample
the logits it has alone under SDPA, and the fused (liger) loss equals the chunked one. Prints one
JSON line."""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.data.collators import FlatteningCollator
from pipeline.data.packing import pack_rows
from pipeline.model.attention import PACKED_VARLEN
from pipeline.train.losses import causal_lm_loss_sum


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
    )
    sdpa = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    varlen = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    varlen.load_state_dict(sdpa.state_dict())
    varlen.set_attn_implementation(PACKED_VARLEN)
    samples = [
        {
            "input_ids": torch.randint(0, 32000, (n,)).tolist(),
            "labels": torch.randint(0, 32000, (n,)).tolist(),
        }
        for n in (300, 77, 1000, 5)
    ]
    row = pack_rows(samples, 2048)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in FlatteningCollator()(row).items()}
    diffs = []
    with torch.no_grad():
        packed = varlen(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        start = 0
        for n in sorted((len(s["input_ids"]) for s in samples), reverse=True):
            ids = batch["input_ids"][:, start : start + n]
            alone = sdpa(input_ids=ids, use_cache=False).logits[0]
            diffs.append((packed[start : start + n].float() - alone.float()).abs().max().item())
            start += n
        hidden = varlen(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        ).hidden_states[-1]
        head = varlen.get_output_embeddings()
        chunked, n = causal_lm_loss_sum(hidden, batch["labels"], head)
        fused, _ = causal_lm_loss_sum(hidden, batch["labels"], head, fused=True)
    print(
        json.dumps(
            {
                "max_abs_logit_diff_per_sample_bf16": diffs,
                "loss_chunked": chunked.item() / n.item(),
                "loss_fused": fused.item() / n.item(),
            }
        )
    )


if __name__ == "__main__":
    main()
